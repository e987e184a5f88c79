"""One process, or DDP: every rank holds every layer's curvature and gradient. The
decompositions due at a refresh are split across ranks by cost and shared in one collective,
and every rank computes every direction; the statistics are averaged in one all-reduce over
whatever this step sent."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_fop.blocks import Blocking
from hf_fop.bucket import ShapeBucket
from hf_fop.bucket_data import (
    BucketStatistics,
    BucketStep,
    factor_layouts,
    statistic_shape,
    step_statistics,
)
from hf_fop.curvature import EigenPreconditioner
from hf_fop.distributed import Communicator, assign_layers, layouts_cost
from hf_fop.fop_math import inner
from hf_fop.layers import LayerAdapter

# Layer index -> its direction (before the learning rate), for every layer with a gradient.
Directions = list[tuple[int, Tensor]]


class ReplicatedDistributor:
    """One process or DDP: every rank holds everything (module docstring). The base of every
    distributor: what the rest of FOP asks of one."""

    sharded = False

    def __init__(
        self,
        layers: Sequence[LayerAdapter],
        communicator: Communicator,
        blocking: Blocking | None = None,
    ) -> None:
        self.layers = list(layers)
        self.communicator = communicator
        self.layouts = [factor_layouts(layer, blocking or Blocking()) for layer in self.layers]
        self.owners = self._owners()
        # Layer indices this rank decomposed at the last refresh (for inspection and tests).
        self.decomposed_by_rank: list[int] = []

    def _owners(self) -> list[int]:
        return [self.communicator.rank] * len(self.layers)

    def holds(self, index: int) -> bool:
        return self.owners[index] == self.communicator.rank

    # ---------------------------------------------------------------------------- statistics

    def average(
        self,
        per_layer: Sequence[dict[str, Tensor | None]],
        kinds: Sequence[str],
        buckets: Sequence[ShapeBucket],
    ) -> list[BucketStatistics]:
        """Every layer's statistics of ``kinds`` ("A", "G", "g1"; None where this rank lacks
        one), averaged across ranks in one all-reduce and stacked per bucket this rank holds."""
        tensors: list[Tensor | None] = []
        shapes: list[tuple[int, ...]] = []
        for layouts, stats in zip(self.layouts, per_layer):
            for kind in kinds:
                tensors.append(stats[kind])
                shapes.append(statistic_shape(kind, *layouts))
        like = torch.zeros((), device=self.layers[0].weight.device)
        averaged = self.communicator.average_partial(tensors, shapes, like)
        per_kind = {kind: averaged[k :: len(kinds)] for k, kind in enumerate(kinds)}
        return [BucketStatistics.stacked(bucket, per_kind, like) for bucket in buckets]

    def agree_overflow(self, overflow: Tensor) -> None:
        """DDP's gradients are all-reduced already: every rank found the same."""

    # ------------------------------------------------------------------------- decompositions

    def decompose(
        self,
        due: list[tuple[ShapeBucket, int]],
        damping: float,
        damping_mode: str,
    ) -> None:
        """Decompose the (bucket, row) pairs due, in layer order: each rank its share by cost,
        then one collective gives every rank all of them."""
        costs = [layouts_cost(b.layout_A, b.layout_G) for b, _ in due]
        owners = assign_layers(costs, self.communicator.world_size)
        rank = self.communicator.rank
        self.decomposed_by_rank = [b.indices[r] for (b, r), o in zip(due, owners) if o == rank]
        shared, owned = [], []
        for bucket in {id(b): b for b, _ in due}.values():
            rows = [r for (b, r), o in zip(due, owners) if b is bucket]
            mine = [r for (b, r), o in zip(due, owners) if b is bucket and o == rank]
            if mine:
                bucket.decompose(mine, damping, damping_mode)
            bucket.mark_ready(rows)
            if self.communicator.active:
                for key in EigenPreconditioner.STATE_KEYS:
                    for row in rows:
                        shared.append(bucket.state[key][row])
                        owned.append(row in mine)
        self.communicator.share_owned(shared, owned)

    # ---------------------------------------------------------------------- gradients, updates

    def gradient_matrices(self) -> list[Tensor | None]:
        """Every layer's gradient as one out x in' matrix (None where it got none)."""
        return [layer.grad_matrix() for layer in self.layers]

    def weight_norms(self) -> Tensor:
        """||W|| of every layer's weight, one fp32 vector (what bounds the output graft)."""
        return torch.stack([weight_norm(layer.weight) for layer in self.layers])

    def parameter_updates(
        self, pairs: Directions, scale: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(tensors to update, directions) from each layer's direction matrix: split into
        weight and bias (views) and scaled by the KL clip in one foreach call."""
        targets, directions = [], []
        for index, direction in pairs:
            layer = self.layers[index]
            for param, update in zip(layer.params, layer.split_matrix(direction)):
                targets.append(param)
                directions.append(update)
        return targets, scaled_directions(directions, scale)

    # ----------------------------------------------------------------------------- directions

    def share_directions(
        self, steps: list[BucketStep], gradients: list[Tensor | None]
    ) -> tuple[Directions, dict[str, Tensor], Tensor]:
        """(layer index, direction) for every layer with a gradient, the per-layer FOP
        statistics, and sum_l <n_l, g_l> (the KL clip's quadratic term)."""
        vg = direction_dot_gradient(steps)
        pairs = [pair for s in steps for pair in s.directions()]
        return pairs, step_statistics(steps) if steps else {}, vg


def scaled_directions(directions: list[Tensor], scale: Tensor | None) -> list[Tensor]:
    """The directions times the KL clip's ``scale`` (one foreach call), or as they are."""
    if scale is None or not directions:
        return directions
    return list(torch._foreach_mul(directions, scale))


def direction_dot_gradient(steps: list[BucketStep]) -> Tensor:
    """sum_l <n_l, g_l> over the steps' layers: the KL clip's quadratic term."""
    return sum((inner(s.direction, s.g_avg).sum() for s in steps), torch.zeros(()))


def weight_norm(tensor: Tensor) -> Tensor:
    """The 2-norm of the entries of ``tensor`` (this rank's, for a shard), in fp32."""
    return torch.linalg.vector_norm(tensor.detach().float())

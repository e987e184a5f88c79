"""Who holds, decomposes and computes what across ranks: one class per kind of parallelism.

The rest of FOP never asks which parallelism it runs under; it asks its distributor, chosen
once (when the optimizer is built, or when ``fully_shard`` is first seen):

- ``ReplicatedDistributor``: one process, or DDP. Every rank holds every layer's curvature and
  gradient; the decompositions due at a refresh are split across ranks by cost and shared in
  one collective, and every rank computes every direction.
- ``ShardedDistributor``: FSDP2. Each layer's curvature lives on one owner (fixed, balanced by
  decomposition cost), so optimizer memory falls as 1 / world size; the owner decomposes and
  computes its layers' directions, and one summing all-reduce gives every rank all of them.

Both average the hooks' statistics the same way: one all-reduce over whatever this step sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_fop.blocks import Blocking
from hf_fop.bucket import ShapeBucket
from hf_fop.bucket_data import (
    SCALARS,
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
from hf_fop.sharding import full_tensor, is_sharded, local_rows, local_tensor

# Layer index -> its direction (before the learning rate), for every layer with a gradient.
Directions = list[tuple[int, Tensor]]


class ReplicatedDistributor:
    """One process or DDP: every rank holds everything (module docstring)."""

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
                        shared.append(bucket.decomposition[key][row])
                        owned.append(row in mine)
        self.communicator.share_owned(shared, owned)

    # ---------------------------------------------------------------------- gradients, updates

    def gradient_matrices(self) -> list[Tensor | None]:
        """Every layer's gradient as one out x in' matrix (None where it got none)."""
        return [layer.grad_matrix() for layer in self.layers]

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
        return targets, _scaled(directions, scale)

    # ----------------------------------------------------------------------------- directions

    def share_directions(
        self, steps: list[BucketStep], gradients: list[Tensor | None]
    ) -> tuple[Directions, dict[str, Tensor], Tensor]:
        """(layer index, direction) for every layer with a gradient, the per-layer FOP
        statistics, and sum_l <n_l, g_l> (the KL clip's quadratic term)."""
        vg = _direction_dot_gradient(steps)
        pairs = [pair for s in steps for pair in s.directions()]
        return pairs, step_statistics(steps) if steps else {}, vg


class ShardedDistributor(ReplicatedDistributor):
    """FSDP2: each layer's curvature on one owner (module docstring)."""

    sharded = True

    def _owners(self) -> list[int]:
        costs = [layouts_cost(*layouts) for layouts in self.layouts]
        return assign_layers(costs, self.communicator.world_size)

    def gradient_matrices(self) -> list[Tensor | None]:
        """Every layer's whole gradient matrix: gathered from the shards (a collective; every
        rank gathers the same layers in the same order)."""
        return [layer.grad_matrix(full_tensor) for layer in self.layers]

    def parameter_updates(
        self, pairs: Directions, scale: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(this rank's shards, their rows of the directions): each rank updates its own rows."""
        targets, directions = super().parameter_updates(pairs, None)
        directions = [local_rows(d, p) for d, p in zip(directions, targets)]
        return [local_tensor(p) for p in targets], _scaled(directions, scale)

    def agree_overflow(self, overflow: Tensor) -> None:
        """Each rank checked its own shards: all must agree to skip."""
        self.communicator.all_reduce_mean([overflow])

    def decompose(
        self,
        due: list[tuple[ShapeBucket, int]],
        damping: float,
        damping_mode: str,
    ) -> None:
        """The owner decomposes its own layers (all this rank's buckets hold); nothing is shared."""
        self.decomposed_by_rank = sorted(b.indices[r] for b, r in due)
        for bucket in {id(b): b for b, _ in due}.values():
            bucket.decompose([r for b, r in due if b is bucket], damping, damping_mode)

    def share_directions(
        self, steps: list[BucketStep], gradients: list[Tensor | None]
    ) -> tuple[Directions, dict[str, Tensor], Tensor]:
        """Each owner computed only its layers: one summing all-reduce gives every rank every
        direction (zeros elsewhere), the statistics and the sum."""
        vg = _direction_dot_gradient(steps)
        computed = {
            index: (matrix, [s.scalar(k)[j] for k in SCALARS])
            for s in steps
            for j, (index, matrix) in enumerate(s.directions())
        }
        like = self.layers[0].weight
        tensors, owned, present = [], [], []
        for index, grad in enumerate(gradients):
            if grad is None:
                continue
            present.append(index)
            matrix, scalars = computed.get(index, (None, None))
            mine = matrix is not None
            tensors.append(matrix if mine else grad.new_zeros(grad.shape, dtype=torch.float32))
            tensors.append(torch.stack(scalars) if mine else grad.new_zeros(len(SCALARS)))
            owned += [mine, mine]
        vg = vg.reshape(1).to(like.device, torch.float32)
        self.communicator.share_owned([*tensors, vg], [*owned, True])  # vg: summed over ranks
        pairs = list(zip(present, tensors[0::2]))
        scalars = torch.stack(tensors[1::2]) if present else torch.zeros(0, len(SCALARS))
        statistics = {k: scalars[:, i] for i, k in enumerate(SCALARS)}
        if present:
            statistics["rho_abs"] = statistics["rho"].abs()
        return pairs, statistics, vg.reshape(())


Distributor = ReplicatedDistributor


def make_distributor(
    layers: Sequence[LayerAdapter], communicator: Communicator, blocking: Blocking | None = None
) -> Distributor:
    """The distributor for how ``layers`` are held now (sharded by FSDP2 or not)."""
    if any(is_sharded(layer.weight) for layer in layers):
        return ShardedDistributor(layers, communicator, blocking)
    return ReplicatedDistributor(layers, communicator, blocking)


def _scaled(directions: list[Tensor], scale: Tensor | None) -> list[Tensor]:
    if scale is None or not directions:
        return directions
    return list(torch._foreach_mul(directions, scale))


def _direction_dot_gradient(steps: list[BucketStep]) -> Tensor:
    return sum((inner(s.direction, s.g_avg).sum() for s in steps), torch.zeros(()))

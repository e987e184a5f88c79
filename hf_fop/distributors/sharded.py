"""FSDP2: each layer's curvature on one owner, and the parameters as DTensors sharded on dim 0.

FOP preconditions whole weight matrices, while FSDP2 (``torch.distributed.fsdp.fully_shard``)
leaves each rank the rows ``torch.chunk(weight, world_size)[rank]`` of every parameter and of
its gradient. So ``ShardedDistributor`` gathers each preconditioned layer's full gradient, lets
the rank that owns the layer's curvature (fixed, balanced by decomposition cost, so optimizer
memory falls as 1 / world size) compute the direction, shares the directions in one summing
all-reduce, and each rank writes its own rows back. The tensor helpers below are no-ops on plain
tensors, so the AdamW side runs one code path on shards and whole tensors alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hf_fop.bucket import ShapeBucket
from hf_fop.bucket_data import SCALARS, BucketStep
from hf_fop.distributed import assign_layers, layouts_cost
from hf_fop.distributors.replicated import (
    Directions,
    ReplicatedDistributor,
    direction_dot_gradient,
    scaled_directions,
    weight_norm,
)

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch has no FSDP2
    DTensor, Shard = (), None


def is_sharded(tensor: Tensor | None) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard, in place-updatable (the tensor itself when not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(full: Tensor, like: Tensor) -> Tensor:
    """The rows of ``full`` that this rank holds of ``like`` (FSDP2's Shard(0) layout)."""
    if not isinstance(like, DTensor):
        return full
    if len(like.placements) != 1 or like.placements[0] != Shard(0):
        raise ValueError(
            f"FOP supports parameters sharded on dim 0 over one mesh dimension (FSDP2's "
            f"fully_shard), got placements {like.placements}"
        )
    mesh = like.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else full[:0]


def follow_sharded_parameters(
    groups: list[dict[str, Any]],
    model: nn.Module,
    names: dict[int, str],
    state: dict[Tensor, Any],
) -> None:
    """Point param groups built before ``fully_shard`` at the model's new (DTensor) parameters,
    found by name; parameters that already have state are left alone."""
    for group in groups:
        group["params"] = [
            model.get_parameter(names[id(p)]) if id(p) in names and not state.get(p) else p
            for p in group["params"]
        ]


def local_gradients(groups: list[dict[str, Any]]) -> list[Tensor]:
    """Every gradient in ``groups``, as this rank holds it (its shard under FSDP2)."""
    return [local_tensor(p.grad) for g in groups for p in g["params"] if p.grad is not None]


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
        return [local_tensor(p) for p in targets], scaled_directions(directions, scale)

    def weight_norms(self) -> Tensor:
        """||W|| of every layer's weight from the shards' sums of squares (one all-reduce;
        FSDP2's Shard(0) splits the entries, so their squares add up)."""
        norms = [weight_norm(local_tensor(layer.weight)) for layer in self.layers]
        squares = torch.stack(norms).square()
        self.communicator.all_reduce_mean([squares])
        return (squares * self.communicator.world_size).sqrt()

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
        vg = direction_dot_gradient(steps)
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

"""FSDP2 parameters (DTensors sharded on dim 0): the full tensor, and this rank's rows of it.

FOP preconditions whole weight matrices, while FSDP2 (``torch.distributed.fsdp.fully_shard``)
leaves each rank the rows ``torch.chunk(weight, world_size)[rank]`` of every parameter and of
its gradient. FOP therefore gathers each preconditioned layer's full gradient, lets the rank that
owns the layer's curvature compute the direction, shares the directions, and each rank writes
its own rows back. Everything here is a no-op on plain tensors, so one code path serves both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

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

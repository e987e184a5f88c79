"""Data-parallel collectives of FOP: one communicator object over torch.distributed.

Under DDP (accelerate, the Trainer, torchrun) every rank holds the averaged gradient; FOP adds
one bucketed all-reduce per step (g1 of every layer, and the new factor estimates on curvature
steps) and, on inverse steps, one collective that shares the decompositions, each computed by
the rank that owns the layer. Every rank then applies the same update. With one process, or
without torch.distributed, every call is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from hf_fop.blocks import BlockLayout


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each layer: largest first, each to the least-loaded rank (LPT scheduling)."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def decomposition_cost(in_dim: int, out_dim: int, block_size: int | None = None) -> float:
    """Work of decomposing the two factors of an (out x in) layer blocked by ``block_size``."""
    sides = (BlockLayout.for_side(dim, block_size) for dim in (in_dim, out_dim))
    return layouts_cost(*sides)


def layouts_cost(*layouts: BlockLayout) -> float:
    """Work of decomposing factors of these layouts: eigh and inverse are cubic (in each
    block, where a factor is blocked)."""
    return sum(layout.count * float(layout.size) ** 3 for layout in layouts)


class Communicator:
    """The process group FOP talks over; inert outside torch.distributed."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        # Wall seconds spent in FOP's own collectives (benchmarks read it).
        self.seconds = 0.0
        self.calls = 0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    @property
    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    def all_reduce_mean(self, tensors: Sequence[Tensor]) -> None:
        """Average the tensors across ranks in place, with one flat fp32 all-reduce."""
        if not self.active or not tensors:
            return
        with self._timed():
            flat = torch.cat([t.reshape(-1).float() for t in tensors])
            dist.all_reduce(flat, group=self.group)
            flat /= self.world_size
            _unflatten_into(flat, tensors)

    def average_partial(
        self, tensors: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]], like: Tensor
    ) -> list[Tensor | None]:
        """Average per-layer statistics that some ranks may lack (a layer that did not run).

        Every rank sends every tensor (zeros where absent) plus a presence flag each, in one
        fp32 all-reduce; a tensor present on k ranks is their mean, absent everywhere is None.
        Outside torch.distributed the tensors come back as they are.
        """
        if not self.active:
            return list(tensors)
        filled = [
            t.float() if t is not None else like.new_zeros(shape, dtype=torch.float32)
            for t, shape in zip(tensors, shapes)
        ]
        present = torch.tensor(
            [float(t is not None) for t in tensors], device=like.device, dtype=torch.float32
        )
        with self._timed():
            flat = torch.cat([present] + [t.reshape(-1) for t in filled])
            dist.all_reduce(flat, group=self.group)
            _unflatten_into(flat, [present, *filled])
        if all(t is not None for t in tensors):
            # Present here, so present somewhere: the host needs no flag, nothing waits.
            return [t / share for t, share in zip(filled, present.unbind())]
        # A layer missing here may be missing everywhere: the host reads the flags (one sync)
        # to decide which layers update.
        shares = present.tolist()
        return [t / share if share > 0 else None for t, share in zip(filled, shares)]

    def share_owned(self, tensors: Sequence[Tensor], owned: Sequence[bool]) -> None:
        """Give every rank the owners' values: non-owners hold zeros, one summing all-reduce."""
        if not self.active or not tensors:
            return
        with self._timed():
            flat = torch.cat(
                [
                    t.reshape(-1).float() if mine else t.new_zeros(t.numel()).float()
                    for t, mine in zip(tensors, owned)
                ]
            )
            dist.all_reduce(flat, group=self.group)
            _unflatten_into(flat, tensors)


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count

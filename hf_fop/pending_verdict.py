"""Whether the last step was taken, learned without stalling the device.

A step whose gradients or statistics are not finite must change nothing. Deciding that on the
host would make every step wait for the device. Instead each update of the step is masked on
the device by a flag, and the host reads the flag later: at once where that is free (the CPU,
or a device that has already got there), else from a pinned copy when the next step starts,
waiting only for the step the flag belongs to. Only the host's own bookkeeping (the step count,
the factor updates, which layers have a decomposition) is put back then, if the step was
skipped; everything on the device was never changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class PendingVerdict:
    """The flags of the last step ([ok, ...], mixed_precision.step_verdict) until read, with
    what to do on the host if the step turns out skipped."""

    def __init__(self) -> None:
        self._flags: Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self._undo: Callable[[list[float]], None] | None = None

    @property
    def pending(self) -> bool:
        return self._flags is not None

    def record(self, flags: Tensor, undo: Callable[[list[float]], None]) -> None:
        """Hold the step's ``flags``; ``undo(flags)`` runs if ``ok`` (the first) reads 0."""
        self._ready = None
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            flags = host
        self._flags, self._undo = flags, undo

    def known(self) -> bool:
        """Whether reading the flags now would not wait for the device."""
        if self._flags is None:
            return True
        if self._ready is not None:
            return self._ready.query()
        return self._flags.device.type == "cpu"

    def settle(self) -> bool:
        """Read the flags (waiting for their step only, if need be) and undo a skipped step's
        host bookkeeping. Returns whether the step was skipped."""
        if self._flags is None or self._undo is None:
            return False
        flags, ready, undo = self._flags, self._ready, self._undo
        self._flags = self._ready = self._undo = None
        if ready is not None:
            ready.synchronize()
        values = flags.tolist()
        if not values[0]:
            undo(values)
        return not values[0]

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
        self._last_taken: bool | None = None  # what the last settled step turned out

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
            self._ready.record(torch.cuda.current_stream(flags.device))  # where the copy runs
            flags = host
        self._flags, self._undo = flags, undo

    def known(self) -> bool:
        """Whether reading the flags now would not wait for the device."""
        if self._flags is None:
            return True
        if self._ready is not None:
            return self._ready.query()
        return self._flags.device.type == "cpu"

    def peek(self) -> bool | None:
        """Whether the last step was taken, if that can be read without waiting (else None)."""
        if self._flags is None:
            return self._last_taken
        if not self.known():
            return None
        return bool(self._flags[0].item())

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
        self._last_taken = bool(values[0])
        if not values[0]:
            undo(values)
        return not values[0]


class DecidedAtFirstUse:
    """A bool the hooks read during the next backward: ``if_taken`` if the pending step turns
    out taken, ``if_skipped`` if not, both (``or``) while that is still unknown. Deciding as
    late as that, a device that has finished the last step by then costs no extra work."""

    def __init__(self, verdict: PendingVerdict, if_taken: bool, if_skipped: bool) -> None:
        self._verdict, self._if_taken, self._if_skipped = verdict, if_taken, if_skipped
        self._value: bool | None = None

    def __bool__(self) -> bool:
        if self._value is None:
            taken = self._verdict.peek()
            either = self._if_taken or self._if_skipped
            self._value = (
                either if taken is None else (self._if_taken if taken else self._if_skipped)
            )
        return self._value

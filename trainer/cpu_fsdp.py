"""FSDP2 through accelerate on CPU processes, for trying a sharded setup without GPUs.

accelerate turns an FSDP plugin on only for accelerator backends: on CPU processes (gloo) it
keeps ``MULTI_CPU`` and drops the plugin without a word, so a run meant to be sharded trains
unsharded. Its FSDP2 preparation itself (``fully_shard`` over a device mesh, DCP checkpoints)
runs on CPU all the same; :func:`allow_fsdp_on_cpu` lets it. The project's trainer calls it on
machines without an accelerator when FSDP is asked for (``trainer/accelerate/
fsdp2_cpu_2proc.yaml``, or ``--fsdp``); on GPUs nothing here is used.
"""

from __future__ import annotations

import functools
from typing import Any

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu() -> None:
    """Make accelerate apply an FSDP plugin it is given to CPU processes too (idempotent).
    Call before the Accelerator (or the Trainer) is created."""
    init = AcceleratorState.__init__
    if getattr(init, "_hf_fop_cpu_fsdp", False):
        return

    @functools.wraps(init)
    def patched(self: AcceleratorState, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    patched._hf_fop_cpu_fsdp = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = patched  # type: ignore[method-assign]

"""The parameter updates after the directions are known, on torch.optim's own kernels.

- The AdamW side (embeddings, norms, heads) is torch's functional ``adamw``, with torch's state
  keys (``step``, ``exp_avg``, ``exp_avg_sq``), so it is AdamW by construction.
- The preconditioned layers' directions already hold the momentum (taken before the
  preconditioner): their update is AdamW's decoupled decay and the step, as foreach ops.

A step that must not happen (non-finite gradients) is decided on the device: torch's fused
AdamW takes the flag as ``found_inf``; the preconditioned directions are zeros where the flag is
false and the decay is masked by it. Nothing here waits for the device, on the devices torch
has fused kernels for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_fused_kernels_supported_devices

logger = logging.getLogger("hf_fop")


def adamw_state(param: Tensor) -> dict[str, Tensor]:
    """The state a parameter of an AdamW group gets at its first step: zeros shaped (and,
    under FSDP2, sharded) like the parameter; starting from it is the same as starting without
    it. The FOP group's parameters keep none: their momentum lives in the buckets."""
    return {  # the step count on the parameter's device, as torch's fused AdamW keeps it
        "step": torch.zeros((), dtype=torch.float32, device=param.device),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def take_empty_step(groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Any]]) -> None:
    """A step whose batch reached nothing changes nothing but creates what the first step
    creates, as torch's optimizers do on zero gradients: torch.distributed.checkpoint runs such
    a step at lr 0 to build the state it loads into (quietly, then)."""
    for group in groups:
        if group["kind"] != "adamw":
            continue
        for param in group["params"]:
            if param.requires_grad and not state.get(param):
                state[param].update(adamw_state(param))
    if any(float(g["lr"]) != 0 for g in groups):
        logger.warning("FOP skipped a step: its batch was empty (nothing changed)")


def _fused(tensors: list[Tensor]) -> bool:
    """Whether torch's fused kernels (which take an overflow flag) serve these tensors. They
    read memory as contiguous (the CPU kernel misreads a strided view), so views do not."""
    devices = _get_fused_kernels_supported_devices()
    return all(
        t.device.type in devices and t.is_floating_point() and t.is_contiguous() for t in tensors
    )


def _found_inf(ok: Tensor | None, fused: bool) -> tuple[bool, Tensor | None]:
    """(skip now, the ``found_inf`` flag a fused kernel takes) for the device flag ``ok``:
    where no fused kernel takes the flag, it is read (a host synchronisation)."""
    if ok is None:
        return False, None
    if fused:
        return False, (~ok).to(torch.float32)
    return not bool(ok), None


def adamw_step(
    group: dict[str, Any],
    state: dict[Tensor, dict[str, Any]],
    ok: Tensor | None = None,
    local: Callable[[Tensor], Tensor] = lambda tensor: tensor,
) -> None:
    """One AdamW step for the parameters of ``group`` that have gradients; none at all, on the
    device, where the flag ``ok`` is false (torch's fused kernel reads it there). ``local``:
    the part of a tensor this rank updates (its shard under FSDP2; the distributors')."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    for param in params:
        if not state[param]:
            state[param].update(adamw_state(param))
        elif state[param]["step"].device != param.device:  # a checkpoint of CPU step counts
            state[param]["step"] = state[param]["step"].to(param.device, torch.float32)
    locals_ = [
        [local(t) for t in tensors]
        for tensors in (
            params,
            [p.grad for p in params],
            [state[p]["exp_avg"] for p in params],
            [state[p]["exp_avg_sq"] for p in params],
        )
    ]
    fused = _fused([t for tensors in locals_ for t in tensors])
    skip, found_inf = _found_inf(ok, fused)
    if skip:
        return
    beta1, beta2 = group["betas"]
    adamw(
        *locals_,
        [],
        [state[p]["step"] for p in params],
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
        fused=fused or None,
        found_inf=found_inf,
    )


def preconditioned_step(
    targets: list[Tensor], directions: list[Tensor], group: dict[str, Any], ok: Tensor
) -> None:
    """p <- p (1 - lr weight_decay) - lr d: AdamW's decoupled decay and the step, on the
    preconditioned layers' directions ``d`` (the momentum came before the preconditioner).
    Where the device flag ``ok`` is false nothing changes (the directions are zeros then).

    ``targets`` are the tensors updated (each parameter, or its local shard under FSDP2)."""
    if not targets:
        return
    lr, weight_decay = group["lr"], group["weight_decay"]
    if weight_decay:
        torch._foreach_mul_(targets, torch.where(ok, 1 - lr * weight_decay, 1.0))
    torch._foreach_add_(targets, directions, alpha=-lr)

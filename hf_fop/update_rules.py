"""The parameter updates after the directions are known, on torch.optim's own kernels.

- The AdamW side (embeddings, norms, heads) is torch's functional ``adamw``, with torch's state
  keys (``step``, ``exp_avg``, ``exp_avg_sq``), so it is AdamW by construction.
- Raw natural-gradient directions (``graft="none"``) take torch's functional ``sgd``: heavy-ball
  momentum with the weight decay added to the direction, K-FAC practice
  (``momentum_buffer``).
- Grafted (AdamW-sized) directions take AdamW's rules without its normalisation: a bias-corrected
  moving average of the direction (``exp_avg``) and decoupled weight decay, as foreach ops.

A step that must not happen (non-finite gradients) is decided on the device: torch's fused
AdamW and SGD take the flag as ``found_inf``; the grafted rule moves its moment toward itself
and adds it times the flag, which is the unmasked arithmetic where the step is taken. Nothing
here waits for the device, on the devices torch has fused kernels for.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from torch.optim.sgd import sgd

from hf_fop.layers import LayerAdapter
from hf_fop.sharding import local_rows, local_tensor

logger = logging.getLogger("hf_fop")

# The moment each preconditioned parameter keeps, by graft: (state key, dtype; None: the
# parameter's). Grafted moments are fp32 whatever the parameter's precision.
FOP_MOMENTS: dict[str, tuple[str, torch.dtype | None]] = {
    "adamw": ("exp_avg", torch.float32),
    "output": ("exp_avg", torch.float32),
    "none": ("momentum_buffer", None),
}


def initial_state(
    group: dict[str, Any], param: Tensor, graft: str, momentum_after: bool = True
) -> dict[str, Tensor]:
    """The state a parameter of ``group`` gets at its first step: zeros shaped (and, under
    FSDP2, sharded) like the parameter. Starting from it is the same as starting without it.
    ``momentum_after=False``: the FOP group's momentum lives in its buckets (taken before the
    preconditioner), so its parameters keep none."""
    if group["kind"] == "adamw":
        return {  # the step count on the parameter's device, as torch's fused AdamW keeps it
            "step": torch.zeros((), dtype=torch.float32, device=param.device),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
    if not group["betas"][0] or not momentum_after:
        return {}
    key, dtype = FOP_MOMENTS[graft]
    return {key: torch.zeros_like(param, dtype=dtype)}


def initialise_state(
    groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    graft: str,
    momentum_after: bool = True,
) -> None:
    """What the first step creates, for every trainable parameter that lacks it."""
    for group in groups:
        for param in group["params"]:
            if param.requires_grad and not state.get(param):
                state[param].update(initial_state(group, param, graft, momentum_after))


def take_empty_step(
    groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    graft: str,
    momentum_after: bool = True,
) -> None:
    """A step whose batch reached nothing changes nothing but creates what the first step
    creates, as torch's optimizers do on zero gradients: torch.distributed.checkpoint runs such
    a step at lr 0 to build the state it loads into (quietly, then)."""
    initialise_state(groups, state, graft, momentum_after)
    if any(float(g["lr"]) != 0 for g in groups):
        logger.warning("FOP skipped a step: its batch was empty (nothing changed)")


def _moments(params: list[Tensor], state: dict[Tensor, dict[str, Any]], graft: str) -> list[Tensor]:
    """Each parameter's moment (created as ``initial_state`` does at first use), as the local
    tensors the kernels update; a zero momentum buffer gives the first step exactly what
    torch's fresh one does."""
    key, dtype = FOP_MOMENTS[graft]
    for param in params:
        if key not in state[param]:
            state[param][key] = torch.zeros_like(param, dtype=dtype)
    return [local_tensor(state[p][key]) for p in params]


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
    group: dict[str, Any], state: dict[Tensor, dict[str, Any]], ok: Tensor | None = None
) -> None:
    """One AdamW step for the parameters of ``group`` that have gradients; none at all, on the
    device, where the flag ``ok`` is false (torch's fused kernel reads it there)."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    for param in params:
        if not state[param]:
            state[param].update(initial_state(group, param, "adamw"))
        elif state[param]["step"].device != param.device:  # a checkpoint of CPU step counts
            state[param]["step"] = state[param]["step"].to(param.device, torch.float32)
    locals_ = [
        [local_tensor(t) for t in tensors]
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


def heavy_ball_step(
    params: list[Tensor],
    targets: list[Tensor],
    directions: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    ok: Tensor | None = None,
) -> None:
    """p -= lr * buf, buf = momentum * buf + (d + weight_decay * p): torch's SGD on ``d``, with
    the FOP group's lr, momentum (``betas[0]``) and weight decay; nothing where ``ok`` is false.

    ``targets`` are the tensors updated (each parameter, or its local shard under FSDP2);
    the state stays keyed by the parameters, shaped like them."""
    if not targets:
        return
    momentum = group["betas"][0]
    directions = [d.to(t.dtype).contiguous() for t, d in zip(targets, directions)]
    buffers = _moments(params, state, "none") if momentum else [None] * len(params)
    fused = _fused([*targets, *directions, *(b for b in buffers if b is not None)])
    skip, found_inf = _found_inf(ok, fused)
    if skip:
        return
    sgd(
        targets,
        directions,
        buffers,
        weight_decay=group["weight_decay"],
        momentum=momentum,
        lr=group["lr"],
        dampening=0.0,
        nesterov=False,
        maximize=False,
        fused=fused or None,
        found_inf=found_inf,
    )


def grafted_step(
    params: list[Tensor],
    targets: list[Tensor],
    directions: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    step: int,
    ok: Tensor,
    momentum: float | None = None,
) -> None:
    """AdamW's momentum and decoupled weight decay on AdamW-sized directions (fp32 moments),
    with the FOP group's settings (``momentum``, when given, instead of its own); ``step`` is
    1-based (the bias correction). Where the device flag ``ok`` is false nothing changes (the
    directions are zeros then).

    ``targets`` are the tensors updated (see ``heavy_ball_step``)."""
    if not targets:
        return
    lr, weight_decay = group["lr"], group["weight_decay"]
    momentum = group["betas"][0] if momentum is None else momentum
    if weight_decay:
        torch._foreach_mul_(targets, torch.where(ok, 1 - lr * weight_decay, 1.0))
    if not momentum:  # the directions are zeros where not ok
        torch._foreach_add_(targets, directions, alpha=-lr)
        return
    averages = _moments(params, state, "adamw")
    # Toward the direction where ok, toward itself (an exact no-op) where not; the same
    # arithmetic as the unmasked lerp and add otherwise.
    toward = torch._foreach_mul(averages, (~ok).to(torch.float32))
    torch._foreach_add_(toward, directions)
    torch._foreach_lerp_(averages, toward, 1 - momentum)
    kept = torch._foreach_mul(averages, ok.to(torch.float32))
    torch._foreach_add_(targets, kept, alpha=-lr / (1 - momentum**step))


def parameter_updates(
    layers: list[LayerAdapter], pairs: list[tuple[int, Tensor]], scale: Tensor | None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(parameters, tensors to update, directions) from each layer's direction matrix: split
    into weight and bias (views), cut to this rank's rows under FSDP2, scaled by the KL clip in
    one foreach call."""
    params, targets, directions = [], [], []
    for index, direction in pairs:
        layer = layers[index]
        for param, update in zip(layer.params, layer.split_matrix(direction)):
            params.append(param)
            targets.append(local_tensor(param))
            directions.append(local_rows(update, param))
    if scale is not None and directions:
        directions = list(torch._foreach_mul(directions, scale))
    return params, targets, directions

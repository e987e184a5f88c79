"""The parameter updates after the directions are known, on torch.optim's own kernels.

- The AdamW side (embeddings, norms, heads) is torch's functional ``adamw``, with torch's state
  keys (``step``, ``exp_avg``, ``exp_avg_sq``), so it is AdamW by construction (foreach or fused
  where torch picks them).
- Raw natural-gradient directions (``graft="none"``) take torch's functional ``sgd``: heavy-ball
  momentum with the weight decay added to the direction, K-FAC practice
  (``momentum_buffer``).
- Grafted (AdamW-sized) directions take AdamW's rules without its normalisation: a bias-corrected
  moving average of the direction (``exp_avg``) and decoupled weight decay, as foreach ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from hf_fop.layers import LayerAdapter
from hf_fop.sharding import local_rows, local_tensor


def initial_state(group: dict[str, Any], param: Tensor, graft: str) -> dict[str, Tensor]:
    """The state a parameter of ``group`` gets at its first step: zeros shaped (and, under
    FSDP2, sharded) like the parameter. Starting from it is the same as starting without it."""
    if group["kind"] == "adamw":
        return {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
    if not group["betas"][0]:
        return {}
    if graft == "adamw":  # fp32 whatever the parameter's precision
        return {"exp_avg": torch.zeros_like(param, dtype=torch.float32)}
    return {"momentum_buffer": torch.zeros_like(param)}


def adamw_step(group: dict[str, Any], state: dict[Tensor, dict[str, Any]]) -> None:
    """One AdamW step for the parameters of ``group`` that have gradients."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    for param in params:
        if not state[param]:
            state[param].update(initial_state(group, param, "adamw"))
    beta1, beta2 = group["betas"]
    adamw(
        params,
        [p.grad for p in params],
        [state[p]["exp_avg"] for p in params],
        [state[p]["exp_avg_sq"] for p in params],
        [],
        [state[p]["step"] for p in params],
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def heavy_ball_step(
    params: list[Tensor],
    targets: list[Tensor],
    directions: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """p -= lr * buf, buf = momentum * buf + (d + weight_decay * p): torch's SGD on ``d``.

    ``targets`` are the tensors updated (each parameter, or its local shard under FSDP2);
    the state stays keyed by the parameters, shaped like them."""
    if not targets:
        return
    directions = [d.to(t.dtype) for t, d in zip(targets, directions)]
    buffers: list[Tensor | None] = [None] * len(params)
    if momentum:
        for param in params:
            if "momentum_buffer" not in state[param]:
                # A zero buffer gives the first step exactly what torch's fresh one does.
                state[param]["momentum_buffer"] = torch.zeros_like(param)
        buffers = [local_tensor(state[p]["momentum_buffer"]) for p in params]
    sgd(
        targets,
        directions,
        buffers,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )


def grafted_step(
    params: list[Tensor],
    targets: list[Tensor],
    directions: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float,
    step: int,
) -> None:
    """AdamW's momentum and decoupled weight decay on AdamW-sized directions (fp32 moments).

    ``targets`` are the tensors updated (see ``heavy_ball_step``)."""
    if not targets:
        return
    if weight_decay:
        torch._foreach_mul_(targets, 1 - lr * weight_decay)
    if not momentum:
        torch._foreach_add_(targets, directions, alpha=-lr)
        return
    for param in params:
        if "exp_avg" not in state[param]:
            state[param]["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
    averages = [local_tensor(state[p]["exp_avg"]) for p in params]
    torch._foreach_lerp_(averages, directions, 1 - momentum)
    torch._foreach_add_(targets, averages, alpha=-lr / (1 - momentum**step))


def parameter_updates(
    layers: list[LayerAdapter], pairs: list[tuple[int, Tensor]], scale: Tensor | None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(parameters, tensors to update, directions) from each layer's direction matrix: split
    into weight and bias, scaled by the KL clip, cut to this rank's rows under FSDP2."""
    params, targets, directions = [], [], []
    for index, direction in pairs:
        layer = layers[index]
        if scale is not None:
            direction = direction * scale
        for param, update in zip(layer.params, layer.split_matrix(direction)):
            params.append(param)
            targets.append(local_tensor(param))
            directions.append(local_rows(update, param))
    return params, targets, directions

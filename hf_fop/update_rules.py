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


def adamw_step(group: dict[str, Any], state: dict[Tensor, dict[str, Any]]) -> None:
    """One AdamW step for the parameters of ``group`` that have gradients."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    for param in params:
        if not state[param]:
            state[param]["step"] = torch.tensor(0.0)
            state[param]["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state[param]["exp_avg_sq"] = torch.zeros_like(
                param, memory_format=torch.preserve_format
            )
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
    the state stays keyed by the parameters."""
    if not targets:
        return
    directions = [d.to(t.dtype) for t, d in zip(targets, directions)]
    buffers = [state[p].get("momentum_buffer") for p in params]
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
    if momentum:
        for param, buffer in zip(params, buffers):
            state[param]["momentum_buffer"] = buffer


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
    for param, direction in zip(params, directions):
        if "exp_avg" not in state[param]:
            state[param]["exp_avg"] = torch.zeros_like(
                direction, memory_format=torch.contiguous_format
            )
    averages = [state[p]["exp_avg"] for p in params]
    torch._foreach_lerp_(averages, directions, 1 - momentum)
    torch._foreach_add_(targets, averages, alpha=-lr / (1 - momentum**step))

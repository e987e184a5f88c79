"""The AdamW update for the parameters FOP does not precondition (embeddings, norms, heads).

Written out rather than delegating to torch.optim.AdamW so that its state lives in the FOP
optimizer's own state (one state_dict, one LR scheduler); a test checks it against torch's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adamw_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One decoupled-weight-decay Adam step (Loshchilov & Hutter), in place."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"].item()
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denominator = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denominator, value=-lr / bias_correction1)

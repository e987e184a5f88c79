"""Layer-wise grafting: the preconditioned direction with the step size of AdamW.

Natural-gradient steps have another size than Adam's, so a learning rate tuned for AdamW means
nothing to a raw K-FAC or FOP step. Grafting (Agarwal et al., 2020; Distributed Shampoo) keeps
each layer's preconditioned direction and gives it the norm of the step AdamW would take for
that layer. The user's AdamW learning rate, warmup and schedule then carry over unchanged.
Norms are per matrix, so a stack (layers, out, in) of one shape is grafted in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor


def adam_direction(
    grad: Tensor,
    exp_avg_sq: Tensor,
    beta2: float,
    eps: float,
    step: int,
    ok: Tensor | None = None,
    numerator: Tensor | None = None,
) -> Tensor:
    """g / (sqrt(v_hat) + eps): AdamW's step for this layer before momentum and the rate
    (``numerator`` / (sqrt(v_hat) + eps) where given: m_hat makes it AdamW's whole step).

    Updates the second-moment average ``exp_avg_sq`` in place (v = beta2 v + (1 - beta2) g^2;
    v_hat = v / (1 - beta2^step)), exactly as AdamW would; only where the device flag ``ok``
    is true, when given (a step that turns out skipped leaves it as it was).
    """
    updated = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    if ok is None:
        exp_avg_sq.copy_(updated)
    else:
        torch.where(ok, updated, exp_avg_sq, out=exp_avg_sq)
    denominator = (updated / (1 - beta2**step)).sqrt_().add_(eps)
    return (grad if numerator is None else numerator) / denominator


def adam_step_norm(
    grad: Tensor, exp_avg_sq: Tensor, beta2: float, eps: float, step: int, ok: Tensor | None = None
) -> Tensor:
    """||g / (sqrt(v_hat) + eps)|| per matrix (shape (..., 1, 1)): the size of AdamW's step."""
    direction = adam_direction(grad, exp_avg_sq, beta2, eps, step, ok)
    return torch.linalg.vector_norm(direction, dim=(-2, -1), keepdim=True)


def graft(direction: Tensor, norm: Tensor) -> Tensor:
    """Each matrix of ``direction`` rescaled to its ``norm`` (a zero matrix stays zero)."""
    size = torch.linalg.vector_norm(direction, dim=(-2, -1), keepdim=True)
    safe = torch.where(size > 0, size, torch.ones_like(size))
    return direction * torch.where(size > 0, norm / safe, torch.zeros_like(size))

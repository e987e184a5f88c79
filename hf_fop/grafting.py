"""Layer-wise grafting: the preconditioned direction with the step size of AdamW.

Natural-gradient steps have another size than Adam's, so a learning rate tuned for AdamW means
nothing to a raw K-FAC or FOP step. Grafting (Agarwal et al., 2020; Distributed Shampoo) keeps
each layer's preconditioned direction and gives it the norm of the step AdamW would take for
that layer. The user's AdamW learning rate, warmup and schedule then carry over unchanged.
Norms are per matrix, so a stack (layers, out, in) of one shape is grafted in one call.

``graft_output`` measures the two steps by what they do instead of by their entries: the change
of the layer's outputs, ||U a|| over the layer's inputs a, so tr(U A U^T) with K-FAC's factor
A = E[a a^T]. Adam in a Kronecker eigenbasis whitens the inputs: it spreads its step evenly over
input directions the data barely occupies, while AdamW's signs add up along the few directions
where the inputs of a trained network lie. At one learning rate the rotated step then changes
the outputs 3-10x less than AdamW's, which a fine-tuned model shows at once; grafted by output
change, the user's AdamW rate means the same for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hf_fop.blocks import BlockLayout, right_multiply


def update_adam_second_moment(exp_avg_sq: Tensor, grad: Tensor, beta2: float) -> Tensor:
    """v = beta2 v + (1 - beta2) g^2, AdamW's second moment, as a new tensor."""
    return exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_direction(
    numerator: Tensor, exp_avg_sq: Tensor, beta2: float, eps: float, step: int
) -> Tensor:
    """numerator / (sqrt(v_hat) + eps), v_hat = v / (1 - beta2^step) for the second moment v
    after this step's gradient: AdamW's step before the rate (``numerator`` = m_hat), or
    before momentum (the gradient)."""
    return numerator / (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)


def graft(direction: Tensor, adam: Tensor) -> Tensor:
    """Each matrix of ``direction`` rescaled to the norm of AdamW's step ``adam`` (a zero
    matrix stays zero)."""
    norm = torch.linalg.vector_norm(adam, dim=(-2, -1), keepdim=True)
    size = torch.linalg.vector_norm(direction, dim=(-2, -1), keepdim=True)
    safe = torch.where(size > 0, size, torch.ones_like(size))
    return direction * torch.where(size > 0, norm / safe, torch.zeros_like(size))


def output_change(direction: Tensor, A: Tensor, layout: BlockLayout) -> Tensor:
    """tr(U A U^T) of each matrix U of a stack (shape (..., 1, 1)): the mean squared change of
    the layer's outputs under the step U, for inputs of second moment A (block-diagonal where
    ``layout`` blocks it)."""
    U = F.pad(direction, (0, layout.padded - layout.dim))
    return (right_multiply(U, A) * U).sum(dim=(-2, -1), keepdim=True)


def layer_graft(graft: str, factors_from_gradient: bool) -> str:
    """The graft a layer takes: "output" measures the step on the layer's input factor A, so a
    layer whose factors come from its gradient (an embedding, factor_source="gradient") has
    none and keeps its direction, and needs no AdamW second moment."""
    return "none" if graft == "output" and factors_from_gradient else graft


def graft_output(
    direction: Tensor,
    adam: Tensor,
    A: Tensor,
    layout: BlockLayout,
    largest_scale: Tensor | None = None,
) -> Tensor:
    """Each matrix of ``direction`` rescaled so that it changes the layer's outputs as much as
    AdamW's step ``adam`` does (a zero matrix stays zero), by at most ``largest_scale``."""
    wanted = output_change(adam, A, layout)
    own = output_change(direction, A, layout)
    scale = torch.where(own > 0, wanted / torch.where(own > 0, own, 1.0), 0.0).sqrt()
    if largest_scale is not None:
        scale = torch.minimum(scale, largest_scale)
    return direction * scale


def trusted_scale(
    direction: Tensor, weight_norms: Tensor, lr: float, trust: float, unbounded: Tensor
) -> Tensor:
    """The largest factor the graft may apply to each matrix u of ``direction`` (shape
    (..., 1, 1)): max(1, trust ||W|| / (lr ||u||)), so that a grafted step lr ||u|| grows
    only up to ``trust`` of its layer's weight norm ||W||, and is never made smaller than the
    rotated step itself; inf where ``unbounded`` (a layer that started from zero, a LoRA B:
    no size of its own to compare with)."""
    size = lr * torch.linalg.vector_norm(direction, dim=(-2, -1), keepdim=True)
    largest = (trust * weight_norms / torch.where(size > 0, size, 1.0)).clamp(min=1.0)
    return torch.where(unbounded, torch.inf, largest)

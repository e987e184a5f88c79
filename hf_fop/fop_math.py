"""The FOP equations as pure functions on tensors.

Every function takes a layer's gradients as matrices and the damped Fisher F and its inverse as
linear operators. The same code therefore serves the dense reference (F built explicitly), the
Kronecker eigenbasis (both operators elementwise) and explicit Kronecker inverses.

Notation (Lu & Armour, AAAI-26): g_avg = (g1 + g2) / 2 is the batch gradient, g_diff = g1 - g2.
All scalars stay tensors, so nothing here waits on the device. Every function is batched: the
gradients may be stacks (..., out, in) of layers of one shape, and the scalars then have the
leading shape (...), so one call serves every layer of a shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

LinearOperator = Callable[[Tensor], Tensor]


class FOPDirection(NamedTuple):
    """A layer's FOP step before the learning rate, with the scalars worth logging."""

    direction: Tensor  # eta * n_comb
    beta: Tensor
    eta: Tensor
    # rho = D / sqrt(a E) in [-1, 1]: unlike beta it does not depend on the size of g_perp.
    rho: Tensor
    # Cosine between this direction and the K-FAC direction F^-1 g_avg (1 for K-FAC itself).
    kfac_cosine: Tensor


def inner(x: Tensor, y: Tensor) -> Tensor:
    """Frobenius inner product <x, y> of each matrix in a stack (shape (..., 1, 1)), in one
    pass over the two (no product tensor)."""
    dot = torch.linalg.vecdot(x.reshape(*x.shape[:-2], -1), y.reshape(*y.shape[:-2], -1))
    return dot[..., None, None]


def _scalar(x: Tensor) -> Tensor:
    """(..., 1, 1) -> (...): one value per layer."""
    return x.squeeze(-1).squeeze(-1)


def _safe_divide(numerator: Tensor, denominator: Tensor, valid: Tensor, fallback: float) -> Tensor:
    safe = torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, numerator / safe, torch.full_like(numerator, fallback))


def fisher_orthogonal_component(
    g_diff: Tensor, g_avg: Tensor, fisher_g_avg: Tensor
) -> tuple[Tensor, Tensor]:
    """g_perp = g_diff - s g_avg with s = <g_diff, F g_avg> / <g_avg, F g_avg>.

    Returns (g_perp, s); afterwards <g_avg, F g_perp> = 0.
    """
    denominator = inner(g_avg, fisher_g_avg)
    s = _safe_divide(inner(g_diff, fisher_g_avg), denominator, denominator > 0, 0.0)
    return torch.addcmul(g_diff, s, g_avg, value=-1.0), s


def fop_direction(
    g_avg: Tensor,
    g_diff: Tensor,
    fisher: LinearOperator,
    inverse_fisher: LinearOperator,
    zero_tol: float = 1e-10,
) -> FOPDirection:
    """The FOP step of one layer: eta * F^-1 (g_avg + beta g_perp).

    The projection uses F, the adaptive beta uses F^-1; with one metric for both, D would be 0 and
    FOP would reduce to K-FAC. beta * g_perp does not depend on the size of g_diff, so the cut-off
    for "no orthogonal signal" compares E with <g_diff, F^-1 g_diff>, never with a constant.
    """
    g_perp, s = fisher_orthogonal_component(g_diff, g_avg, fisher(g_avg))
    n_avg = inverse_fisher(g_avg)
    # F^-1 is linear, so F^-1 g_perp = F^-1 g_diff - s F^-1 g_avg (one product fewer).
    n_diff = inverse_fisher(g_diff)
    n_perp = torch.addcmul(n_diff, s, n_avg, value=-1.0)

    a = inner(g_avg, n_avg)
    D = inner(g_avg, n_perp)
    E = inner(g_perp, n_perp)
    # No orthogonal signal when g_perp is only a sliver of g_diff, or round-off next to g_avg
    # (halves equal up to rounding): beta * g_perp does not shrink with g_perp, so noise would
    # otherwise become a correction as large as a real one.
    has_signal = (zero_tol * inner(g_diff, n_diff) < E) & (zero_tol * a < E)
    beta = _safe_divide(D, E, has_signal, 0.0)  # argmin of J(b) = -b D + b^2 E / 2

    n_comb = torch.addcmul(n_avg, beta, n_perp)  # F^-1 g_comb, g_comb = g_avg + beta g_perp
    # F^-1 is symmetric, so <g_avg, n_perp> = <g_perp, n_avg> = D: the step factor's two inner
    # products follow from a, D and E (a sum of non-negative terms at beta = D / E).
    numerator = a + beta * D  # <g_avg, n_comb>
    denominator = numerator + beta * (D + beta * E)  # <g_comb, n_comb>
    eta = _safe_divide(numerator, denominator, denominator > 0, 1.0)
    rho = _safe_divide(D, torch.sqrt(a * E), has_signal & (a > 0), 0.0)
    norms = torch.sqrt(inner(n_comb, n_comb) * inner(n_avg, n_avg))
    cosine = _safe_divide(inner(n_comb, n_avg), norms, norms > 0, 1.0)
    return FOPDirection(n_comb.mul_(eta), *(_scalar(x) for x in (beta, eta, rho, cosine)))


def kfac_direction(g_avg: Tensor, inverse_fisher: LinearOperator) -> FOPDirection:
    """The K-FAC step F^-1 g_avg in the same form (beta = 0, eta = 1): the baseline."""
    zero = g_avg.new_zeros(g_avg.shape[:-2])
    one = torch.ones_like(zero)
    return FOPDirection(inverse_fisher(g_avg), zero, one, zero, one)


def eta_at_optimal_beta(rho: Tensor) -> Tensor:
    """eta = (1 + rho^2) / (1 + 3 rho^2): in [1/2, 1] because |rho| <= 1 (Cauchy-Schwarz)."""
    rho2 = rho * rho
    return (1 + rho2) / (1 + 3 * rho2)


def kl_clip_scale(vg: Tensor, lr: float, kl_clip: float) -> Tensor:
    """K-FAC's trust region over a group: nu = min(1, sqrt(kl_clip / (lr^2 vg))), where
    vg = sum_l <n_l, g_l> over the group's layers."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.clamp(torch.sqrt(kl_clip / (vg.abs() * lr**2).clamp(min=tiny)), max=1.0)

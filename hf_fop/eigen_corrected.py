"""An eigenvalue-corrected Kronecker metric, and a cheap refresh of its basis (pure functions).

K-FAC's metric in the Kronecker eigenbasis (Q_A, Q_G) is the product l_G,i * l_A,j: a rank-one
guess at the curvature there. EK-FAC (George et al., 2018) keeps the basis and replaces that
product by the running second moment of the gradient rotated into it,

    s = average of (Q_G^T g Q_A)^2   (elementwise, out x in),

and SOAP (Vyas et al., 2024) is the same idea with Adam's square root. Here the average is
taken over the two half-batch gradients g1, g2 that FOP has anyway, (r1^2 + r2^2) / 4 with
r_k = Q_G^T g_k Q_A (``update_rotated_second_moment``), and the metric is
m = s_hat^p + lambda (s_hat bias-corrected like Adam's second moment; p = 1 is EK-FAC's natural
gradient, p = 1/2 SOAP-style; lambda = damping * mean(s_hat^p) per layer in the relative mode,
as the Kronecker metric's damping is relative to its mean eigenvalue). The metric is diagonal in
the rotated basis, so FOP's scalars (projection with M, beta and eta with M^-1) stay elementwise
there and cost no matmuls beyond the rotations.

When the basis is refreshed, the moment is carried into the new one (``carry_second_moment``).
The basis itself may be refreshed by one power-iteration step and a QR factorisation, warm
started from the previous basis (SOAP's refresh): one matmul and one QR per factor instead of a
full ``eigh``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hf_fop.curvature import RotatedDiagonalPreconditioner, rotate, unrotate

__all__ = [
    "EigenCorrectedPreconditioner",
    "carry_second_moment",
    "cluster_mean",
    "clustered_second_moment",
    "corrected_metric",
    "power_qr_refresh",
    "rotate",
    "unrotate",
    "update_rotated_second_moment",
]


def update_rotated_second_moment(
    second_moment: Tensor,
    rotated_grad: Tensor,
    beta2: float,
    rotated_diff: Tensor | None = None,
    halves_agree: bool = False,
) -> Tensor:
    """s = beta2 s + (1 - beta2) x, as a new tensor.

    x = r^2 for the rotated batch gradient r. Given the rotated difference of the two halves'
    gradients, r_diff = r1 - r2, x = (r1^2 + r2^2) / 4 = r^2 / 2 + r_diff^2 / 8 instead. Each
    half carries twice the batch's noise variance, so where the gradient is noise x matches r^2
    in expectation (Adam's step size), and where it is signal x is r^2 / 2 (a step sqrt(2)
    longer). A coordinate whose halves disagree while their mean cancels (r^2 at round-off
    level, as in the null space of a fresh eigenbasis) gets a metric the size of the
    disagreement, so neither the step nor M^-1 g_diff (FOP's beta and correction) divides a
    round-off numerator by a round-off metric. ``halves_agree``: r_diff = 0 without the zeros.
    """
    sample = rotated_grad * rotated_grad
    if rotated_diff is not None:
        sample = sample.mul_(0.5).addcmul_(rotated_diff, rotated_diff, value=0.125)
    elif halves_agree:
        sample = sample.mul_(0.5)
    return second_moment.mul(beta2).add_(sample, alpha=1 - beta2)


def carry_second_moment(
    second_moment: Tensor, old_A: Tensor, old_G: Tensor, new_A: Tensor, new_G: Tensor
) -> Tensor:
    """The rotated second moment carried into a refreshed basis: (R_G o R_G) s (R_A o R_A)^T
    with R = Q_new^T Q_old (o: elementwise).

    A coordinate of the new basis is a mix of the old ones, g'_ij = sum_kl R_G,ik r_kl R_A,jl,
    so its expected square is the same mix of the old expected squares where those coordinates
    are uncorrelated (what a diagonal metric assumes anyway). It is exact for the reordering and
    sign flips a refresh brings, and it spreads the moment evenly over a cluster of nearly equal
    eigenvalues, whose eigenvectors ``eigh`` returns in an arbitrary rotation. Without it, every
    refresh would pair each coordinate's history with another direction.
    """
    mix_A = (new_A.mT @ old_A).square_()  # block by block where the bases are blocked
    mix_G = (new_G.mT @ old_G).square_()
    return unrotate(second_moment, mix_A, mix_G)


def corrected_metric(
    second_moment: Tensor,
    updates: int | Tensor,
    beta2: float,
    exponent: float,
    damping: float,
    damping_mode: str = "relative",
) -> Tensor:
    """m = s_hat^p + lambda: the damped metric per rotated coordinate (module docstring).

    ``updates`` (>= 1) moments went into ``second_moment``; the bias correction divides by
    1 - beta2^updates. ``damping_mode="absolute"`` adds ``damping`` itself (Adam's eps at
    p = 1/2 with identity bases).
    """
    # In place on the one new tensor: an embedding's moment is tens of MB, and each further
    # temporary of that size costs a CPU more to allocate than to compute.
    powered = (second_moment / (1 - beta2**updates)).clamp_(min=0).pow_(exponent)
    if damping_mode == "absolute":
        return powered.add_(damping)
    tiny = torch.finfo(torch.float32).tiny
    mean = powered.mean(dim=(-2, -1), keepdim=True).clamp(min=tiny)
    return powered.add_(damping * mean)


def cluster_mean(
    values: Tensor, eigvals: Tensor, block_size: int, gap: float, floor: float = 0.0
) -> Tensor:
    """The rows of ``values`` (..., n, m) averaged over each cluster of ``eigvals`` (..., n;
    ascending within each block of ``block_size``): a run of neighbours less than ``gap`` times
    their block's largest eigenvalue apart, or both below ``floor`` times it (the numerical null
    space, one cluster).

    An fp32 eigensolver resolves eigenvectors only where eigenvalues are further apart than its
    rounding (about 1e-7 of the largest); inside such a cluster, and above all in a factor's
    numerical null space, it returns an arbitrary rotation that the last bit of the factor
    decides. A per-coordinate quantity is then arbitrary too, while its mean over the cluster
    (the squared norm of the projection onto the cluster's span, over its size) is not.
    """
    n, m = values.shape[-2:]
    blocks = eigvals.unflatten(-1, (n // block_size, block_size))
    top = blocks.amax(dim=-1, keepdim=True)
    starts = torch.ones_like(blocks, dtype=torch.long)
    close = blocks.diff(dim=-1) < gap * top
    low = blocks < floor * top
    starts[..., 1:] = (~(close | (low[..., 1:] & low[..., :-1]))).long()
    cluster = starts.flatten(-2).cumsum(-1) - 1  # (..., n): each coordinate's cluster
    # One id per (layer, cluster); rows are contiguous, so index_add adds whole rows.
    layers = cluster.numel() // n
    ids = cluster.reshape(layers, n) + torch.arange(layers, device=values.device)[:, None] * n
    ids = ids.flatten()
    rows = values.reshape(layers * n, m)
    sums = torch.zeros_like(rows).index_add_(0, ids, rows)
    sizes = torch.zeros_like(rows[:, 0]).index_add_(0, ids, torch.ones_like(rows[:, 0]))
    return sums.div_(sizes.clamp_(min=1)[:, None]).index_select(0, ids).view_as(values)


def clustered_second_moment(
    second_moment: Tensor,
    eigvals_A: Tensor,
    eigvals_G: Tensor,
    block_sizes: tuple[int, int],
    gap: float,
    floor: float = 0.0,
) -> Tensor:
    """The rotated second moment (..., out, in) averaged over each pair of clusters of the two
    factors' eigenvalues (``cluster_mean`` along both sides; ``block_sizes``: (A's, G's)): the
    metric's values that do not depend on how rounding turned the eigenvectors inside a cluster.
    ``gap`` and ``floor`` 0 return the moment itself; a diagonal side (blocks of one: its basis
    is the identity, no rotation to pick) is left as it is."""
    shared = second_moment
    if gap == 0 and floor == 0:
        return shared
    if block_sizes[0] > 1:
        shared = cluster_mean(shared.mT, eigvals_A, block_sizes[0], gap, floor).mT
    if block_sizes[1] > 1:
        shared = cluster_mean(shared, eigvals_G, block_sizes[1], gap, floor)
    return shared


class EigenCorrectedPreconditioner(RotatedDiagonalPreconditioner):
    """M^-1 V = Q_G ((Q_G^T V Q_A) / m) Q_A^T for the metric m of ``corrected_metric``.

    Tensors may carry leading batch dimensions (a stack of layers of one shape).
    """

    STATE_KEYS = ("eigvecs_A", "eigvecs_G", "metric")

    def __init__(self, eigvecs_A: Tensor, eigvecs_G: Tensor, metric: Tensor) -> None:
        self.eigvecs_A, self.eigvecs_G, self.metric = eigvecs_A, eigvecs_G, metric


def power_qr_refresh(factor: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One warm-started power-iteration step on a symmetric PSD factor: (eigenvalue estimates,
    orthonormal basis), columns in ascending order of the estimates like ``eigh``'s.

    The previous basis's columns are first ordered by their Rayleigh quotients q^T F q, so the
    iteration keeps each column on the eigenvector it is closest to; the signs of the QR are
    fixed (R with a positive diagonal), so a converged basis stays put between refreshes.
    """
    # F Q serves both the Rayleigh quotients and, its columns reordered, the power step: one
    # d^3 product instead of two.
    product = factor @ basis
    estimates = (basis * product).sum(dim=-2)
    order = estimates.argsort(dim=-1, descending=True)
    # linalg.qr's Q and R's diagonal, bit for bit, without forming R: R is the reflectors'
    # upper triangle, and building it (triu) took 13-16% of the QR's time on a CPU.
    reflectors, tau = torch.geqrf(torch.gather(product, -1, order[..., None, :].expand_as(product)))
    signs = torch.sign(torch.diagonal(reflectors, dim1=-2, dim2=-1))
    q = torch.linalg.householder_product(reflectors, tau)
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)[..., None, :]
    eigvals = torch.einsum("...ij,...ik,...kj->...j", q, factor, q).clamp(min=0)
    ascending = eigvals.argsort(dim=-1)
    q = torch.gather(q, -1, ascending[..., None, :].expand_as(q))
    return torch.gather(eigvals, -1, ascending), q

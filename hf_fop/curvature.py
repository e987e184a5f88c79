"""Kronecker-factored curvature: running factors, robust decompositions, damped preconditioners.

A layer's Fisher is approximated by F = A (x) G, so F vec(V) = vec(G V A) for a gradient matrix V
(out x in). ``EigenPreconditioner`` holds the eigendecompositions of A and G: exact Tikhonov
damping, (A (x) G + lambda I)^-1, and the Kronecker eigenbasis in which the default metric
(eigen_corrected.py) is diagonal. FOP runs in that basis, where both Fisher products are
elementwise: 6 matmuls per layer against K-FAC's 4.

Damping convention. ``damping_mode="relative"`` (default): lambda = damping * mean(eig A) *
mean(eig G), the layer's mean Kronecker eigenvalue times ``damping``, so the split reads
(A + sqrt(damping) mean(eig A) I) (x) (G + sqrt(damping) mean(eig G) I). Multiplying A or G by
a constant then multiplies F^-1 by its inverse and leaves every direction unchanged; a damping
of 0.1 means the same in a CNN with G ~ 1e-1 as in a transformer whose fresh G is ~1e-13.
``"absolute"``: lambda = damping, the K-FAC papers' convention.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from hf_fop.blocks import BlockLayout, is_blocked, left_multiply, right_multiply
from hf_fop.fop_math import FOPDirection, fop_direction, kfac_direction

logger = logging.getLogger(__name__)


def running_factor_weight(updates: int, decay: float) -> float:
    """The weight of a Kronecker factor's next estimate in its moving average (a warm start).

    ``updates`` estimates came before this one. The k-th estimate gets weight
    max(1 - decay, 1 / k), so the average starts as the plain mean of the estimates seen so far
    and becomes an exponential average once 1 / k < 1 - decay. Starting from a fixed prior (an
    identity) instead would precondition with the prior for tens of curvature steps, which is
    plain normalised SGD and trains transformers slowly. A first estimate from fewer rows than
    the factor's size is rank-deficient, but the gradients of that batch lie in its range, and
    the damping is relative to the factor's mean eigenvalue, so nothing blows up.
    """
    return 1.0 if updates == 0 else max(1.0 - decay, 1.0 / (updates + 1))


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of symmetric PSD factors (..., d, d), in fp32.

    A stack of factors of one size is decomposed in one batched call. fp32 eigh fails on some
    factors (dead units give repeated zero eigenvalues): those are retried one by one in fp64,
    then with a small diagonal jitter, so a failure never becomes a NaN update.
    """
    matrix = (matrix + matrix.mT) / 2
    if matrix.dim() > 2:
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(matrix.float())
            if torch.isfinite(eigenvalues).all() and torch.isfinite(eigenvectors).all():
                return eigenvalues.clamp(min=0), eigenvectors
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            pass
        pairs = [symmetric_eigh(m) for m in matrix.reshape(-1, *matrix.shape[-2:])]
        eigenvalues = torch.stack([p[0] for p in pairs]).reshape(matrix.shape[:-1])
        return eigenvalues, torch.stack([p[1] for p in pairs]).reshape(matrix.shape)
    attempts = (torch.float32, torch.float64, None)
    for dtype in attempts:
        work = matrix.double() if dtype is None else matrix.to(dtype)
        if dtype is None:
            jitter = 1e-6 * torch.clamp(torch.trace(work) / work.shape[0], min=1e-12)
            work = work + jitter * torch.eye(work.shape[0], dtype=work.dtype, device=work.device)
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(work)
        except RuntimeError:
            continue
        if torch.isfinite(eigenvalues).all() and torch.isfinite(eigenvectors).all():
            if dtype is not torch.float32:
                logger.debug("eigh succeeded only in fp64 for a %d x %d factor", *matrix.shape)
            return eigenvalues.clamp(min=0).float(), eigenvectors.float()
    raise RuntimeError(
        "the eigendecomposition of a Kronecker factor failed in fp32 and fp64; the factor holds "
        "non-finite values. Check the model's activations (a loss scale that overflowed?)."
    )


def factor_eigh(factor: Tensor, layout: BlockLayout | None = None) -> tuple[Tensor, Tensor]:
    """``symmetric_eigh`` of a factor stack, block by block where ``layout`` is blocked; the
    eigenvalues then come flat, (..., count * size), laid out like the padded side."""
    eigenvalues, eigenvectors = symmetric_eigh(factor)
    return flat_eigenvalues(eigenvalues, layout), eigenvectors


def flat_eigenvalues(eigenvalues: Tensor, layout: BlockLayout | None) -> Tensor:
    """Per-block eigenvalues (..., count, size) of a blocked side as one (..., count * size)
    row, laid out like the padded side; whole sides' are that already."""
    return eigenvalues.flatten(-2) if layout is not None and layout.blocked else eigenvalues


def kronecker_damping(mean_A: Tensor, mean_G: Tensor, damping: float, damping_mode: str) -> Tensor:
    """lambda, added to every Kronecker eigenvalue l_G * l_A (see the module docstring)."""
    if damping_mode == "absolute":
        return torch.full_like(mean_A, damping)
    tiny = torch.finfo(torch.float32).tiny
    return damping * torch.clamp(mean_A * mean_G, min=tiny)


def rotate(matrix: Tensor, basis_A: Tensor, basis_G: Tensor) -> Tensor:
    """Q_G^T V Q_A: a gradient matrix (out x in) in the Kronecker basis (either basis may be
    block-diagonal, (..., count, size, size): blocks.py).

    A diagonal side (blocks of one) is not rotated: its basis is +-1 per coordinate, and every
    use of rotated coordinates (squares, ratios of two rotated quantities, rotating back) is
    blind to those signs, so skipping a vocabulary-sized pass changes no result.
    """
    if not _sign_only(basis_A, matrix):
        matrix = right_multiply(matrix, basis_A)
    return matrix if _sign_only(basis_G, matrix) else left_multiply(basis_G.mT, matrix)


def unrotate(matrix: Tensor, basis_A: Tensor, basis_G: Tensor) -> Tensor:
    """Q_G V Q_A^T: back from the Kronecker basis (a diagonal side untouched, as in rotate)."""
    if not _sign_only(basis_A, matrix):
        matrix = right_multiply(matrix, basis_A.mT)
    return matrix if _sign_only(basis_G, matrix) else left_multiply(basis_G, matrix)


def _sign_only(basis: Tensor, matrix: Tensor) -> bool:
    """A basis of blocks of one beside ``matrix``: +-1 per coordinate (or, in
    carry_second_moment's mixing, their squares, 1)."""
    return is_blocked(basis, matrix) and basis.shape[-1] == 1


class RotatedDiagonalPreconditioner:
    """F = Q diag(m) Q^T with Q = Q_A (x) Q_G: a metric ``m`` (out x in, > 0) that is diagonal
    in the Kronecker eigenbasis. Both Fisher products are elementwise there, so the FOP scalars
    cost no matmuls beyond rotating g_avg and g_diff in and the direction out. A subclass
    stores what it is built from as the attributes named in ``STATE_KEYS``.

    ``fop`` takes g_diff already rotated (``rotated_diff``) when the caller needed it anyway
    (the eigen-corrected metric's second moment), so it is rotated once per step.
    """

    STATE_KEYS: tuple[str, ...] = ()
    eigvecs_A: Tensor
    eigvecs_G: Tensor
    metric: Tensor

    def state(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in self.STATE_KEYS}

    def rotate(self, matrix: Tensor) -> Tensor:
        return rotate(matrix, self.eigvecs_A, self.eigvecs_G)

    def unrotate(self, matrix: Tensor) -> Tensor:
        return unrotate(matrix, self.eigvecs_A, self.eigvecs_G)

    def fisher(self, matrix: Tensor) -> Tensor:
        return self.unrotate(self.rotate(matrix) * self.metric)

    def inverse_fisher(self, matrix: Tensor) -> Tensor:
        return self.unrotate(self.rotate(matrix) / self.metric)

    def kfac(self, g_avg: Tensor) -> FOPDirection:
        metric = self.metric
        result = kfac_direction(self.rotate(g_avg), lambda m: m / metric)
        return result._replace(direction=self.unrotate(result.direction))

    def fop(
        self,
        g_avg: Tensor,
        g_diff: Tensor | None,
        zero_tol: float,
        rotated_diff: Tensor | None = None,
    ) -> FOPDirection:
        """``rotated_diff``: g_diff already in the eigenbasis (then ``g_diff`` is not read)."""
        # Rotations preserve inner products, so every FOP scalar is computed in the eigenbasis.
        if rotated_diff is None:
            assert g_diff is not None
            rotated_diff = self.rotate(g_diff)
        metric = self.metric
        result = fop_direction(
            self.rotate(g_avg),
            rotated_diff,
            fisher=lambda m: m * metric,
            inverse_fisher=lambda m: m / metric,
            zero_tol=zero_tol,
        )
        return result._replace(direction=self.unrotate(result.direction))


class EigenPreconditioner(RotatedDiagonalPreconditioner):
    """(A (x) G + lambda I)^-1 through A = Q_A diag(l_A) Q_A^T and G = Q_G diag(l_G) Q_G^T: the
    metric in the eigenbasis is l_G,i * l_A,j + lambda.

    Every tensor may carry leading batch dimensions: a stack of layers of one shape is then
    preconditioned by the same few batched matmuls.
    """

    STATE_KEYS = ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")

    def __init__(
        self,
        eigvals_A: Tensor,
        eigvecs_A: Tensor,
        eigvals_G: Tensor,
        eigvecs_G: Tensor,
        damping: float,
        damping_mode: str = "relative",
    ) -> None:
        self.eigvals_A, self.eigvecs_A = eigvals_A, eigvecs_A
        self.eigvals_G, self.eigvecs_G = eigvals_G, eigvecs_G
        self.damping = kronecker_damping(
            eigvals_A.mean(-1), eigvals_G.mean(-1), damping, damping_mode
        )[..., None, None]

    @property
    def metric(self) -> Tensor:  # type: ignore[override]
        """Kronecker eigenvalues of the damped Fisher, laid out like the rotated gradient (out x
        in). Computed where used, not kept: it would be as large as the layer's weights."""
        return self.eigvals_G[..., :, None] * self.eigvals_A[..., None, :] + self.damping

    @classmethod
    def from_factors(
        cls,
        A: Tensor,
        G: Tensor,
        damping: float,
        damping_mode: str = "relative",
        layouts: tuple[BlockLayout, BlockLayout] | None = None,
    ) -> EigenPreconditioner:
        """``layouts``: (A's, G's) where a factor may be block-diagonal (blocks.py)."""
        layout_A, layout_G = layouts or (None, None)
        return cls(*factor_eigh(A, layout_A), *factor_eigh(G, layout_G), damping, damping_mode)

    @classmethod
    def from_state(
        cls, state: dict[str, Tensor], damping: float, damping_mode: str = "relative"
    ) -> EigenPreconditioner:
        return cls(*(state[key] for key in cls.STATE_KEYS), damping, damping_mode)

    @staticmethod
    def state_shapes(layout_A: BlockLayout, layout_G: BlockLayout) -> dict[str, tuple[int, ...]]:
        return {
            "eigvals_A": (layout_A.padded,),
            "eigvecs_A": layout_A.factor_shape,
            "eigvals_G": (layout_G.padded,),
            "eigvecs_G": layout_G.factor_shape,
        }

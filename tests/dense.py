"""Dense references for the Kronecker-factored math: F = A (x) G built as a matrix."""

from __future__ import annotations

import torch
from torch import Tensor


def vec(matrix: Tensor) -> Tensor:
    """Column-stacking vec, so that vec(G V A) = (A (x) G) vec(V) for symmetric A."""
    return matrix.T.reshape(-1)


def unvec(vector: Tensor, rows: int) -> Tensor:
    return vector.reshape(-1, rows).T


def random_spd(size: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    x = torch.randn(size, 3 * size, dtype=dtype)
    return scale * (x @ x.T) / (3 * size)


def dense_fop(
    g_avg: Tensor, g_diff: Tensor, F: Tensor, zero_tol: float = 1e-10
) -> tuple[Tensor, float, float]:
    """The FOP step written straight from the paper's equations on vectors, with a dense F."""
    rows = g_avg.shape[0]
    u, w = vec(g_avg), vec(g_diff)
    F_inv = torch.linalg.inv(F)
    s = (w @ F @ u) / (u @ F @ u)
    perp = w - s * u
    D = u @ F_inv @ perp
    E = perp @ F_inv @ perp
    beta = (D / E).item() if zero_tol * (w @ F_inv @ w) < E else 0.0
    comb = u + beta * perp
    n_comb = F_inv @ comb
    eta = ((u @ n_comb) / (comb @ n_comb)).item()
    return unvec(eta * n_comb, rows), beta, eta


def block_diagonal(blocks: Tensor) -> Tensor:
    """The dense (..., k * b, k * b) matrix of a block-diagonal (..., k, b, b) stack."""
    if blocks.dim() == 3:
        return torch.block_diag(*blocks)
    return torch.stack([block_diagonal(b) for b in blocks])


FP32_EPS = torch.finfo(torch.float32).eps
# Round-off of a solve grows with the sums behind each entry: a factor of a few per side of
# the factors. A wrong solve (a missing damping, a transposed factor) is off by O(1).
SOLVE_SLACK = 16.0


def solve_tolerance(F: Tensor, slack: float = SOLVE_SLACK) -> float:
    """The norm-wise relative error an fp32 solve with F may make: slack * cond(F) * eps.

    Element-wise error is not bounded this way (a small entry of F^-1 b can lose every
    digit while the vector is right to round-off), so references are compared in norm.
    """
    eigenvalues = torch.linalg.eigvalsh(F.double())
    condition = (eigenvalues.max() / eigenvalues.min()).item()
    tolerance = slack * condition * FP32_EPS
    # A bound near 1 would accept any answer: the reference must be well enough conditioned.
    assert tolerance < 0.02, f"cond(F) = {condition:.3g} leaves the comparison without bite"
    return tolerance


def assert_solve_close(got: Tensor, want: Tensor, F: Tensor, slack: float = SOLVE_SLACK) -> None:
    """``got`` (an fp32 result of solving with F) matches the fp64 ``want`` in norm, within
    ``solve_tolerance(F)``."""
    tolerance = solve_tolerance(F, slack)
    error = ((got.double() - want).norm() / want.norm()).item()
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:.3g} (slack * cond * eps)"

"""The FOP equations against dense references (F = A (x) G built explicitly, fp64)."""

from __future__ import annotations

import pytest
import torch

from hf_fop.curvature import EigenPreconditioner, symmetric_eigh
from hf_fop.fop_math import eta_at_optimal_beta, fop_direction, inner
from tests.dense import assert_solve_close, dense_fop, random_spd, unvec, vec

pytestmark = pytest.mark.numerics

OUT, IN, DAMPING = 4, 6, 0.05


def _factors() -> tuple[torch.Tensor, torch.Tensor]:
    # Scales as measured on real layers: A's eigenvalues ~10-100, G's ~0.01-0.1.
    return random_spd(IN, scale=50.0), random_spd(OUT, scale=0.05)


def _dense_operators(F: torch.Tensor):
    F_inv = torch.linalg.inv(F)
    return (lambda m: unvec(F @ vec(m), m.shape[0])), (lambda m: unvec(F_inv @ vec(m), m.shape[0]))


def _kronecker_damping(A: torch.Tensor, G: torch.Tensor, damping_mode: str) -> float:
    """lambda as the README states it: damping, or damping * mean eig(A) * mean eig(G)."""
    if damping_mode == "absolute":
        return DAMPING
    return DAMPING * (torch.trace(A) / IN * torch.trace(G) / OUT).item()


def _assert_matches_dense(metric, F: torch.Tensor) -> None:
    V = torch.randn(OUT, IN, dtype=torch.float64)
    torch.testing.assert_close(
        metric.fisher(V.float()).double(), unvec(F @ vec(V), OUT), rtol=1e-4, atol=1e-5
    )
    expected = unvec(torch.linalg.solve(F, vec(V)), OUT)
    assert_solve_close(metric.inverse_fisher(V.float()), expected, F)


@pytest.mark.parametrize("damping_mode", ["relative", "absolute"])
def test_eigen_preconditioner_matches_dense_damped_fisher(damping_mode: str) -> None:
    A, G = _factors()
    damping = _kronecker_damping(A, G, damping_mode)
    F = torch.kron(A, G) + damping * torch.eye(IN * OUT, dtype=torch.float64)
    metric = EigenPreconditioner.from_factors(A.float(), G.float(), DAMPING, damping_mode)
    _assert_matches_dense(metric, F)


@pytest.mark.parametrize(("scale_A", "scale_G"), [(1e3, 1.0), (1.0, 1e-9), (7.0, 3e-4)])
def test_relative_damping_gives_the_same_direction_at_any_factor_scale(
    scale_A: float, scale_G: float
) -> None:
    method = EigenPreconditioner
    # G's eigenvalues in a freshly initialised transformer are ~1e-13: a damping that means
    # the same at every scale multiplies F^-1 by 1 / (scale_A scale_G) and changes nothing else.
    A, G = _factors()
    g_avg, g_diff = torch.randn(OUT, IN), torch.randn(OUT, IN)
    base = method.from_factors(A.float(), G.float(), DAMPING, "relative")
    scaled = method.from_factors((scale_A * A).float(), (scale_G * G).float(), DAMPING, "relative")
    factor = scale_A * scale_G
    torch.testing.assert_close(
        scaled.inverse_fisher(g_avg) * factor, base.inverse_fisher(g_avg), rtol=1e-4, atol=1e-6
    )
    expected, result = base.fop(g_avg, g_diff, 1e-10), scaled.fop(g_avg, g_diff, 1e-10)
    torch.testing.assert_close(result.direction * factor, expected.direction, rtol=1e-3, atol=1e-5)
    for name in ("beta", "eta", "rho", "kfac_cosine"):
        assert getattr(result, name).item() == pytest.approx(
            getattr(expected, name).item(), rel=1e-3
        )


def test_absolute_damping_turns_into_sgd_when_g_is_tiny_and_relative_does_not() -> None:
    A, G = _factors()
    G = 1e-12 * G  # a fresh transformer's inner layers
    g_avg = torch.randn(OUT, IN)

    def cosine_with_gradient(damping_mode: str) -> float:
        metric = EigenPreconditioner.from_factors(A.float(), G.float(), DAMPING, damping_mode)
        step = metric.inverse_fisher(g_avg)
        return torch.nn.functional.cosine_similarity(step.flatten(), g_avg.flatten(), 0).item()

    assert cosine_with_gradient("absolute") > 0.9999  # F^-1 g = g / damping: plain SGD
    assert cosine_with_gradient("relative") < 0.9


def test_fop_step_matches_dense_equations() -> None:
    A, G = _factors()
    metric = EigenPreconditioner.from_factors(A.float(), G.float(), DAMPING)
    # The dense reference uses the very damped Fisher the strategy defines.
    eye = torch.eye(IN * OUT, dtype=torch.float64)
    F = torch.stack([vec(metric.fisher(unvec(e, OUT).float()).double()) for e in eye], dim=1)
    g_avg = torch.randn(OUT, IN, dtype=torch.float64)
    g_diff = torch.randn(OUT, IN, dtype=torch.float64)
    expected, beta, eta = dense_fop(g_avg, g_diff, F)
    result = metric.fop(g_avg.float(), g_diff.float(), zero_tol=1e-10)
    assert_solve_close(result.direction, expected, F)
    assert result.beta.item() == pytest.approx(beta, rel=1e-3)
    assert result.eta.item() == pytest.approx(eta, rel=1e-4)


def test_g_perp_is_fisher_orthogonal_and_beta_minimises_the_quadratic() -> None:
    A, G = _factors()
    F = torch.kron(A, G) + DAMPING * torch.eye(IN * OUT, dtype=torch.float64)
    fisher, inverse = _dense_operators(F)
    g_avg, g_diff = (
        torch.randn(OUT, IN, dtype=torch.float64),
        torch.randn(OUT, IN, dtype=torch.float64),
    )
    s = inner(g_diff, fisher(g_avg)) / inner(g_avg, fisher(g_avg))
    g_perp = g_diff - s * g_avg
    assert abs(inner(g_avg, fisher(g_perp)).item()) < 1e-10 * inner(g_avg, fisher(g_avg)).item()

    result = fop_direction(g_avg, g_diff, fisher, inverse)
    D = inner(g_avg, inverse(g_perp)).item()
    E = inner(g_perp, inverse(g_perp)).item()

    def J(b: float) -> float:
        return -b * D + b * b * E / 2

    beta = result.beta.item()
    assert beta == pytest.approx(D / E, rel=1e-10)
    for delta in (1e-3, 1e-1, 1.0):
        assert J(beta) < J(beta + delta) and J(beta) < J(beta - delta)


def test_equal_halves_give_exactly_the_kfac_step() -> None:
    A, G = _factors()
    metric = EigenPreconditioner.from_factors(A.float(), G.float(), DAMPING)
    g = torch.randn(OUT, IN)
    g1 = g2 = g.clone()
    result = metric.fop((g1 + g2) / 2, g1 - g2, zero_tol=1e-10)
    assert torch.equal(result.direction, metric.kfac(g).direction)
    assert result.beta.item() == 0.0 and result.eta.item() == 1.0


def test_eta_lies_in_half_to_one_and_follows_rho() -> None:
    for _ in range(200):
        A, G = random_spd(IN, scale=float(torch.rand(1)) * 100), random_spd(OUT, scale=0.1)
        F = torch.kron(A, G) + DAMPING * torch.eye(IN * OUT, dtype=torch.float64)
        fisher, inverse = _dense_operators(F)
        g_avg = torch.randn(OUT, IN, dtype=torch.float64)
        g_diff = torch.randn(OUT, IN, dtype=torch.float64) * 10 ** float(torch.randint(-3, 3, (1,)))
        result = fop_direction(g_avg, g_diff, fisher, inverse)
        assert 0.5 - 1e-12 <= result.eta.item() <= 1 + 1e-12
        assert result.eta.item() == pytest.approx(eta_at_optimal_beta(result.rho).item(), rel=1e-9)


def test_zero_cut_is_relative_to_g_diff() -> None:
    A, G = _factors()
    metric = EigenPreconditioner.from_factors(A.float(), G.float(), DAMPING)
    g_avg, g_diff = torch.randn(OUT, IN), torch.randn(OUT, IN)
    full = metric.fop(g_avg, g_diff, zero_tol=1e-10)
    small = metric.fop(g_avg, g_diff * 1e-3, zero_tol=1e-10)
    # beta * g_perp does not depend on the size of g_diff: a small one still gives the FOP step.
    torch.testing.assert_close(small.direction, full.direction, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(full.direction, metric.kfac(g_avg).direction, rtol=1e-3)
    # ... down to round-off next to g_avg (E <= zero_tol * <g_avg, F^-1 g_avg>): halves that are
    # equal up to fp32 rounding give K-FAC's step, not amplified noise.
    noise = metric.fop(g_avg, g_diff * 1e-6, zero_tol=1e-10)
    assert torch.equal(noise.direction, metric.kfac(g_avg).direction)
    zero = metric.fop(g_avg, torch.zeros_like(g_diff), zero_tol=1e-10)
    assert torch.equal(zero.direction, metric.kfac(g_avg).direction)
    parallel = metric.fop(g_avg, 3 * g_avg, zero_tol=1e-10)  # no orthogonal part: K-FAC
    torch.testing.assert_close(parallel.direction, metric.kfac(g_avg).direction)


def test_one_metric_for_both_steps_would_collapse_to_kfac() -> None:
    # Why the projection uses F and beta uses F^-1: with F^-1 in both, D is identically 0.
    A, G = _factors()
    F = torch.kron(A, G) + DAMPING * torch.eye(IN * OUT, dtype=torch.float64)
    _, inverse = _dense_operators(F)
    g_avg, g_diff = (
        torch.randn(OUT, IN, dtype=torch.float64),
        torch.randn(OUT, IN, dtype=torch.float64),
    )
    one_metric = fop_direction(g_avg, g_diff, inverse, inverse)
    assert abs(one_metric.beta.item()) < 1e-10
    fisher, _ = _dense_operators(F)
    assert abs(fop_direction(g_avg, g_diff, fisher, inverse).beta.item()) > 1e-3


def test_eigh_recovers_from_degenerate_factors() -> None:
    # Dead units: whole rows and columns of zeros, repeated eigenvalues.
    x = torch.randn(8, 3)
    factor = x @ x.T
    factor[2:5] = 0
    factor[:, 2:5] = 0
    eigenvalues, eigenvectors = symmetric_eigh(factor)
    assert torch.isfinite(eigenvalues).all() and (eigenvalues >= 0).all()
    torch.testing.assert_close(
        eigenvectors @ torch.diag(eigenvalues) @ eigenvectors.T, factor, atol=1e-5, rtol=1e-4
    )


def test_eigh_retries_in_fp64_when_fp32_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(matrix: torch.Tensor):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated fp32 failure")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    factor = random_spd(5).float()
    eigenvalues, eigenvectors = symmetric_eigh(factor)
    assert calls == [torch.float32, torch.float64]
    assert eigenvalues.dtype == torch.float32
    torch.testing.assert_close(
        eigenvectors @ torch.diag(eigenvalues) @ eigenvectors.T, factor, atol=1e-5, rtol=1e-4
    )


def test_kl_clip_scale_by_hand() -> None:
    from hf_fop.fop_math import kl_clip_scale

    # nu = min(1, sqrt(kl_clip / (lr^2 vg))): vg = 4, lr = 0.1 -> lr^2 vg = 0.04.
    assert kl_clip_scale(torch.tensor(4.0), 0.1, 0.01).item() == pytest.approx(0.5)
    assert kl_clip_scale(torch.tensor(4.0), 0.1, 1.0).item() == 1.0  # never enlarges the step
    # A negative <n, g> (a direction against the gradient) is clipped by its size.
    assert kl_clip_scale(torch.tensor(-4.0), 0.1, 0.01).item() == pytest.approx(0.5)
    assert kl_clip_scale(torch.tensor(0.0), 0.1, 0.01).item() == 1.0


def test_running_factors_start_as_the_plain_mean_then_decay_exponentially() -> None:
    from hf_fop.bucket import ShapeBucket
    from hf_fop.config import FOPConfig
    from hf_fop.layers import make_adapter

    layer = make_adapter(torch.nn.Linear(2, 3, bias=False))
    bucket = ShapeBucket([0], ["layer"], layer, FOPConfig())
    decay = 0.9
    estimates = [random_spd(2, dtype=torch.float32) for _ in range(40)]
    for k, estimate in enumerate(estimates):
        bucket.fold(estimate[None], torch.eye(3)[None], [True], decay)
        if k < 10:  # 1 / (k + 1) >= 1 - decay: the plain mean of the estimates so far
            expected = torch.stack(estimates[: k + 1]).mean(0)
        else:  # then an exponential average with weight 1 - decay
            expected = expected.lerp(estimate, 1 - decay)
        torch.testing.assert_close(bucket.A[0], expected, rtol=1e-5, atol=1e-6)
    # A skipped step (the device flag false) leaves the factor as it was.
    before = bucket.A.clone()
    bucket.begin_step(torch.tensor(False))
    bucket.fold(estimates[0][None], torch.eye(3)[None], [True], decay)
    assert torch.equal(bucket.A, before)

"""The eigenvalue-corrected Kronecker metric and the QR basis refresh against dense references."""

from __future__ import annotations

import pytest
import torch

from hf_fop.curvature import EigenPreconditioner
from hf_fop.eigen_corrected import (
    EigenCorrectedPreconditioner,
    carry_second_moment,
    cluster_mean,
    clustered_second_moment,
    corrected_metric,
    power_qr_refresh,
    rotate,
    update_rotated_second_moment,
)
from hf_fop.fop_math import fisher_orthogonal_component, inner
from hf_fop.grafting import adam_direction, update_adam_second_moment
from tests.dense import dense_fop, random_spd, unvec, vec

pytestmark = pytest.mark.numerics

IN, OUT = 5, 4


def _basis(size: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))[0]


def _second_moment(updates: int, beta2: float, basis_A, basis_G) -> torch.Tensor:
    moment = torch.zeros(OUT, IN, dtype=torch.float64)
    for _ in range(updates):
        moment = update_rotated_second_moment(
            moment, rotate(torch.randn(OUT, IN).double(), basis_A, basis_G), beta2
        )
    return moment


def test_kronecker_products_as_the_moment_give_todays_direction_and_scalars() -> None:
    A, G = random_spd(IN, dtype=torch.float32), random_spd(OUT, dtype=torch.float32)
    kronecker = EigenPreconditioner.from_factors(A, G, damping=0.3)
    products = kronecker.eigvals_G[:, None] * kronecker.eigvals_A[None, :]
    # beta2 = 0: the bias correction is 1, the moment is the products themselves.
    metric = corrected_metric(products, 1, beta2=0.0, exponent=1.0, damping=0.3)
    corrected = EigenCorrectedPreconditioner(kronecker.eigvecs_A, kronecker.eigvecs_G, metric)
    g_avg, g_diff = torch.randn(OUT, IN), torch.randn(OUT, IN)
    for method in ("kfac", "fop"):
        args = (g_avg,) if method == "kfac" else (g_avg, g_diff, 1e-10)
        expected, got = getattr(kronecker, method)(*args), getattr(corrected, method)(*args)
        for name in expected._fields:
            torch.testing.assert_close(getattr(got, name), getattr(expected, name))


def test_identity_bases_at_exponent_one_half_give_adams_step() -> None:
    eye_A, eye_G = torch.eye(IN, dtype=torch.float64), torch.eye(OUT, dtype=torch.float64)
    beta2, eps = 0.99, 1e-8
    moment = torch.zeros(OUT, IN, dtype=torch.float64)
    adam_moment = torch.zeros(OUT, IN, dtype=torch.float64)
    for step in range(1, 6):
        grad = torch.randn(OUT, IN, dtype=torch.float64)
        moment = update_rotated_second_moment(moment, rotate(grad, eye_A, eye_G), beta2)
        adam_moment = update_adam_second_moment(adam_moment, grad, beta2)
        expected = adam_direction(grad, adam_moment, beta2, eps, step)
        metric = corrected_metric(moment, step, beta2, 0.5, eps, damping_mode="absolute")
        direction = EigenCorrectedPreconditioner(eye_A, eye_G, metric).kfac(grad).direction
        torch.testing.assert_close(direction, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_fop_in_the_corrected_metric_matches_the_dense_equations(exponent: float) -> None:
    basis_A, basis_G = _basis(IN), _basis(OUT)
    metric = corrected_metric(_second_moment(7, 0.95, basis_A, basis_G), 7, 0.95, exponent, 0.1)
    preconditioner = EigenCorrectedPreconditioner(basis_A, basis_G, metric)
    # Dense M = (Q_A (x) Q_G) diag(vec m) (Q_A (x) Q_G)^T, built column by column from vec.
    Q = torch.kron(basis_A, basis_G)
    M = Q @ torch.diag(vec(metric)) @ Q.T
    g_avg, g_diff = (
        torch.randn(OUT, IN, dtype=torch.float64),
        torch.randn(OUT, IN, dtype=torch.float64),
    )
    expected, beta, eta = dense_fop(g_avg, g_diff, M)
    result = preconditioner.fop(g_avg, g_diff, zero_tol=1e-10)
    torch.testing.assert_close(result.direction, expected, rtol=1e-9, atol=1e-12)
    assert result.beta.item() == pytest.approx(beta, rel=1e-9)
    assert result.eta.item() == pytest.approx(eta, rel=1e-9)
    # g_perp is M-orthogonal to g_avg, and beta minimises J(b) = -b D + b^2 E / 2 in M^-1.
    g_perp, _ = fisher_orthogonal_component(g_diff, g_avg, preconditioner.fisher(g_avg))
    assert abs(inner(g_avg, preconditioner.fisher(g_perp)).item()) < 1e-10
    D = inner(g_avg, preconditioner.inverse_fisher(g_perp)).item()
    E = inner(g_perp, preconditioner.inverse_fisher(g_perp)).item()
    assert result.beta.item() == pytest.approx(D / E, rel=1e-9)
    assert torch.allclose(vec(preconditioner.fisher(g_avg)), M @ vec(g_avg))
    assert torch.allclose(
        unvec(torch.linalg.solve(M, vec(g_avg)), OUT), preconditioner.inverse_fisher(g_avg)
    )


def test_relative_damping_is_scale_free_and_the_moment_update_writes_nothing() -> None:
    moment = torch.rand(OUT, IN, dtype=torch.float64)
    small = corrected_metric(moment, 3, 0.9, 1.0, 0.5)
    large = corrected_metric(1e6 * moment, 3, 0.9, 1.0, 0.5)
    torch.testing.assert_close(large, 1e6 * small)
    before = moment.clone()
    # The bucket keeps the new moment only where the step is kept (ShapeBucket.step).
    updated = update_rotated_second_moment(moment, torch.randn(OUT, IN).double(), 0.9)
    assert torch.equal(moment, before) and not torch.equal(updated, before)


def test_cluster_mean_averages_rows_over_each_run_of_close_eigenvalues_in_a_block() -> None:
    # Two layers, each side in 2 blocks of 4 (ascending within a block); gap 1e-6 of the
    # block's own largest (3e-7 stands alone in its block). Block boundaries split runs even
    # between equal eigenvalues.
    eigvals = torch.tensor(
        [
            [0.0, 1e-9, 0.3, 1.0, 1.0, 1.5, 1.5 + 1e-8, 2.0],
            [0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 3e-7],
        ],
        dtype=torch.float64,
    )
    clusters = [[[0, 1], [2], [3], [4], [5, 6], [7]], [[0], [1], [2], [3], [4, 5, 6], [7]]]
    values = torch.rand(2, 3, 8, dtype=torch.float64)
    expected = values.clone()
    for layer, runs in enumerate(clusters):
        for run in runs:
            expected[layer][:, run] = values[layer][:, run].mean(-1, keepdim=True)
    torch.testing.assert_close(cluster_mean(values.mT, eigvals, 4, 1e-6).mT, expected)
    # A floor: every eigenvalue below floor x its block's largest joins the block's null-space
    # cluster, however far apart (0.3 and 1e-9); above it, gap 0 leaves each alone.
    floored = [[[0, 1, 2], [3], [4], [5], [6], [7]], [[0], [1], [2], [3], [4, 5, 6], [7]]]
    expected = values.clone()
    for layer, runs in enumerate(floored):
        for run in runs:
            expected[layer][:, run] = values[layer][:, run].mean(-1, keepdim=True)
    torch.testing.assert_close(cluster_mean(values.mT, eigvals, 4, 0.0, floor=0.35).mT, expected)
    # Blocks of one (a diagonal side, whose basis is the identity) never average.
    zeros = torch.zeros(2, 8, dtype=torch.float64)
    assert torch.equal(cluster_mean(values.mT, zeros, 1, 0.5).mT, values)


def test_the_clustered_metric_makes_the_step_blind_to_a_turn_inside_a_cluster() -> None:
    # A has three equal eigenvalues: eigh may return any rotation of their eigenvectors. With
    # the moment averaged over the cluster, the step (K-FAC's and FOP's) is the same whichever
    # it returned; per coordinate (gap 0, SOAP's metric) it is not.
    eigvals_A = torch.tensor([1e-9, 1e-9, 1e-9, 0.5, 1.0], dtype=torch.float64)
    eigvals_G = torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=torch.float64)
    basis_A, basis_G = _basis(IN), _basis(OUT)
    turned_A = basis_A.clone()
    turned_A[:, :3] = basis_A[:, :3] @ _basis(3)
    gradients = [torch.randn(OUT, IN, dtype=torch.float64) for _ in range(4)]
    g_diff = torch.randn(OUT, IN, dtype=torch.float64)

    def steps(basis: torch.Tensor, gap: float, floor: float = 0.0) -> list[torch.Tensor]:
        moment = torch.zeros(OUT, IN, dtype=torch.float64)
        for grad in gradients:
            moment = update_rotated_second_moment(moment, rotate(grad, basis, basis_G), 0.9)
        shared = clustered_second_moment(moment, eigvals_A, eigvals_G, (IN, OUT), gap, floor)
        metric = corrected_metric(shared, len(gradients), 0.9, 0.5, 1e-8, "absolute")
        preconditioner = EigenCorrectedPreconditioner(basis, basis_G, metric)
        g = gradients[-1]
        return [preconditioner.kfac(g).direction, preconditioner.fop(g, g_diff, 1e-10).direction]

    for plain, turned in zip(steps(basis_A, 1e-6), steps(turned_A, 1e-6)):
        torch.testing.assert_close(turned, plain, rtol=1e-10, atol=1e-12)
    # The cluster is A's null space (1e-9 of its largest): the default floor finds it alone.
    for plain, turned in zip(steps(basis_A, 0.0, 1e-6), steps(turned_A, 0.0, 1e-6)):
        torch.testing.assert_close(turned, plain, rtol=1e-10, atol=1e-12)
    for plain, turned in zip(steps(basis_A, 0.0), steps(turned_A, 0.0)):
        assert (turned - plain).norm() > 1e-2 * plain.norm()


def test_a_one_ulp_change_of_the_images_barely_moves_the_shared_metric() -> None:
    # benchmarks.roundoff: a small ViT on digits (whose blank borders leave the factors a null
    # space), 6 steps at batch 128 on the images and on the images times (1 + 2^-23). Per
    # coordinate (release 0.7's defaults) the two runs end 41-42% of their movement apart
    # (default, AVX2 and AVX-512 kernels); with the null space one cluster (the defaults) 15%;
    # with every cluster of nearly equal eigenvalues shared (cluster_gap=1e-5) 7-8%.
    from benchmarks.roundoff import movement

    defaults = movement("fop", 1e-3, steps=6, batch=128, seed=0)
    shared = movement("fop", 1e-3, steps=6, batch=128, seed=0, cluster_gap=1e-5)
    per_coordinate = movement("fop", 1e-3, steps=6, batch=128, seed=0, null_space_floor=0.0)
    assert defaults["all"] < 0.25 * defaults["moved"]
    assert shared["all"] < 0.15 * shared["moved"]
    assert per_coordinate["all"] > 0.3 * per_coordinate["moved"]


def test_the_qr_refresh_converges_to_eighs_basis_and_stays_there() -> None:
    # Well separated eigenvalues (ratio 2): the power iteration converges geometrically.
    size = 6
    eigvecs = _basis(size)
    eigvals = 2.0 ** torch.arange(size, dtype=torch.float64)
    factor = eigvecs @ torch.diag(eigvals) @ eigvecs.T
    reference_vals, reference_vecs = torch.linalg.eigh(factor)
    basis = _basis(size)  # a cold start
    for _ in range(80):
        estimates, basis = power_qr_refresh(factor, basis)
    torch.testing.assert_close(estimates, reference_vals, rtol=1e-8, atol=1e-10)
    # The same eigenvectors up to sign, in eigh's (ascending) order.
    overlap = (basis.T @ reference_vecs).abs()
    torch.testing.assert_close(overlap, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-8)
    # Warm-started from a converged basis, one refresh keeps it (signs included).
    _, again = power_qr_refresh(factor, basis)
    torch.testing.assert_close(again, basis, rtol=0, atol=1e-10)
    # Batched: a stack of factors refreshes in one call.
    stacked_vals, stacked = power_qr_refresh(
        torch.stack([factor, 2 * factor]), torch.stack([basis, basis])
    )
    torch.testing.assert_close(stacked[1], basis, rtol=0, atol=1e-10)
    torch.testing.assert_close(stacked_vals[1], 2 * estimates)


# ------------------------------------------------------------------------------ in the optimizer

SETTINGS = [
    {"curvature": "eigen_corrected", "exponent": 1.0},
    {"curvature": "eigen_corrected", "exponent": 0.5, "basis_refresh": "qr"},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["ekfac", "soap_style_qr"])
def test_the_corrected_metric_trains_a_tiny_vit(settings: dict) -> None:
    from hf_fop import FOP
    from tests.helpers import image_data, tiny_vit, train

    images, classes = image_data()
    vit = tiny_vit()
    optimizer = FOP(vit, lr=1e-2, curvature_interval=1, inverse_interval=2, **settings)
    losses = train(vit, optimizer, images, classes, steps=40)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    bucket = optimizer.curvature.buckets[0]
    assert bucket.moment_updates == [40] * len(bucket)  # every step, not only curvature steps
    assert bool(bucket.state["rotated_second_moment"].abs().sum() > 0)
    stats = optimizer.statistics()
    assert 0.5 <= stats["eta_min"] <= stats["eta_max"] <= 1.0 and stats["beta_max"] != 0.0


@pytest.mark.parametrize("settings", SETTINGS, ids=["ekfac", "soap_style_qr"])
def test_a_resumed_run_with_the_corrected_metric_equals_the_uninterrupted_one(
    settings: dict,
) -> None:
    import copy
    import io

    from hf_fop import FOP
    from tests.helpers import TokenClassifier, token_data, train

    tokens, labels = token_data()
    config = dict(curvature_interval=2, inverse_interval=3, lr=0.03, **settings)
    torch.manual_seed(0)
    model = TokenClassifier()
    initial = copy.deepcopy(model.state_dict())
    optimizer = FOP(model, **config)
    train(model, optimizer, tokens, labels, steps=4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    uninterrupted = train(model, optimizer, tokens, labels, steps=5)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = TokenClassifier()
    resumed_model.load_state_dict(initial)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer = FOP(resumed_model, **config)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = train(resumed_model, resumed_optimizer, tokens, labels, steps=5)
    assert resumed == uninterrupted
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_non_finite_step_leaves_the_rotated_moment_and_its_count_alone() -> None:
    from hf_fop import FOP
    from tests.helpers import TokenClassifier, assert_identical, token_data, train

    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, curvature_interval=1, curvature="eigen_corrected")
    train(model, optimizer, tokens, labels, steps=2)
    bucket = optimizer.curvature.buckets[0]
    moment, counts = bucket.state["rotated_second_moment"].clone(), list(bucket.moment_updates)
    before = optimizer.state_dict()
    loss = torch.nn.functional.cross_entropy(model(tokens[:16]), labels[:16])
    optimizer.zero_grad()
    loss.backward()
    model.blocks[1][1].weight.grad[0, 0] = float("nan")
    optimizer.step()
    optimizer.statistics()  # reads the step's verdict: the host's counts are put back
    assert (
        torch.equal(bucket.state["rotated_second_moment"], moment)
        and bucket.moment_updates == counts
    )
    assert_identical(optimizer.state_dict(), before)


def test_settings_of_the_corrected_metric_are_checked() -> None:
    from hf_fop import FOPConfig

    with pytest.raises(ValueError, match="exponent"):
        FOPConfig(curvature="eigen_corrected", exponent=0.0)
    with pytest.raises(ValueError, match="curvature must be one of"):
        FOPConfig(curvature="shampoo")
    with pytest.raises(ValueError, match="cluster_gap must be in"):
        FOPConfig(cluster_gap=-1e-5)
    with pytest.raises(ValueError, match="null_space_floor must be in"):
        FOPConfig(null_space_floor=1.0)


def test_carried_moment_is_the_variance_of_independent_coordinates_in_the_new_basis() -> None:
    old_A, old_G, new_A, new_G = _basis(IN), _basis(OUT), _basis(IN), _basis(OUT)
    moment = torch.rand(OUT, IN, dtype=torch.float64)
    # Dense reference: vec(g') = M vec(r) with M = R_A (x) R_G (column-major vec); for
    # independent coordinates of variances s, Var(g') = (M o M) vec(s).
    mix = torch.kron(new_A.T @ old_A, new_G.T @ old_G)
    expected = unvec(mix.square() @ vec(moment), OUT)
    torch.testing.assert_close(carry_second_moment(moment, old_A, old_G, new_A, new_G), expected)


def test_carried_moment_follows_a_reordered_and_sign_flipped_basis_exactly() -> None:
    old_A, old_G = _basis(IN), _basis(OUT)
    order_A, order_G = torch.randperm(IN), torch.randperm(OUT)
    flip_A = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    new_A, new_G = old_A[:, order_A] * flip_A, -old_G[:, order_G]
    moment = torch.rand(OUT, IN, dtype=torch.float64)
    carried = carry_second_moment(moment, old_A, old_G, new_A, new_G)
    torch.testing.assert_close(carried, moment[order_G][:, order_A])
    # The moment of a gradient stream rotated into the new basis is the carried one.
    grads = [torch.randn(OUT, IN, dtype=torch.float64) for _ in range(3)]
    in_old = sum(rotate(g, old_A, old_G).square() for g in grads)
    in_new = sum(rotate(g, new_A, new_G).square() for g in grads)
    torch.testing.assert_close(carry_second_moment(in_old, old_A, old_G, new_A, new_G), in_new)


@pytest.mark.parametrize("block_size", [None, 8])
def test_gradient_factors_are_shampoos_statistics_of_the_gradient_matrix(
    block_size: int | None,
) -> None:
    from hf_fop import FOP
    from hf_fop.blocks import BlockLayout, pad_matrix
    from tests.dense import block_diagonal
    from tests.helpers import TokenClassifier, token_data, train

    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(
        model,
        factor_source="gradient",
        block_size=block_size,
        curvature_interval=1,
        precondition_embeddings=False,  # its diagonal vocabulary side: tests/test_embeddings.py
    )
    train(model, optimizer, tokens, labels, steps=1)  # the first estimate has weight 1
    assert all(stats.A_sum is None for stats in optimizer.capture.stats)  # no hook work
    for name, layer in zip(optimizer.layer_names, optimizer.layers):
        g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        state = optimizer.curvature.layer_state(name)
        for key, whole in (("A", g.T @ g), ("G", g @ g.T)):
            layout = BlockLayout.for_side(whole.shape[0], block_size)
            want = pad_matrix(whole, layout, layout)
            got = state[key]
            if layout.blocked:
                want = want * block_diagonal(torch.ones(layout.factor_shape)).bool()
                got = block_diagonal(got)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graft", ["adamw", "none"])
@pytest.mark.parametrize("model_name", ["vit", "gpt2"])
def test_identity_bases_with_momentum_before_the_preconditioner_are_adam(
    model_name: str, graft: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every basis the identity, exponent 1/2 and absolute damping (eps), the eigen-corrected
    # metric is Adam's second moment (of the halves); with momentum before the preconditioner
    # the whole step is torch's Adam: grafted (to Adam's own size), or without grafting, SOAP's
    # way, where the direction itself is the step.
    import copy

    import hf_fop.curvature
    from hf_fop import FOP
    from tests.helpers import identity_eigh, image_data, tiny_gpt2, tiny_vit

    monkeypatch.setattr(hf_fop.curvature, "symmetric_eigh", identity_eigh)
    torch.manual_seed(0)
    model = tiny_gpt2() if model_name == "gpt2" else tiny_vit()
    reference = copy.deepcopy(model)
    optimizer = FOP(
        model,
        mode="kfac",
        curvature="eigen_corrected",
        exponent=0.5,
        damping=1e-8 / 2**0.5,  # Adam's eps on the sqrt(2) smaller root (below)
        damping_mode="absolute",
        second_moment_decay=0.999,
        basis_refresh="eigh",  # identity_eigh stands in for eigh
        graft=graft,
        weight_decay=0.0,
        adamw_weight_decay=0.0,
        inverse_interval=3,
    )
    # Both halves of every batch are the same examples (the token rows repeat after two), so
    # the second moment of the halves is half the batch's own: the preconditioned layers'
    # direction is sqrt(2) times Adam's, a step of Adam at sqrt(2) times the rate unless
    # grafting restores Adam's own size.
    # The halves' own test is test_the_second_moment_of_distinct_halves_is_their_mean_square.
    index = {id(p): i for i, p in enumerate(model.parameters())}
    ref_params = list(reference.parameters())
    scale = 2**0.5 if graft == "none" else 1.0
    adam = torch.optim.Adam(
        [
            {
                "params": [ref_params[index[id(p)]] for p in group["params"]],
                "lr": 1e-3 * (scale if group["kind"] == "fop" else 1.0),
            }
            for group in optimizer.param_groups
        ],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    images, labels = (torch.cat([t, t]) for t in image_data(8))
    for step in range(8):
        for net, opt in ((model, optimizer), (reference, adam)):
            opt.zero_grad()
            if model_name == "gpt2":
                ids = (torch.arange(48).reshape(4, 12) + step) % 24
                loss = net(input_ids=ids, labels=ids).loss
            else:
                loss = torch.nn.functional.cross_entropy(net(pixel_values=images).logits, labels)
            loss.backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        # 8 steps of lr 1e-3: a wrong placement of the momentum differs by ~5e-3 (measured)
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5)


def test_the_second_moment_of_distinct_halves_is_their_mean_square() -> None:
    # r = (r1 + r2) / 2 and r_diff = r1 - r2 give r^2 / 2 + r_diff^2 / 8 = (r1^2 + r2^2) / 4:
    # where the halves cancel (r = 0), the metric still sees their size, not round-off.
    r1, r2 = torch.randn(OUT, IN, dtype=torch.float64), torch.randn(OUT, IN, dtype=torch.float64)
    r2[0] = -r1[0]  # a row where the batch gradient cancels exactly
    moment = torch.zeros(OUT, IN, dtype=torch.float64)
    moment = update_rotated_second_moment(moment, (r1 + r2) / 2, 0.0, rotated_diff=r1 - r2)
    torch.testing.assert_close(moment, (r1 * r1 + r2 * r2) / 4, rtol=1e-12, atol=0)
    assert (moment[0] > 0).all()
    whole = torch.zeros(OUT, IN, dtype=torch.float64)
    whole = update_rotated_second_moment(whole, (r1 + r2) / 2, 0.0)
    assert (whole[0] == 0).all()  # the batch's own second moment is blind there

"""Block-diagonal Kronecker factors (block_size) against dense block-diagonal references."""

from __future__ import annotations

import io

import pytest
import torch

from hf_fop import FOP
from hf_fop.blocks import BlockLayout, block_gram, left_multiply, pad_matrix, right_multiply
from hf_fop.curvature import EigenPreconditioner
from hf_fop.eigen_corrected import carry_second_moment
from hf_fop.factor_sums import output_second_moment, second_moment
from hf_fop.partition import partition_model
from tests.dense import assert_solve_close, block_diagonal, unvec, vec
from tests.helpers import TokenClassifier, kronecker, token_data, train

pytestmark = pytest.mark.numerics


def _psd_blocks(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return root @ root.mT / shape[-1] + 0.1 * torch.eye(shape[-1], dtype=torch.float64)


@pytest.mark.parametrize(
    ("dim", "block_size", "count", "size"),
    [(16, 32, 1, 16), (16, 8, 2, 8), (17, 8, 3, 6), (1031, 1024, 2, 516)],
)
def test_layout_splits_a_side_into_the_fewest_equal_blocks(
    dim: int, block_size: int, count: int, size: int
) -> None:
    layout = BlockLayout.for_side(dim, block_size)
    assert (layout.count, layout.size) == (count, size)
    assert layout.size <= block_size and dim <= layout.padded < dim + max(count, 1)
    assert BlockLayout.for_side(dim, None).factor_shape == (dim, dim)


def test_block_products_are_those_of_the_dense_block_diagonal_matrix() -> None:
    blocks = torch.randn(2, 3, 4, 4, dtype=torch.float64)  # two layers, three blocks of 4
    dense = block_diagonal(blocks)
    matrix = torch.randn(2, 12, 5, dtype=torch.float64)
    torch.testing.assert_close(left_multiply(blocks, matrix), dense @ matrix)
    wide = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(right_multiply(wide, blocks), wide @ dense)


def test_factor_sums_are_the_diagonal_blocks_of_the_whole_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    d = torch.randn(40, 7, generator=generator, dtype=torch.float64)
    weights = (torch.rand(40, generator=generator) > 0.3).double()
    layout_A, layout_G = BlockLayout.for_side(10, 4), BlockLayout.for_side(7, 3)  # 3 x 4, 3 x 3
    whole_A = pad_matrix(second_moment(x, True, weights), layout_A, layout_A)
    whole_G = pad_matrix(output_second_moment(d), layout_G, layout_G)
    blocked_A = second_moment(x, True, weights, layout_A)
    blocked_G = output_second_moment(d, layout_G)
    assert blocked_A.shape == (3, 4, 4) and blocked_G.shape == (3, 3, 3)
    mask_A = block_diagonal(torch.ones(3, 4, 4, dtype=torch.float64)).bool()
    mask_G = block_diagonal(torch.ones(3, 3, 3, dtype=torch.float64)).bool()
    torch.testing.assert_close(block_diagonal(blocked_A), whole_A * mask_A)
    torch.testing.assert_close(block_diagonal(blocked_G), whole_G * mask_G)
    torch.testing.assert_close(block_gram(x, BlockLayout.for_side(9, 9))[0], x.T @ x)


@pytest.mark.parametrize("mode", ["kfac", "fop"])
@pytest.mark.parametrize(
    ("in_dim", "out_dim", "damping_mode"), [(12, 6, "relative"), (11, 7, "absolute")]
)
def test_blocked_directions_equal_the_dense_block_diagonal_reference(
    mode: str, in_dim: int, out_dim: int, damping_mode: str
) -> None:
    # Padded sides (11 -> 3 x 4, 7 -> 3 x 3) take absolute damping, which the padding's extra
    # zero eigenvalues leave exactly as it is (the relative one is tested unpadded).
    layout_A, layout_G = BlockLayout.for_side(in_dim, 4), BlockLayout.for_side(out_dim, 3)
    A = _psd_blocks(2, layout_A.count, layout_A.size, layout_A.size, seed=1)
    G = _psd_blocks(2, layout_G.count, layout_G.size, layout_G.size, seed=2)
    A_dense = block_diagonal(A)[:, :in_dim, :in_dim]
    G_dense = block_diagonal(G)[:, :out_dim, :out_dim]
    # The padded coordinates hold no curvature, as a padded factor built from data does.
    A = _zero_padding(A, layout_A)
    G = _zero_padding(G, layout_G)
    generator = torch.Generator().manual_seed(3)
    g = torch.randn(2, out_dim, in_dim, generator=generator)
    g1 = g + 0.5 * torch.randn(2, out_dim, in_dim, generator=generator)
    blocked = EigenPreconditioner.from_factors(A, G, 0.3, damping_mode, (layout_A, layout_G))
    dense = EigenPreconditioner.from_factors(A_dense, G_dense, 0.3, damping_mode)
    padded = [pad_matrix(m, layout_G, layout_A) for m in (g, 2 * (g1 - g))]
    if mode == "kfac":
        got, want = blocked.kfac(padded[0]), dense.kfac(g)
    else:
        got, want = blocked.fop(*padded, 1e-10), dense.fop(g, 2 * (g1 - g), 1e-10)
    # (fp32, as the decompositions are)
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got.direction[:, :out_dim, :in_dim], want.direction, **close)
    padding = got.direction.clone()
    padding[:, :out_dim, :in_dim] = 0
    assert padding.abs().max() < 1e-6  # nothing in the padded coordinates
    for name in ("beta", "eta", "rho", "kfac_cosine"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **close)


def _zero_padding(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    mask = torch.ones(layout.padded, dtype=blocks.dtype)
    mask[layout.dim :] = 0
    split = mask.reshape(layout.count, layout.size)
    return blocks * split[:, :, None] * split[:, None, :]


def test_the_moment_carried_into_blocked_bases_is_the_dense_carry() -> None:
    def bases(seed: int) -> torch.Tensor:
        return torch.linalg.qr(
            torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        )[0]

    old_A, new_A, old_G, new_G = bases(1), bases(2), bases(3), bases(4)
    moment = torch.rand(8, 8, dtype=torch.float64)  # both sides: 2 blocks of 4
    dense = [block_diagonal(b) for b in (old_A, old_G, new_A, new_G)]
    torch.testing.assert_close(
        carry_second_moment(moment, old_A, old_G, new_A, new_G),
        carry_second_moment(moment, dense[0], dense[1], dense[2], dense[3]),
    )


def _trained(block_size: int | None, steps: int, **settings: object) -> tuple[list[float], FOP]:
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, block_size=block_size, inverse_interval=2, **settings)
    return train(model, optimizer, tokens, labels, steps=steps), optimizer


def test_captured_blocked_factors_are_the_diagonal_blocks_of_whole_factors() -> None:
    # The hooks' factors of the blocks' layers (an embedding's: test_embeddings.py).
    hooked = {"targets": "auto", "precondition_embeddings": False}
    _, whole = _trained(None, 1, **hooked)
    _, blocked = _trained(8, 1, **hooked)  # A: 17 = 3 blocks of 6 (padded), G: 32 = 4 of 8
    for name in whole.layer_names:
        want, got = whole.curvature.layer_state(name), blocked.curvature.layer_state(name)
        for key in ("A", "G"):
            layout = BlockLayout.for_side(want[key].shape[-1], 8)
            assert got[key].shape == layout.factor_shape
            padded = pad_matrix(want[key], layout, layout)
            mask = block_diagonal(torch.ones(layout.factor_shape)).bool()
            torch.testing.assert_close(block_diagonal(got[key]), padded * mask)


def test_blocks_that_cover_every_side_change_nothing() -> None:
    losses, _ = _trained(None, 6)
    assert _trained(64, 6)[0] == losses  # every side (17, 32, 33, 16) fits in one block


@pytest.mark.parametrize(
    "settings",
    [
        {"curvature": "kronecker"},
        {"curvature": "eigen_corrected"},
        {"curvature": "eigen_corrected", "exponent": 0.5, "basis_refresh": "qr"},
    ],
    ids=["kronecker", "eigen-corrected", "qr-refresh"],
)
def test_a_blocked_run_resumes_exactly(settings: dict) -> None:
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, block_size=7, inverse_interval=2, **settings)
    train(model, optimizer, tokens, labels, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    uninterrupted = train(model, optimizer, tokens, labels, steps=3)
    resumed_model = TokenClassifier()
    resumed_model.load_state_dict(weights)
    resumed = FOP(resumed_model, block_size=7, inverse_interval=2, **settings)
    resumed.load_state_dict(saved)
    assert train(resumed_model, resumed, tokens, labels, steps=3) == uninterrupted
    whole = FOP(TokenClassifier(), inverse_interval=2, **settings)
    with pytest.raises(ValueError, match="shape"):
        whole.load_state_dict(saved)  # a blocked checkpoint needs the same block_size


def test_blocking_keeps_layers_whose_sides_exceed_max_factor_dim() -> None:
    model = TokenClassifier()
    assert len(partition_model(model, max_factor_dim=20).layers) < 4
    assert len(partition_model(model, max_factor_dim=20, block_size=16).layers) == 4


def test_a_side_longer_than_diagonal_above_keeps_its_diagonal_and_the_layer_its_other_side() -> (
    None
):
    # blocks.*.1 is Linear(16 -> 32): with diagonal_above=20 its G side (32) keeps its diagonal,
    # and the step is (A (x) diag(G) + damping I)^-1 g with A and G those of whole factors.
    tokens, labels = token_data()
    settings = kronecker(
        mode="kfac",
        lr=1.0,
        graft="none",
        momentum=0.0,
        weight_decay=0.0,
        damping=1e-3,
        damping_mode="absolute",
        targets=["blocks.0.1"],
    )
    runs = {}
    for diagonal_above in (None, 20):
        torch.manual_seed(0)
        model = TokenClassifier()
        layer = model.blocks[0][1]
        before = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()
        # max_factor_dim=20 would send a whole G side of 32 to AdamW; a diagonal one fits.
        cap = 8192 if diagonal_above is None else 20
        optimizer = FOP(
            model, **{**settings, "diagonal_above": diagonal_above, "max_factor_dim": cap}
        )
        assert optimizer.layer_names == ["blocks.0.1"]
        train(model, optimizer, tokens, labels, steps=1)
        after = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        runs[diagonal_above] = (optimizer.curvature.layer_state("blocks.0.1"), after - before, grad)
    (whole, _, grad), (diagonal, update, _) = runs[None], runs[20]
    assert diagonal["G"].shape == (32, 1, 1) and diagonal["A"].shape == (17, 17)
    torch.testing.assert_close(diagonal["A"], whole["A"])
    torch.testing.assert_close(diagonal["G"][:, 0, 0], torch.diagonal(whole["G"]))
    A, G = whole["A"].double(), torch.diag(torch.diagonal(whole["G"])).double()
    F = torch.kron(A, G) + 1e-3 * torch.eye(17 * 32, dtype=torch.float64)
    want = -unvec(torch.linalg.solve(F, vec(grad.double())), 32)
    assert_solve_close(update, want, F)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"block_size": 1}, "block_size must be"),
        ({"diagonal_above": 0}, "diagonal_above must be"),
    ],
)
def test_bad_block_settings_say_what_to_do(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FOP(TokenClassifier(), **settings)

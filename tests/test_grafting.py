"""Grafting by output change: the pure functions against explicit inputs, and the optimizer's
step against AdamW's first step measured the same way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_fop import FOP
from hf_fop.blocks import BlockLayout, block_gram
from hf_fop.grafting import graft_output, output_change
from tests.helpers import TokenClassifier, token_data


def _mean_squared_output_change(U: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """mean_n ||U x_n||^2 over explicit inputs x_n: the reference for tr(U A U^T)."""
    return (inputs @ U.mT).square().sum(-1).mean(-1)


@pytest.mark.parametrize("block_size", [None, 4])
def test_output_change_is_the_mean_squared_change_of_the_outputs(block_size: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 10, generator=generator, dtype=torch.float64)
    U = torch.randn(3, 5, 10, generator=generator, dtype=torch.float64)  # 3 layers of one shape
    layout = BlockLayout.for_side(10, block_size)
    A = block_gram(inputs, layout) / 64 if layout.blocked else inputs.T @ inputs / 64
    A = A.expand(3, *A.shape)  # one factor per layer of the stack, as a bucket holds them
    if layout.blocked:
        # Blocked, the factor keeps only the diagonal blocks: the reference sees each block's
        # inputs alone (zeros padded to whole blocks).
        padded = nn.functional.pad(inputs, (0, layout.padded - 10)).view(64, layout.count, -1)
        U_blocks = nn.functional.pad(U, (0, layout.padded - 10)).unflatten(-1, padded.shape[1:])
        expected = sum(
            _mean_squared_output_change(U_blocks[..., k, :], padded[:, k])
            for k in range(layout.count)
        )
    else:
        expected = _mean_squared_output_change(U, inputs)
    torch.testing.assert_close(output_change(U, A, layout)[:, 0, 0], expected)


def test_graft_output_keeps_the_direction_and_takes_adams_output_change() -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 10, generator=generator, dtype=torch.float64)
    inputs[:, 0] *= 20  # inputs concentrated along one direction, as a trained network's are
    A, layout = inputs.T @ inputs / 64, BlockLayout.for_side(10, None)
    direction = torch.randn(2, 5, 10, generator=generator, dtype=torch.float64)
    direction[1] = 0
    adam = torch.randn(2, 5, 10, generator=generator, dtype=torch.float64).sign()
    grafted = graft_output(direction, adam, A, layout)
    torch.testing.assert_close(
        _mean_squared_output_change(grafted[0], inputs),
        _mean_squared_output_change(adam[0], inputs),
    )
    cosine = nn.functional.cosine_similarity(grafted[0].flatten(), direction[0].flatten(), 0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(grafted[1], torch.zeros_like(grafted[1]))  # no direction stays none


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_output_grafted_step_changes_outputs_as_adamws_first_step(mode: str) -> None:
    tokens, labels = token_data()
    steps, inputs = {}, []
    for graft in ("output", "none"):
        torch.manual_seed(0)
        model = TokenClassifier()
        optimizer = FOP(model, mode=mode, graft=graft, lr=1e-3, momentum=0.0, weight_decay=0.0)
        layer = optimizer.layers[1]
        hook = layer.module.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
        nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
        hook.remove()
        grad, before = layer.grad_matrix().clone(), layer.weight.detach().clone()
        bias_before = layer.bias.detach().clone()
        optimizer.step()
        steps[graft] = torch.cat(
            [layer.weight.detach() - before, (layer.bias.detach() - bias_before)[:, None]], 1
        ).double()
    # The layer's inputs with the bias's constant coordinate, as its factor A sees them.
    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    adam = 1e-3 * grad.double() / (grad.double().abs() + 1e-8)  # AdamW's first step
    torch.testing.assert_close(
        _mean_squared_output_change(steps["output"], x),
        _mean_squared_output_change(adam, x),
        rtol=1e-4,
        atol=0,
    )
    cosine = nn.functional.cosine_similarity(steps["output"].flatten(), steps["none"].flatten(), 0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-5)

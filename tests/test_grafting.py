"""Grafting by output change: the pure functions against explicit inputs, and the optimizer's
step against AdamW's first step measured the same way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_fop import FOP
from hf_fop.blocks import BlockLayout, block_gram
from hf_fop.grafting import graft_output, output_change, trusted_scale
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


def test_trusted_scale_bounds_the_step_by_its_share_of_the_weights() -> None:
    direction = torch.tensor([3.0, 4.0, 1.0])[:, None, None] * torch.ones(3, 2, 2) / 2
    # ||u|| = 3, 4, 1 per layer; ||W||: 0 (a LoRA B at its start), and two sizes.
    weight_norms = torch.tensor([0.0, 100.0, 1.0])[:, None, None]
    bounded = torch.zeros(3, 1, 1, dtype=torch.bool)
    largest = trusted_scale(direction, weight_norms, lr=0.5, trust=0.02, unbounded=bounded)
    assert largest[0].item() == 1.0  # nothing to grow into: the rotated step as it is
    assert largest[1].item() == pytest.approx(0.02 * 100 / (0.5 * 4))  # room: exactly 1
    assert largest[2].item() == 1.0  # the rotated step is already larger: taken as it is
    assert trusted_scale(direction, weight_norms, 0.005, 0.02, bounded)[1].item() == (
        pytest.approx(0.02 * 100 / (0.005 * 4))
    )
    # A layer that started from zero is not bounded, whatever its weights now.
    exempt = torch.tensor([True, False, True])[:, None, None]
    largest = trusted_scale(direction, weight_norms, lr=0.5, trust=0.02, unbounded=exempt)
    assert largest[0].item() == largest[2].item() == float("inf")
    assert largest[1].item() == pytest.approx(1.0)


def _first_step(graft: str, lr: float, trust: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first step of layer 1 as [dW | db], its weight W before)."""
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, graft=graft, graft_trust=trust, lr=lr, momentum=0.0, weight_decay=0.0)
    layer = optimizer.layers[1]
    nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
    before = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).clone()
    optimizer.step()
    after = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    return (after - before).double(), before[:, :-1].double()


def test_graft_trust_grafts_small_steps_in_full_and_bounds_large_ones() -> None:
    # At a fine-tuning rate the bound is far: the step is the unbounded graft's, bit for bit.
    small = 1e-5
    assert torch.equal(_first_step("output", small, 0.02)[0], _first_step("output", small, None)[0])
    # At a rate whose rotated step alone is over 2% of the weights: the rotated step as it is.
    large = 1.0
    bounded, weights = _first_step("output", large, 0.02)
    rotated = _first_step("none", large, None)[0]
    assert rotated.norm() > 0.02 * weights.norm()
    torch.testing.assert_close(bounded, rotated, rtol=1e-6, atol=1e-9)
    # In between, where the graft would take the step past the bound: the bound's size exactly,
    # in the rotated step's direction.
    grafted, _ = _first_step("output", 1e-2, None)
    rotated, _ = _first_step("none", 1e-2, None)
    trust = (grafted.norm() * rotated.norm()).sqrt().item() / weights.norm().item()
    step, _ = _first_step("output", 1e-2, trust)
    assert grafted.norm() > step.norm() > rotated.norm()
    assert step.norm().item() == pytest.approx(trust * weights.norm().item(), rel=1e-5)
    cosine = nn.functional.cosine_similarity(step.flatten(), rotated.flatten(), 0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)


def test_a_layer_that_starts_from_zero_is_grafted_in_full_after_a_resume_too() -> None:
    # A zero-initialised residual projection (as a LoRA B): zero weights have no size to bound
    # a step by, so its graft acts in full; at a fine-tuning rate no other layer's bound binds.
    tokens, labels = token_data()
    runs = {}
    for run in ("bounded", "unbounded", "flag cleared"):
        torch.manual_seed(0)
        model = TokenClassifier()
        with torch.no_grad():
            model.blocks[0][3].weight.zero_()
        trust = None if run == "unbounded" else 0.02
        optimizer = FOP(model, graft_trust=trust, lr=1e-4, momentum=0.0, weight_decay=0.0)
        name = next(n for n, _ in optimizer.partition.layers if n.startswith("blocks.0.3"))
        flag = optimizer.curvature.layer_state(name)["starts_from_zero"]
        states = [optimizer.curvature.layer_state(n) for n in optimizer.curvature.names]
        flags = sum(s["starts_from_zero"].item() for s in states if "starts_from_zero" in s)
        assert flag.item() == flags == (0 if trust is None else 1)
        if run == "flag cleared":
            optimizer.load_state_dict(_with_flag_cleared(optimizer.state_dict(), optimizer, name))
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
            optimizer.step()
        runs[run] = (model, optimizer)
    weights = {run: model.blocks[0][3].weight.detach() for run, (model, _) in runs.items()}
    torch.testing.assert_close(weights["bounded"], weights["unbounded"], rtol=0, atol=0)
    assert not torch.allclose(weights["flag cleared"], weights["unbounded"], rtol=0.1)
    # A fresh optimizer on the trained (no longer zero) weights flags nothing; the checkpoint
    # brings back the flag of the run's first start.
    model, optimizer = runs["bounded"]
    resumed = FOP(model, lr=1e-4)
    assert resumed.curvature.layer_state(name)["starts_from_zero"].item() == 0
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.curvature.layer_state(name)["starts_from_zero"].item() == 1


def _with_flag_cleared(saved: dict, optimizer: FOP, name: str) -> dict:
    """``saved`` with the layer ``name``'s starts_from_zero flag set to 0."""
    weight = dict(optimizer.partition.layers)[name].weight
    index = next(
        i
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
        if p is weight
    )
    saved["state"][index]["curvature"]["starts_from_zero"] = torch.tensor(0.0)
    return saved

"""Loss scaling: FOP under torch.amp.GradScaler behaves as without it (fp32 reference)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_fop import FOP
from hf_fop.integration import FOPTrainer
from hf_fop.integration.trainer import unwrap_optimizer
from tests.helpers import TokenClassifier, fop_args, image_dataset, tiny_vit, token_data

pytestmark = pytest.mark.numerics

SCALE = 2.0**16


def _run(steps: int, scaler_mode: str, clip: float | None = None) -> tuple[nn.Module, list[float]]:
    """Train with no scaler, or a GradScaler stepping FOP directly ("step") or after unscale_
    for clipping, with the scaler passed to FOP ("told") or not ("untold")."""
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    scaler = None
    if scaler_mode != "none":
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10_000)
    optimizer = FOP(
        model,
        lr=1e-2,
        curvature_interval=1,
        inverse_interval=2,
        grad_scaler=scaler if scaler_mode == "told" else None,
    )
    losses = []
    for step in range(steps):
        batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
        loss = nn.functional.cross_entropy(model(tokens[batch]), labels[batch])
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
    return model, losses


def _assert_same_parameters(a: nn.Module, b: nn.Module, rtol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-7, msg=name)


def test_grad_scaler_step_gives_the_fp32_first_update_and_curve() -> None:
    reference, reference_losses = _run(1, "none")
    scaled, _ = _run(1, "step")
    _assert_same_parameters(scaled, reference, rtol=1e-4)
    reference, reference_losses = _run(30, "none")
    scaled, losses = _run(30, "step")
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) < 1e-3
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_unscale_before_step_needs_the_scaler_and_then_matches_fp32() -> None:
    reference, _ = _run(3, "none", clip=0.5)
    told, _ = _run(3, "told", clip=0.5)
    _assert_same_parameters(told, reference, rtol=1e-4)
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        _run(3, "untold", clip=0.5)


def test_a_step_the_scaler_skips_leaves_nothing_behind() -> None:
    # Run A overflows on batch 1 (the scaler skips that step); run B never sees batch 1. The
    # model's own zero_grad is used, so only FOP's handling of the skip can clear the hooks'
    # statistics of the overflowing backward.
    tokens, labels = token_data()
    models = []
    for batches in ((0, 1, 2, 3), (0, 2, 3)):
        torch.manual_seed(0)
        model = TokenClassifier()
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10_000)
        optimizer = FOP(model, lr=3e-3, curvature_interval=1, inverse_interval=1)
        for index in batches:
            chunk = slice(16 * index, 16 * index + 16)
            loss = nn.functional.cross_entropy(model(tokens[chunk]), labels[chunk])
            model.zero_grad(set_to_none=True)
            overflow = float("inf") if batches == (0, 1, 2, 3) and index == 1 else 1.0
            scaler.scale(loss * overflow).backward()
            scaler.step(optimizer)
            scaler.update(SCALE)  # the same scale in both runs
        assert optimizer.fop_group["step"] == 3
        models.append(model)
    _assert_same_parameters(models[0], models[1], rtol=1e-6)


def test_trainer_with_accelerates_scaler_moves_weights_like_fp32(tmp_path: Path) -> None:
    moved = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = tiny_vit()
        before = copy.deepcopy(model)
        # On a CPU accelerate does not unscale before clipping (it does for fp16 on a GPU), so
        # clipping here would clip the scaled gradients; unscale_-then-clip is covered by the
        # plain-loop test above.
        args = fop_args(tmp_path / str(scaled), max_steps=8, max_grad_norm=0.0)
        trainer = FOPTrainer(model=model, args=args, train_dataset=image_dataset())
        if scaled:  # what accelerate sets up for fp16 on a GPU
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        trainer.train()
        fop = unwrap_optimizer(trainer.optimizer)
        assert fop.grad_scaler is trainer.accelerator.scaler  # wired, the user did nothing
        moved[scaled] = {
            name: (p.detach() - q.detach()).norm().item()
            for (name, p), q in zip(model.named_parameters(), before.parameters())
            if "attention" in name and name.endswith("weight")
        }
    for name, distance in moved[False].items():
        assert distance > 1e-3
        assert moved[True][name] == pytest.approx(distance, rel=1e-3), name

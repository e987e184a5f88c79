"""A step never waits on the device: its skip decision stays a device flag, read afterwards."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from hf_fop import FOP
from tests.helpers import (
    TokenClassifier,
    ValueReads,
    assert_identical,
    device_ahead,
    image_data,
    tiny_vit,
    token_data,
)


@pytest.mark.parametrize("setup", ["grafted", "not grafted", "GradScaler"])
def test_a_step_reads_nothing_from_the_device(setup: str) -> None:
    images, labels = image_data()
    torch.manual_seed(0)
    model = tiny_vit()
    # Curvature every 2 steps, decompositions every 4 (eigh checks its result on the host);
    # the first steps also look for an unannounced loss scale.
    graft = "none" if setup == "not grafted" else "adamw"
    optimizer = FOP(model, graft=graft, curvature_interval=2, inverse_interval=4)
    scaler = torch.amp.GradScaler("cpu", enabled=setup == "GradScaler", init_scale=2.0**8)
    measured = 0
    with device_ahead():
        for step in range(12):
            batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
            loss = nn.functional.cross_entropy(model(images[batch]).logits, labels[batch])
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            optimizer._verdict.settle()  # the last step's flags, read outside the step measured
            group_step = optimizer.fop_group["step"]
            with ValueReads() as mode:
                scaler.step(optimizer)
            if group_step % 4 != 0:
                assert mode.reads == [], f"step {group_step} read {mode.reads}"
                assert optimizer._verdict.pending
                measured += 1
            scaler.update()
    assert measured == 9 and optimizer.fop_group["step"] == 12


def _train_with_bad_batches(bad: dict[int, str], batches: int) -> tuple[nn.Module, FOP]:
    """TokenClassifier trained on ``batches`` batches; ``bad[i]`` spoils batch i: "loss" (a NaN
    loss: every gradient and statistic), "grad" (one preconditioned gradient), "adamw" (an
    AdamW-side gradient), or "skip" (batch i is left out)."""
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, curvature_interval=2, inverse_interval=2, lr=3e-3)
    for index in range(batches):
        if bad.get(index) == "skip":
            continue
        chunk = slice(16 * (index % 4), 16 * (index % 4) + 16)
        loss = nn.functional.cross_entropy(model(tokens[chunk]), labels[chunk])
        if bad.get(index) == "loss":
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        if bad.get(index) == "grad":
            model.blocks[1][1].weight.grad[0, 0] = float("inf")
        if bad.get(index) == "adamw":
            model.embed.weight.grad[0, 0] = float("nan")
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("found", ["at once", "a step late"])
def test_skipped_steps_leave_what_a_run_without_those_batches_has(found: str) -> None:
    # Batch 0 is the first curvature step (and first decomposition), 3 falls on a curvature
    # step, 4 on the same step retried, 6 on a plain step.
    spoiled = {0: "loss", 3: "grad", 4: "adamw", 6: "grad"}
    reference_model, reference = _train_with_bad_batches(dict.fromkeys(spoiled, "skip"), 9)
    with device_ahead() if found == "a step late" else contextlib.nullcontext():
        model, optimizer = _train_with_bad_batches(spoiled, 9)
    assert optimizer.fop_group["step"] == reference.fop_group["step"] == 5
    assert_identical(copy.deepcopy(model.state_dict()), reference_model.state_dict())
    assert_identical(optimizer.state_dict(), reference.state_dict())


def test_a_skip_found_late_puts_the_step_count_back_before_the_next_step() -> None:
    model = TokenClassifier()
    optimizer = FOP(model, curvature_interval=3)
    tokens, labels = token_data()
    loss = nn.functional.cross_entropy(model(tokens[:16]), labels[:16]) * float("nan")
    loss.backward()
    with device_ahead():
        optimizer.step()
        # Not read yet: the count moved on, and the hooks gather factors in case it did not.
        assert optimizer.fop_group["step"] == 1 and optimizer.capture.collect_factors
    assert optimizer.statistics() is not None  # reading anything settles the flag
    assert optimizer.fop_group["step"] == 0
    assert all(not any(b.factor_updates) and not any(b.ready) for b in optimizer.curvature.buckets)


@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("taken", [True, False])
def test_the_hooks_gather_factors_for_the_step_that_comes_once_the_flag_is_known(
    taken: bool, settled: bool
) -> None:
    # Interval 3: after step 0 (a curvature step) the next is step 1 (no factors) if step 0 was
    # taken, step 0 again (factors) if it was skipped. Unknown when the step ends, the choice
    # is made when the hooks first ask, by then known.
    model = TokenClassifier()
    optimizer = FOP(model, curvature_interval=3)
    tokens, labels = token_data()
    loss = nn.functional.cross_entropy(model(tokens[:16]), labels[:16])
    loss = loss if taken else loss * float("nan")
    loss.backward()
    with device_ahead():
        optimizer.step()
    assert optimizer._verdict.pending
    if settled:  # read before the backward asks (a logging callback reading the statistics)
        optimizer.statistics()
    assert bool(optimizer.capture.collect_factors) is not taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_finite_check_finds_every_non_finite_element_and_nothing_else(
    dtype: torch.dtype,
) -> None:
    from hf_fop.mixed_precision import all_finite

    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(37, 53, generator=generator).to(dtype)
    assert all_finite(clean)
    # Finite values whose sum overflows (a check by summing would call them infinite).
    huge = torch.full((4, 8), torch.finfo(dtype).max, dtype=dtype)
    assert not huge.sum().isfinite() and all_finite(huge)
    assert all_finite(clean[:1, :1])
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in [(0, 0), (36, 52), (17, 9)]:
            bad = clean.clone()
            bad[index] = value
            assert not all_finite(bad), (value, index)
    both = clean.clone()
    both[1, 1], both[2, 2] = float("inf"), float("-inf")
    assert not all_finite(both)

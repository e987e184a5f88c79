"""The FOP optimizer: training, the AdamW fallback, checkpoints, bad input, non-finite steps."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from hf_fop import FOP, FOPConfig
from hf_fop.grafting import adam_direction, update_adam_second_moment
from tests.helpers import (
    TokenClassifier,
    assert_identical,
    image_data,
    kronecker,
    tiny_vit,
    token_data,
    train,
)


def _snapshot(model: nn.Module, optimizer: FOP) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_mlp_and_tiny_vit_train(mode: str) -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    before = copy.deepcopy(model)
    optimizer = FOP(
        model, **kronecker(mode=mode, lr=1e-2, curvature_interval=1, inverse_interval=2)
    )
    losses = train(model, optimizer, tokens, labels, steps=40)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # The AdamW side really moves: embeddings and LayerNorms.
    assert not torch.equal(model.embed.weight, before.embed.weight)
    assert not torch.equal(model.norm.weight, before.norm.weight)
    assert not torch.equal(model.blocks[0][0].bias, before.blocks[0][0].bias)
    if mode == "fop":
        stats = optimizer.statistics()
        assert 0.5 <= stats["eta_min"] <= stats["eta_max"] <= 1.0
        assert stats["beta_max"] != 0.0  # the correction is really on

    images, classes = image_data()
    vit = tiny_vit()
    optimizer = FOP(vit, **kronecker(mode=mode, lr=1e-2, curvature_interval=1, inverse_interval=2))
    blocks = next(m for m in vit.modules() if isinstance(m, nn.ModuleList))
    in_blocks = {id(m) for m in blocks.modules() if isinstance(m, nn.Linear)}
    assert {id(layer.module) for layer in optimizer.layers} == in_blocks  # attention and MLP
    assert len(in_blocks) == 12
    patch_before = vit.vit.embeddings.patch_embeddings.projection.weight.clone()
    losses = train(vit, optimizer, images, classes, steps=40)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert not torch.equal(vit.vit.embeddings.patch_embeddings.projection.weight, patch_before)


def test_kfac_mode_and_fop_mode_differ_only_by_the_correction() -> None:
    # A batch made of the same 8 examples twice has g1 = g2, so no orthogonal signal: FOP's
    # step must be K-FAC's exactly. On 16 distinct examples the correction changes the step.
    tokens, labels = token_data()
    doubled = (torch.cat([tokens[:8], tokens[:8]]), torch.cat([labels[:8], labels[:8]]))
    for (x, y), same in ((doubled, True), ((tokens[:16], labels[:16]), False)):
        runs = {}
        for mode in ("fop", "kfac"):
            torch.manual_seed(0)
            model = TokenClassifier()
            train(model, FOP(model, **kronecker(mode=mode)), x, y, steps=1)
            runs[mode] = model.blocks[0][1].weight.detach().clone()
        if same:
            torch.testing.assert_close(runs["fop"], runs["kfac"], rtol=1e-6, atol=1e-8)
        else:
            assert (runs["fop"] - runs["kfac"]).abs().max() > 1e-6


def test_adamw_fallback_matches_torch_adamw() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    reference = copy.deepcopy(model)
    # No preconditioned layer: every parameter takes the AdamW path.
    ours = FOP(
        model, targets=[], precondition_embeddings=False, adamw_lr=1e-2, adamw_weight_decay=0.1
    )
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    theirs = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        foreach=False,
    )
    train(model, ours, tokens, labels, steps=5)
    train(reference, theirs, tokens, labels, steps=5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_resumed_run_equals_uninterrupted_run() -> None:
    tokens, labels = token_data()
    settings = kronecker(curvature_interval=2, inverse_interval=3, lr=0.03)
    torch.manual_seed(0)
    model = TokenClassifier()
    initial = copy.deepcopy(model.state_dict())
    optimizer = FOP(model, **settings)
    train(model, optimizer, tokens, labels, steps=4)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, tokens[64:], labels[64:], steps=0)
    uninterrupted = train(model, optimizer, tokens, labels, steps=5)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = TokenClassifier()
    resumed_model.load_state_dict(initial)  # a fresh model, then the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer = FOP(resumed_model, **settings)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = train(resumed_model, resumed_optimizer, tokens, labels, steps=5)
    assert resumed == uninterrupted
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trips_before_the_first_step() -> None:
    model = TokenClassifier()
    optimizer = FOP(model)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    tokens, labels = token_data()
    torch.manual_seed(0)
    fresh_model = TokenClassifier()
    fresh_model.load_state_dict(model.state_dict())
    expected = train(fresh_model, FOP(fresh_model), tokens, labels, steps=3)
    assert train(model, optimizer, tokens, labels, steps=3) == expected


def test_curvature_stays_fp32_for_bf16_parameters() -> None:
    model = TokenClassifier().to(torch.bfloat16)
    optimizer = FOP(model, **kronecker(curvature_interval=1))
    tokens, labels = token_data()
    train(model, optimizer, tokens, labels, steps=1)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    state = optimizer.curvature.layer_state(optimizer.layer_names[0])
    assert state["A"].dtype == torch.float32 and state["eigvecs_G"].dtype == torch.float32
    assert state["gradient_exp_avg"].dtype == torch.float32  # the momentum


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(bad: float) -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, curvature_interval=1)
    train(model, optimizer, tokens, labels, steps=2)
    before = _snapshot(model, optimizer)
    loss = nn.functional.cross_entropy(model(tokens[:16]), labels[:16])
    optimizer.zero_grad()
    loss.backward()
    model.blocks[1][1].weight.grad[0, 0] = bad
    optimizer.step()
    assert_identical(_snapshot(model, optimizer), before)
    # The next good step goes ahead as usual.
    train(model, optimizer, tokens, labels, steps=1)
    assert not torch.equal(model.blocks[1][1].weight, before[0]["blocks.1.1.weight"])


def test_a_retired_setting_says_what_to_do() -> None:
    with pytest.raises(TypeError, match="method='inverse' retired"):
        FOP(TokenClassifier(), method="inverse")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lr", -0.1),
        ("damping", -1e-3),
        ("damping", 0.0),
        ("curvature_interval", 0),
        ("inverse_interval", 0),
        ("factor_rows", 0),
        ("output_factor_rows", 0),
        ("mode", "adam"),
        ("momentum", 1.5),
        ("kl_clip", -1.0),
        ("targets", "(unclosed"),
        ("targets", ["no_such_layer"]),
    ],
)
def test_invalid_settings_raise_value_error(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting.split("_")[0]):
        FOP(TokenClassifier(), **{setting: value})


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lr", "1e-3"),  # a command line's string
        ("lr", True),
        ("adamw_lr", "3e-4"),
        ("factor_rows", 2.5),
        ("curvature_interval", 2.0),
        ("kl_clip", "none"),
    ],
)
def test_settings_of_the_wrong_type_raise_type_error(setting: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{setting} must be (a number|an integer)"):
        FOP(TokenClassifier(), **{setting: value})


def test_numpy_numbers_are_numbers_to_the_settings() -> None:
    numpy = pytest.importorskip("numpy")
    config = FOPConfig(lr=numpy.float32(1e-3), factor_rows=numpy.int64(512))
    assert config.lr == pytest.approx(1e-3) and config.factor_rows == 512


def test_nothing_to_optimize_and_unknown_setting() -> None:
    model = TokenClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to optimize"), pytest.warns(UserWarning):
        FOP(model)
    with pytest.raises(TypeError, match="unknown FOP setting"):
        FOP(TokenClassifier(), dampening=0.1)
    with pytest.raises(TypeError, match="needs the model"):
        FOP(TokenClassifier().parameters())


def test_batch_of_one_falls_back_to_kfac_with_a_warning() -> None:
    tokens, labels = token_data()
    runs = {}
    for mode in ("fop", "kfac"):
        torch.manual_seed(0)
        model = TokenClassifier()
        optimizer = FOP(model, mode=mode)
        if mode == "fop":
            with pytest.warns(UserWarning, match="two halves"):
                train(model, optimizer, tokens, labels, steps=3, batch=1)
        else:
            train(model, optimizer, tokens, labels, steps=3, batch=1)
        runs[mode] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(*runs.values()):
        assert torch.equal(p, q)


def test_config_object_and_partition_summary() -> None:
    config = FOPConfig(damping=0.02, targets="all-linear", max_factor_dim=20)
    optimizer = FOP(TokenClassifier(), config)
    summary = optimizer.partition.summary()
    assert "FOP preconditions" in summary and "max_factor_dim=20" in summary
    assert {g["kind"] for g in optimizer.param_groups} == {"fop", "adamw"}
    assert all("lr" in g for g in optimizer.param_groups)


def test_clipped_gradients_give_the_clip_factor_times_the_fop_step() -> None:
    # Clipping scales p.grad (g_avg) but not g1 from the hooks: FOP's step must still be exactly
    # c times the unclipped one, because only the F-orthogonal part of g1 enters it.
    tokens, labels = token_data()
    deltas = []
    for clip in (None, 0.3):
        torch.manual_seed(0)
        model = TokenClassifier()
        optimizer = FOP(model, **kronecker(graft="none", momentum=0.0, weight_decay=0.0))
        nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
        if clip is not None:
            for p in model.parameters():
                p.grad.mul_(clip)
        layer = optimizer.layers[0]
        before = layer.weight.detach().clone()
        optimizer.step()
        assert optimizer.statistics()["beta_max"] != 0
        deltas.append(layer.weight.detach() - before)
    torch.testing.assert_close(deltas[1], 0.3 * deltas[0], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("graft", ["adamw", "none"])
def test_kl_clip_scales_the_preconditioned_step_by_its_formula(graft: str) -> None:
    # nu = min(1, sqrt(kl_clip / (lr^2 sum_l <n_l, g_l>))), n_l the direction of layer l: with
    # momentum and weight decay off the clipped step is nu times the unclipped one, and nu is
    # recomputed here from that step and the gradients.
    tokens, labels = token_data()
    lr, kl_clip = 0.1, 1e-4
    runs = []
    for clip in (None, kl_clip):
        torch.manual_seed(0)
        model = TokenClassifier()
        optimizer = FOP(
            model,
            **kronecker(lr=lr, graft=graft, momentum=0.0, weight_decay=0.0, kl_clip=clip),
        )
        nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
        preconditioned = {id(p) for p in optimizer.fop_group["params"]}
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        deltas = {name: p.detach() - before[name] for name, p in model.named_parameters()}
        fop_names = [n for n, p in model.named_parameters() if id(p) in preconditioned]
        runs.append((deltas, grads, optimizer.statistics()["kl_scale"]))
    (unclipped, grads, scale_off), (clipped, _, scale) = runs
    vg = sum((-unclipped[n] / lr * grads[n]).sum() for n in fop_names)
    nu = min(1.0, (kl_clip / (lr**2 * vg)).sqrt().item())
    assert scale_off == 1.0 and nu < 0.5  # the clip binds
    assert scale == pytest.approx(nu, rel=1e-5)
    for name, delta in clipped.items():
        # The preconditioned layers take nu times the step; the AdamW side is not clipped.
        factor = nu if name in fop_names else 1.0
        torch.testing.assert_close(delta, factor * unclipped[name], rtol=1e-4, atol=1e-8)


def test_accumulation_steps_are_learned_from_the_previous_step() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model)  # gradient_accumulation_steps not given
    for _ in range(2):
        optimizer.zero_grad()
        for chunk in (slice(0, 8), slice(8, 16)):
            (nn.functional.cross_entropy(model(tokens[chunk]), labels[chunk]) / 2).backward()
        optimizer.step()
    # Second step: g1 is the gradient over the first micro-batch, the first half of the step.
    reference = copy.deepcopy(model)
    optimizer.zero_grad()
    for chunk in (slice(0, 8), slice(8, 16)):
        (nn.functional.cross_entropy(model(tokens[chunk]), labels[chunk]) / 2).backward()
    g1 = optimizer.capture.stats[optimizer.layer_names.index("blocks.0.1")].g1()
    nn.functional.cross_entropy(reference(tokens[:8]), labels[:8]).backward()
    layer = reference.blocks[0][1]
    expected = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(g1, expected, rtol=1e-5, atol=1e-6)


def test_adam_step_norm_matches_torch_adam_over_several_steps() -> None:
    # The grafting norm is the size of the step torch's Adam (no momentum) takes, step by step.
    param = nn.Parameter(torch.zeros(5, 3))
    adam = torch.optim.Adam([param], lr=1.0, betas=(0.0, 0.999), eps=1e-8, foreach=False)
    exp_avg_sq = torch.zeros(5, 3)
    for step in range(1, 5):
        grad = torch.randn(5, 3) * step
        before = param.detach().clone()
        param.grad = grad.clone()
        adam.step()
        expected = torch.linalg.vector_norm(param.detach() - before)
        exp_avg_sq = update_adam_second_moment(exp_avg_sq, grad, 0.999)
        norm = torch.linalg.vector_norm(adam_direction(grad, exp_avg_sq, 0.999, 1e-8, step))
        assert norm.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_grafted_step_has_adams_size_and_fops_direction(mode: str) -> None:
    tokens, labels = token_data()
    steps = {}
    for graft in ("adamw", "none"):
        torch.manual_seed(0)
        model = TokenClassifier()
        optimizer = FOP(model, mode=mode, graft=graft, lr=1e-3, momentum=0.0, weight_decay=0.0)
        nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
        layer = optimizer.layers[1]
        grad, before = layer.grad_matrix().clone(), layer.weight.detach().clone()
        bias_before = layer.bias.detach().clone()
        optimizer.step()
        steps[graft] = torch.cat(
            [layer.weight.detach() - before, (layer.bias.detach() - bias_before)[:, None]], 1
        )
    # AdamW's first step on this layer: lr * g / (|g| + eps), elementwise.
    adam_norm = 1e-3 * torch.linalg.vector_norm(grad / (grad.abs() + 1e-8))
    assert torch.linalg.vector_norm(steps["adamw"]).item() == pytest.approx(
        adam_norm.item(), rel=1e-4
    )
    cosine = nn.functional.cosine_similarity(steps["adamw"].flatten(), steps["none"].flatten(), 0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-5)


def test_tiny_vit_trains_at_the_adamw_learning_rate_as_well_as_adamw() -> None:
    # The drop-in promise: only the optimizer changes; the learning rate stays AdamW's.
    images, classes = image_data(256)
    accuracies, losses = {}, {}
    for name in ("adamw", "fop"):
        torch.manual_seed(0)
        vit = tiny_vit()
        if name == "fop":
            optimizer = FOP(vit, lr=3e-3)
        else:
            optimizer = torch.optim.AdamW(vit.parameters(), lr=3e-3)
        losses[name] = train(vit, optimizer, images[:192], classes[:192], steps=60, batch=32)
        vit.eval()
        with torch.no_grad():
            predicted = vit(pixel_values=images[192:]).logits.argmax(-1)
        accuracies[name] = (predicted == classes[192:]).float().mean().item()
    assert accuracies["adamw"] >= 0.95
    assert accuracies["fop"] >= 0.95
    assert sum(losses["fop"][-5:]) / 5 < 0.5  # from ln 4 = 1.39 at the start


def test_added_parameters_join_the_adamw_side_and_train() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, lr=1e-2)
    extra = nn.Linear(4, 4)
    model.extra_head = extra
    optimizer.add_param_group({"params": list(extra.parameters())})
    assert optimizer.param_groups[-1]["kind"] == "adamw"
    before = extra.weight.detach().clone()
    out = model(tokens[:16])
    loss = nn.functional.cross_entropy(extra(out), labels[:16])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(extra.weight, before)
    with pytest.raises(ValueError, match="join the AdamW side"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "kind": "fop"})


@pytest.mark.parametrize("scheduler", ["one_cycle", "cyclic"])
def test_cyclic_schedulers_drive_lr_and_momentum_of_every_group(scheduler: str) -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, lr=1e-2)
    if scheduler == "one_cycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
    else:
        schedule = torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=1e-3, max_lr=1e-2, step_size_up=5, cycle_momentum=True
        )
    momenta = []
    for _ in range(4):
        train(model, optimizer, tokens, labels, steps=1)
        schedule.step()
        momenta.append(optimizer.fop_group["betas"][0])
    assert len(set(momenta)) > 1  # the FOP group's momentum is cycled too
    assert all(g["betas"][0] == optimizer.fop_group["betas"][0] for g in optimizer.param_groups)


def test_resume_with_another_damping_uses_the_new_one_and_says_so() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, damping=0.1)
    train(model, optimizer, tokens, labels, steps=2)
    saved = optimizer.state_dict()
    optimizer.remove_hooks()
    resumed = FOP(model, damping=0.3)
    with pytest.warns(UserWarning, match="damping=0.1 is replaced by this optimizer's damping=0.3"):
        resumed.load_state_dict(saved)
    assert resumed.fop_group["damping"] == 0.3
    train(model, resumed, tokens, labels, steps=1)
    assert resumed.statistics()["damping"] == 0.3


def test_the_fop_group_is_the_one_source_of_the_damping_a_load_keeps() -> None:
    # A damping set on the group after construction (by hand or by a schedule) is the one the
    # step uses and the one a load keeps, not the value the optimizer was built with.
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, damping=0.1, kl_clip=None)
    train(model, optimizer, tokens, labels, steps=2)
    saved = optimizer.state_dict()
    optimizer.fop_group["damping"] = 0.5
    with pytest.warns(UserWarning, match="damping=0.1 is replaced by this optimizer's damping=0.5"):
        optimizer.load_state_dict(saved)
    assert optimizer.fop_group["damping"] == 0.5 and optimizer.fop_group["kl_clip"] is None
    train(model, optimizer, tokens, labels, steps=1)
    assert optimizer.statistics()["damping"] == 0.5

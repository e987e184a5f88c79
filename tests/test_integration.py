"""The Hugging Face integration: arguments, FOPTrainer, factory, checkpoints, PEFT, the opt-in."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

from hf_fop import FOP
from hf_fop.integration import FOPFactory, FOPTrainer, FOPTrainingArguments, parse_optim_args
from hf_fop.integration.trainer import unwrap_optimizer
from tests.helpers import (
    fop_args,
    image_dataset,
    kronecker_optim_args,
    lm_dataset,
    text_dataset,
    tiny_bert,
    tiny_gpt2,
    tiny_vit,
)

ROOT = Path(__file__).resolve().parents[1]


def _losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_arguments_accept_fop_from_python_and_command_line() -> None:
    args = FOPTrainingArguments(output_dir="x", optim="fop", report_to="none", use_cpu=True)
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "fop"
    assert json.loads(args.to_json_string())["optim"] == "fop"
    assert args.to_dict()["fop_damping"] is None  # FOPConfig's default applies

    (parsed,) = HfArgumentParser(FOPTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--optim",
            "kfac",
            "--fop_damping",
            "0.05",
            "--use_cpu",
            "--report_to",
            "none",
        ]
    )
    assert parsed.to_dict()["optim"] == "kfac" and parsed.fop_damping == 0.05

    for cls in (FOPTrainingArguments, TrainingArguments):
        with pytest.raises(ValueError, match="is not a valid OptimizerNames"):
            cls(output_dir="x", optim="no_such_optimizer", report_to="none")


def test_optim_args_are_typed() -> None:
    parsed = parse_optim_args(
        "damping=0.02, curvature_interval=10,kl_clip=none,targets=all-linear,adamw_betas=0.9:0.98"
    )
    assert parsed == {
        "damping": 0.02,
        "curvature_interval": 10,
        "kl_clip": None,
        "targets": "all-linear",
        "adamw_betas": (0.9, 0.98),
    }
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_optim_args("dampning=0.1")
    with pytest.raises(ValueError, match="not a valid"):
        parse_optim_args("curvature_interval=often")


def _every_layer(model: nn.Module) -> set[int]:
    """The ids of every Linear, Conv1D, Conv2d and Embedding whose weight no other holds."""
    kinds = (nn.Embedding, nn.Linear, Conv1D, nn.Conv2d)
    layers, seen = set(), set()
    for module in sorted(model.modules(), key=lambda m: not isinstance(m, nn.Embedding)):
        if isinstance(module, kinds) and id(module.weight) not in seen:
            layers.add(id(module))
            seen.add(id(module.weight))
    return layers


@pytest.mark.parametrize(
    ("make_model", "make_data"),
    [(tiny_vit, image_dataset), (tiny_bert, text_dataset), (tiny_gpt2, lm_dataset)],
    ids=["vit", "bert", "gpt2"],
)
def test_fop_trainer_trains_hf_models(tmp_path: Path, make_model, make_data) -> None:
    model = make_model()
    args = fop_args(tmp_path, max_steps=24, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = FOPTrainer(model=model, args=args, train_dataset=make_data())
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4

    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, FOP)
    # Every Linear, Conv and embedding (the patch embedding, a pooler and a classifier too), a
    # tied LM head through its embedding; each one got curvature. The LayerNorms, position
    # parameters and CLS token stay with AdamW.
    assert {id(layer.module) for layer in optimizer.layers} == _every_layer(model)
    assert all(optimizer.curvature.layer_state(n)["factor_updates"] for n in optimizer.layer_names)
    adamw = {id(p) for g in optimizer.param_groups if g["kind"] == "adamw" for p in g["params"]}
    norms = [m.weight for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(id(p) in adamw for p in norms)
    matrices = [n for n, p in model.named_parameters() if id(p) in adamw and p.dim() >= 2]
    assert all("position_embeddings" in n or "cls_token" in n for n in matrices), matrices
    # FOP's statistics reach the Trainer's logs.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("fop/eta_mean" in entry and "fop/rho_mean" in entry for entry in logged)
    assert min(entry["fop/eta_min"] for entry in logged) >= 0.5


def test_resume_from_checkpoint_continues_exactly(tmp_path: Path) -> None:
    # BERT: transformers 5.24 saves ViT checkpoints under legacy key names that its own resume
    # path does not map back, which would test transformers rather than FOP.
    settings = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        fop_curvature_interval=2,
        fop_inverse_interval=2,
    )
    torch.manual_seed(0)
    full = FOPTrainer(
        model=tiny_bert(), args=fop_args(tmp_path, **settings), train_dataset=text_dataset()
    )
    full.train()

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = FOPTrainer(
        model=tiny_bert(),
        args=fop_args(tmp_path, output_dir=str(tmp_path / "resumed"), **settings),
        train_dataset=text_dataset(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    # log_history restores steps 1-3 from the checkpoint; steps 4-6 are trained again.
    assert len(_losses(resumed)) == 6
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-6, abs=1e-7)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_resume_restores_vit_weights_saved_under_legacy_names(tmp_path: Path) -> None:
    from hf_fop.integration.trainer import reload_renamed_weights

    trained = tiny_vit()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    trained.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        if set(handle.keys()) == set(trained.state_dict()):
            pytest.skip("this transformers release saves ViT weights under their own names")
    fresh = tiny_vit()
    assert reload_renamed_weights(fresh, str(tmp_path))
    for p, q in zip(trained.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_gradient_accumulation_gives_the_same_first_update(tmp_path: Path) -> None:
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = tiny_vit()
        args = fop_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,
            # The Kronecker path: Adam-normalised first steps (the defaults) turn round-off on
            # near-zero coordinates into differences of order lr.
            optim_args=kronecker_optim_args(curvature_interval=1, inverse_interval=2),
        )
        FOPTrainer(model=model, args=args, train_dataset=image_dataset()).train()
        results.append(copy.deepcopy(model.state_dict()))
    # Updates are ~1e-2; the first factors come from one 8-example estimate, whose fp32
    # round-off (summation order differs between 8 x 1 and 4 x 2) the preconditioner amplifies
    # up to ~1e-4 relative. A wrong split of g1 would differ at O(1).
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-5)


def test_peft_lora_preconditions_only_the_adapters(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_bert()
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    trainer = FOPTrainer(
        model=model, args=fop_args(tmp_path, max_steps=8), train_dataset=text_dataset()
    )
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    # The adapters and the trainable classifier (PEFT's copy of it), nothing frozen.
    names = [n for n in optimizer.layer_names if "classifier" not in n]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 blocks x (query, value) x (A, B)
    fop = {id(p) for layer in optimizer.layers for p in layer.params}
    assert all(p.requires_grad for p in model.parameters() if id(p) in fop)
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    adamw = {id(p) for g in optimizer.param_groups if g["kind"] == "adamw" for p in g["params"]}
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head and all(id(p) in fop | adamw for p in head)


def test_plain_trainer_with_the_factory(tmp_path: Path) -> None:
    model = tiny_vit()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=8,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=image_dataset(),
        # "model" in the kwargs serves transformers releases without the factory branch too.
        optimizer_cls_and_kwargs=(
            FOPFactory,
            {"model": model, "lr": 0.01, "adamw_lr": 3e-3, "curvature_interval": 1},
        ),
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, FOP)
    losses = _losses(trainer)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_unmodified_script_with_the_opt_in_launcher(tmp_path: Path) -> None:
    script = ROOT / "tests" / "scripts" / "stock_trainer_script.py"
    command = [
        sys.executable,
        "-m",
        "hf_fop.run",
        str(script),
        "--output_dir",
        str(tmp_path),
        "--optim",
        "fop",
        "--optim_args",
        "damping=0.02,curvature_interval=1",
        "--learning_rate",
        "3e-3",
        "--max_steps",
        "16",
        "--per_device_train_batch_size",
        "16",
        "--lr_scheduler_type",
        "constant",
        "--report_to",
        "none",
        "--use_cpu",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["optimizer"] == "FOP" and summary["damping"] == 0.02
    assert summary["last_loss"] < summary["first_loss"]
    # The stock script's output says that FOP is on and what it takes, and its logs carry
    # FOP's statistics as under FOPTrainer.
    assert "hf-fop: FOP preconditions 14 layers" in result.stderr  # all-linear: 12 + 2
    assert summary["logged_fop_statistics"]


def test_bad_optim_args_fail_when_the_arguments_are_parsed() -> None:
    from hf_fop import enable

    enable()
    with pytest.raises(ValueError, match="damping must be"):
        TrainingArguments(output_dir="x", optim="fop", optim_args="damping=-1", report_to="none")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        TrainingArguments(output_dir="x", optim="fop", optim_args="dampnig=1", report_to="none")
    with pytest.raises(ValueError, match="graft must be"):
        FOPTrainingArguments(output_dir="x", optim="kfac", fop_graft="sgd", report_to="none")


def test_the_package_reports_the_version_pyproject_declares() -> None:
    import tomllib

    import hf_fop

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert hf_fop.__version__ == pyproject["project"]["version"]

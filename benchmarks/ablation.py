"""The ablation of FOP's curvature across tasks, from the drop-in runs, in one table and plot.

    python -m benchmarks.ablation [--results benchmarks/results/ablation]

Reads every ``drop_in_<task>.json`` under ``--results`` and its folders (tuned runs, and those
of ``--fixed_lr``: the variants run at AdamW's rate only) and writes ``ablation.md`` and
``ablation.png`` there: per task and batch, each optimizer's final metric over the reporting
seeds (mean [min, max]) and its learning rate, and the goals (FOP against the better of Muon
and SOAP; FOP against its own K-FAC mode beyond the seeds' spread). Nothing is trained here; the
commands that trained are listed in the table's header.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.drop_in import RESULTS, summarise
from benchmarks.optimizers import NAMES

PEERS = ("muon", "soap")


def load(results: Path) -> list[dict[str, Any]]:
    """Every drop-in result under ``results`` and its folders (``at_adamw_rate``: one rate for
    every optimizer, ``--fixed_lr``; the others tuned), tuned ones first."""
    found = []
    for path in sorted(results.glob("drop_in_*.json")) + sorted(results.glob("*/drop_in_*.json")):
        result = json.loads(path.read_text())
        result["tuned"] = "--fixed_lr" not in result["command"]
        found.append(result)
    return sorted(found, key=lambda result: not result["tuned"])


def rows_by_task(results: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(task, batch) -> one row per optimizer, tuned runs first."""
    table: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        for row in summarise(result):
            row = {**row, "tuned": result["tuned"], "metric": result["metric"]}
            table.setdefault((result["task"], row["batch"]), []).append(row)
    return table


def _better(metric: str) -> Any:
    return max if metric == "accuracy" else min


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """FOP against the better peer and against its own K-FAC mode, per FOP variant (tuned)."""
    metric = rows[0]["metric"]
    better = _better(metric)
    by_name = {r["optimizer"]: r for r in rows if r["tuned"]}
    peers = [by_name[p] for p in PEERS if p in by_name]
    lines = []
    if not peers:
        return lines
    best_peer = better(peers, key=lambda r: r["final_mean"])
    for name, row in by_name.items():
        if not name.startswith("fop"):
            continue
        kfac = by_name.get("kfac" + name[len("fop") :])
        wins = better(row["final_mean"], best_peer["final_mean"]) == row["final_mean"]
        text = (
            f"{NAMES[name]}: {row['final_mean']:.4g} vs {NAMES[best_peer['optimizer']]} "
            f"{best_peer['final_mean']:.4g} ({'met' if wins else 'not met'})"
        )
        if kfac is not None:
            text += f"; its K-FAC mode {kfac['final_mean']:.4g}: " + _verdict(
                row["finals"], kfac["finals"], metric
            )
        lines.append(text)
    return lines


def _verdict(fop: list[float], kfac: list[float], metric: str) -> str:
    """Whether the correction wins beyond the seeds' spread; one seed has no spread to judge."""
    if min(len(fop), len(kfac)) < 2:
        return "one seed, no spread to judge the correction by"
    if _separated(fop, kfac, metric):
        return "the correction wins beyond the seeds' spread"
    return "the correction does not win beyond the spread"


def _separated(fop: list[float], kfac: list[float], metric: str) -> bool:
    """FOP's worst seed is better than K-FAC's best one."""
    if metric == "accuracy":
        return min(fop) > max(kfac)
    return max(fop) < min(kfac)


def markdown(table: dict[tuple[str, int], list[dict[str, Any]]], commands: list[str]) -> str:
    lines = [
        "# Ablation: FOP's curvature against AdamW, Muon and SOAP",
        "",
        "Each row: the final metric over the reporting seeds, mean [min, max] (accuracy: higher "
        "is better; perplexity: lower), and the learning rate. Tuned rows picked their rate on "
        "seed 0 (bracketed grid, '(edge)': the pick is at an edge of the grid tried); rows "
        "marked 'at AdamW's rate' ran one rate without tuning. Written by "
        "`python -m benchmarks.ablation` from the drop-in runs:",
        "",
        *[f"- `{command}`" for command in commands],
    ]
    for (task, batch), rows in table.items():
        metric = rows[0]["metric"]
        fmt = (lambda v: f"{v:.4f}") if metric == "accuracy" else (lambda v: f"{v:.1f}")
        lines += [
            "",
            f"## {task}, batch {batch}",
            "",
            f"| optimizer | lr | final {metric}: mean [min, max] | seeds |",
            "|---|---|---|---|",
        ]
        for r in rows:
            edge = "" if r.get("lr_interior") in (True, None) else " (edge)"
            rate = f"{r['lr']:g}{edge}" + ("" if r["tuned"] else " (at AdamW's rate)")
            spread = f"{fmt(r['final_mean'])} [{fmt(min(r['finals']))}, {fmt(max(r['finals']))}]"
            lines.append(f"| {NAMES[r['optimizer']]} | {rate} | {spread} | {len(r['finals'])} |")
        found = goals(rows)
        if found:
            lines += ["", "Goals:", "", *[f"- {line}" for line in found]]
    return "\n".join(lines) + "\n"


def plot(table: dict[tuple[str, int], list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(table))
    lines = -(-len(table) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5.6 * columns, 5 * lines), squeeze=False)
    for axis in axes.flat[len(table) :]:
        axis.set_visible(False)
    for axis, ((task, batch), rows) in zip(axes.flat, table.items()):
        names = [NAMES[r["optimizer"]] + ("" if r["tuned"] else " *") for r in rows]
        means = [r["final_mean"] for r in rows]
        low = [r["final_mean"] - min(r["finals"]) for r in rows]
        high = [max(r["finals"]) - r["final_mean"] for r in rows]
        colours = [
            "C0" if r["optimizer"] in ("adamw", *PEERS) else "C2" if r["tuned"] else "C7"
            for r in rows
        ]
        axis.barh(range(len(rows)), means, xerr=[low, high], color=colours)
        axis.set_yticks(range(len(rows)), names, fontsize=7)
        axis.invert_yaxis()
        metric = rows[0]["metric"]
        axis.set_xlabel(
            f"final {metric} ({'higher' if metric == 'accuracy' else 'lower'} is better)"
        )
        axis.set_title(f"{task}, batch {batch}", fontsize=9)
        finite = [m for m in means if m == m and m != float("inf")]
        if finite:
            span = max(finite) - min(finite)
            axis.set_xlim(min(finite) - 0.15 * span, max(finite) + 0.15 * span)
        axis.grid(alpha=0.3, axis="x")
    figure.suptitle("peers blue, FOP/K-FAC tuned green, * at AdamW's rate untuned (grey)")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS / "ablation")
    args = parser.parse_args(argv)
    results = load(args.results)
    if not results:
        raise SystemExit(f"no drop_in_*.json under {args.results}: run benchmarks.drop_in first")
    table = rows_by_task(results)
    text = markdown(table, [r["command"] for r in results])
    (args.results / "ablation.md").write_text(text)
    plot(table, args.results / "ablation.png")
    print(text)
    print(
        f"wrote {args.results / 'ablation.md'} and ablation.png; seeds per row: "
        f"{statistics.mean(len(r['finals']) for rows in table.values() for r in rows):.0f}"
    )
    return text


if __name__ == "__main__":
    main()

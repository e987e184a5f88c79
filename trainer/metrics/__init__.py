"""evaluate metrics shipped with hf-fop, loaded by path so that evaluation works offline.

from hf_fop_trainer.metrics import load_metric
accuracy = load_metric("accuracy")
groups = load_metric("group_accuracy")  # many / medium / few-shot accuracy
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("accuracy", "group_accuracy")


def metric_path(name: str) -> str:
    """The file evaluate.load takes for a shipped metric."""
    if name not in AVAILABLE:
        raise ValueError(f"unknown metric {name!r}; hf-fop ships {AVAILABLE}")
    return str(METRICS_DIR / f"{name}.py")


def load_metric(name: str, **kwargs: Any) -> Any:
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)

"""The shipped evaluate metrics load by path, offline, and compute hand-checked numbers."""

from __future__ import annotations

import pytest
from hf_fop_trainer.metrics import load_metric


def test_accuracy_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}


def test_group_accuracy_splits_many_medium_few(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_metric("group_accuracy")
    # Training counts: class 0 many (500), class 1 medium (50), class 2 few (5).
    result = metric.compute(
        predictions=[0, 0, 1, 0, 2, 1],
        references=[0, 0, 1, 1, 2, 2],
        class_counts=[500, 50, 5],
    )
    assert result == {
        "accuracy": pytest.approx(4 / 6),
        "many_shot_accuracy": 1.0,  # 2 of 2
        "medium_shot_accuracy": 0.5,  # 1 of 2
        "few_shot_accuracy": 0.5,  # 1 of 2
    }
    only_many = metric.compute(predictions=[0], references=[0], class_counts=[500, 50, 5])
    assert only_many["few_shot_accuracy"] is None


def test_bad_metric_input_is_explained() -> None:
    with pytest.raises(ValueError, match="ships"):
        load_metric("f1")
    with pytest.raises(ValueError, match="one training count per class"):
        load_metric("group_accuracy").compute(predictions=[3], references=[3], class_counts=[1, 2])

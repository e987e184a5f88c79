"""Accuracy per class-frequency group (many / medium / few-shot), as in long-tailed benchmarks.

A class is "many-shot" with more than ``many_threshold`` training examples, "few-shot" with fewer
than ``few_threshold``, "medium-shot" otherwise (defaults 100 and 20, the ImageNet-LT
convention). Each group's accuracy is over the evaluation examples of its classes.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy overall and per many/medium/few-shot class group."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    class_counts (list of int): training examples per class, indexed by label.
    many_threshold (int, default 100): more than this many training examples: many-shot.
    few_threshold (int, default 20): fewer than this many: few-shot.
Returns:
    accuracy, many_shot_accuracy, medium_shot_accuracy, few_shot_accuracy (float or None when a
    group has no evaluation example).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GroupAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, class_counts, many_threshold=100, few_threshold=20):
        predictions, references = np.asarray(predictions), np.asarray(references)
        counts = np.asarray(class_counts)
        if len(references) == 0:
            raise ValueError("accuracy of an empty evaluation set is undefined: pass some examples")
        if references.max() >= len(counts):
            raise ValueError(
                f"class_counts has {len(counts)} entries but a reference label is "
                f"{references.max()}: give one training count per class"
            )
        correct = predictions == references
        per_example = counts[references]
        groups = {
            "many_shot_accuracy": per_example > many_threshold,
            "medium_shot_accuracy": (per_example <= many_threshold)
            & (per_example >= few_threshold),
            "few_shot_accuracy": per_example < few_threshold,
        }
        result = {"accuracy": float(correct.mean())}
        for name, mask in groups.items():
            result[name] = float(correct[mask].mean()) if mask.any() else None
        return result

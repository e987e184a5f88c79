"""Benchmark tasks: data built offline (scikit-learn's digits, generated MNIST-1D) and models.

Every task is small enough to train in seconds to minutes on two CPU cores, yet its layers are
wide enough that the optimizer's matrix work is a real part of a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hf_fop_trainer.data import long_tail_indices
from torch import Tensor, nn


@dataclass
class Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    make_model: Callable[[], nn.Module]
    batch_sizes: list[int]
    epochs: int
    # Training examples per class: many/medium/few-shot groups for the long-tailed tasks.
    class_counts: list[int] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def train_size(self) -> int:
        return len(self.x_train)


def digits_tensors() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def small_vit(
    image_size: int, patch_size: int, layers: int, intermediate: int, width: int = 64
) -> nn.Module:
    """A Hugging Face ViT for one-channel images and ten classes, returning logits."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        num_labels=10,
    )
    return LogitsOnly(ViTForImageClassification(config))


def digits_vit() -> nn.Module:
    return small_vit(image_size=8, patch_size=2, layers=3, intermediate=256)


class LogitsOnly(nn.Module):
    """A transformers classifier that returns logits, like the other benchmark models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def mnist1d_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _mnist1d(samples: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    data = make_dataset(args)  # generated locally from the package's templates
    x_tr = torch.tensor(data["x"], dtype=torch.float32)
    mean, std = x_tr.mean(), x_tr.std()
    x_te = torch.tensor(data["x_test"], dtype=torch.float32)
    return (
        (x_tr - mean) / std,
        torch.tensor(data["y"]),
        (x_te - mean) / std,
        torch.tensor(data["y_test"]),
    )


def hub_image_task(dataset_name: str) -> Task:
    """Any `datasets` image-classification set (e.g. "cifar10"), for users with a GPU: images
    resized to 32 x 32, a ViT with 6 layers of width 256, the official test split."""
    from datasets import load_dataset
    from hf_fop_trainer.data import IMAGE_COLUMNS, LABEL_COLUMNS, find_column, image_transform

    splits = load_dataset(dataset_name)
    train, test = splits["train"], splits["test" if "test" in splits else "validation"]
    image = find_column(train.column_names, IMAGE_COLUMNS, "image")
    label = find_column(train.column_names, LABEL_COLUMNS, "label")
    channels = 1 if train[0][image].mode == "L" else 3
    transform = image_transform(image, label, 32, channels)
    tensors = [transform(split[:]) for split in (train, test)]
    classes = train.features[label].num_classes

    def make_model() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=channels,
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=1024,
            num_labels=classes,
        )
        return LogitsOnly(ViTForImageClassification(config))

    (x_tr, y_tr), (x_te, y_te) = ((t["pixel_values"], t["labels"]) for t in tensors)
    return Task(
        f"hf:{dataset_name}",
        x_tr,
        y_tr,
        x_te,
        y_te,
        make_model,
        [128, 1024, 8192, len(x_tr)],
        epochs=30,
    )


def build_task(name: str, quick: bool = False) -> Task:
    """The named task; ``quick`` shrinks it to a smoke test. ``hf:NAME`` loads a `datasets` set."""
    if name.startswith("hf:"):
        return hub_image_task(name.removeprefix("hf:"))
    if name.startswith("digits"):
        x_tr, y_tr, x_te, y_te = digits_tensors()
        if name in ("digits_cnn", "digits_vit"):
            model = digits_cnn if name == "digits_cnn" else digits_vit
            task = Task(name, x_tr, y_tr, x_te, y_te, model, [32, 256, len(x_tr)], epochs=30)
        elif name.startswith("digits_cnn_lt"):
            imbalance = float(name.removeprefix("digits_cnn_lt"))
            keep = torch.as_tensor(long_tail_indices(y_tr, imbalance))
            counts = torch.bincount(y_tr[keep], minlength=10).tolist()
            task = Task(
                name,
                x_tr[keep],
                y_tr[keep],
                x_te,
                y_te,
                digits_cnn,
                [32, len(keep)],
                epochs=60,
                class_counts=counts,
                notes=f"long-tailed (imbalance {imbalance:g}), balanced test set",
            )
        else:
            raise ValueError(f"unknown task {name!r}")
    elif name == "mnist1d_mlp":
        x_tr, y_tr, x_te, y_te = _mnist1d(10_000 if not quick else 1_000)
        task = Task(name, x_tr, y_tr, x_te, y_te, mnist1d_mlp, [64, 1024, len(x_tr)], epochs=30)
    else:
        raise ValueError(f"unknown task {name!r}")
    if quick:
        keep = torch.arange(min(256, task.train_size))
        task.x_train, task.y_train = task.x_train[keep], task.y_train[keep]
        task.epochs = 1
        task.batch_sizes = [32, len(keep)]
        if task.class_counts is not None:
            task.class_counts = torch.bincount(task.y_train, minlength=10).tolist()
    return task


TASKS = ("digits_cnn", "digits_vit", "mnist1d_mlp", "digits_cnn_lt100", "digits_cnn_lt50")

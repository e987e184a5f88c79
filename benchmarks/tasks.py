"""Data and models built offline for the benchmarks (scikit-learn's digits, small Hugging Face
ViTs), and any `datasets` image set for users who bring one. The tasks themselves (data, model,
loss, metric) are registered in real_tasks.py."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def digits_tensors() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


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


def hub_image_data(
    dataset_name: str,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Callable[[], nn.Module]]:
    """Any `datasets` image-classification set (a hub name such as "cifar10", or a local image
    folder), for users with a GPU: (train and test tensors, the model builder); images resized
    to 32 x 32, a ViT with 6 layers of width 256, the official test split."""
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
    return (x_tr, y_tr, x_te, y_te), make_model

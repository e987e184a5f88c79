"""Small models and loops shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTForImageClassification


class TokenClassifier(nn.Module):
    """Embedding, two pre-norm blocks in a ModuleList, a norm and a head: every kind of param."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h).mean(1))


def token_data(
    n: int = 64, length: int = 6, vocab: int = 20, classes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    # The most frequent residue class among the tokens: learnable after mean pooling.
    labels = torch.stack(
        [torch.bincount(row % classes, minlength=classes).argmax() for row in tokens]
    )
    return tokens, labels


def tiny_vit(num_labels: int = 4) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def image_data(n: int = 64, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the quadrant holding a bright square: learnable by a tiny ViT."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, classes, (n,), generator=generator)
    images = 0.1 * torch.randn(n, 1, 8, 8, generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, 0, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 1.0
    return images, labels


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int = 16,
) -> list[float]:
    losses = []
    for step in range(steps):
        index = torch.arange(step * batch, (step + 1) * batch) % len(x)
        out = model(x[index])
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses

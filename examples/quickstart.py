"""FOP in a plain PyTorch loop: one line to build the optimizer, nothing else changes.

    python examples/quickstart.py

Trains a small MLP on scikit-learn's handwritten digits (shipped with the package, offline)
with FOP and with AdamW, and prints the loss and test accuracy of both.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from hf_fop import FOP


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
    )


def main(steps: int = 150, batch_size: int = 128) -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    train, test = order[:1500], order[1500:]

    for name in ("fop", "adamw"):
        torch.manual_seed(0)
        model = make_model()
        if name == "fop":
            optimizer = FOP(model, lr=3e-3)  # the AdamW learning rate carries over
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        start = time.perf_counter()
        for step in range(steps):
            batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 0 or step == steps - 1:
                print(f"{name:6s} step {step:4d}  loss {loss.item():.4f}")
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"{name:6s} test accuracy {accuracy:.3f} in {time.perf_counter() - start:.1f}s\n")


if __name__ == "__main__":
    main()

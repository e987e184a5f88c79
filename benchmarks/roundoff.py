"""How far a one-ulp change of the inputs moves the weights: the optimizer's round-off gain.

    python -m benchmarks.roundoff --steps 6 --batch 128 --lrs 1e-3,1e-2 \
        --optimizers adamw,soap,kfac,fop [--settings '{"exponent": 0.5}'] [--out FILE]

A small Hugging Face ViT (benchmarks.real_tasks.digits_vit) trains for ``--steps`` steps on
scikit-learn's digits twice from the same seed: once on the images, once on the images times
(1 + 2^-23), one ulp of 1.0. AdamW's update is almost insensitive to that change; an optimizer
that divides round-off by round-off (a rotated coordinate the data never reached, a
near-degenerate eigenvector, a ratio of two tiny numbers) turns it into movement. The report is
the RMS difference of the final weights, over every parameter and over the preconditioned
layers' alone (FOP's and K-FAC's), with one thread (the kernels are then the only difference),
and how far the plain run moved from its start (an optimizer with larger steps diverges more
in absolute terms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.optimizers import NAMES, make_optimizer
from benchmarks.real_tasks import digits_tensors, digits_vit
from hf_fop import partition_model

ULP = 2.0**-23


def train(
    name: str, lr: float, steps: int, batch: int, scale: float, seed: int, **settings: Any
) -> nn.Module:
    """The model after ``steps`` steps of ``name`` on the digits images times ``scale``."""
    x, y, _, _ = digits_tensors()
    torch.manual_seed(seed)
    model = digits_vit()
    optimizer = make_optimizer(name, model, lr, **settings)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        rows = order[(step * batch + torch.arange(batch)) % len(x)]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[rows] * scale), y[rows])
        loss.backward()
        optimizer.step()
    return model


def rms_difference(first: list[Tensor], second: list[Tensor]) -> float:
    squares = sum(
        float((p.detach().double() - q.detach().double()).square().sum())
        for p, q in zip(first, second)
    )
    return (squares / sum(p.numel() for p in first)) ** 0.5


def movement(name: str, lr: float, steps: int, batch: int, seed: int, **settings: Any) -> dict:
    """RMS difference of the final weights between the plain and the one-ulp-scaled inputs."""
    plain, scaled = (
        train(name, lr, steps, batch, scale, seed, **settings) for scale in (1.0, 1.0 + ULP)
    )
    torch.manual_seed(seed)
    initial = digits_vit()  # the weights both runs started from
    layers = {id(p) for _, adapter in partition_model(plain).layers for p in adapter.params}
    pairs = list(zip(plain.parameters(), scaled.parameters()))
    blocks = [(p, q) for p, q in pairs if id(p) in layers]
    return {
        "optimizer": name,
        "lr": lr,
        "all": rms_difference(*zip(*pairs)),
        "preconditioned": rms_difference(*zip(*blocks)),
        # How far the plain run itself went: the divergence is read against it.
        "moved": rms_difference(list(initial.parameters()), list(plain.parameters())),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optimizers", default="adamw,soap,kfac,fop")
    parser.add_argument("--lrs", default="1e-3,1e-2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="FOP settings as JSON (kfac, fop)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = json.loads(args.settings)
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        for name in args.optimizers.split(","):
            extra = settings if name.startswith(("kfac", "fop")) else {}
            row = movement(name, lr, args.steps, args.batch, args.seed, **extra)
            rows.append(row)
            print(
                f"{NAMES[name]:<28} lr {lr:<6g} RMS movement: all {row['all']:.2e}, "
                f"preconditioned layers {row['preconditioned']:.2e}; moved {row['moved']:.2e} "
                f"(divergence / movement {row['all'] / row['moved']:.2e})",
                flush=True,
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "python -m benchmarks.roundoff " + " ".join(argv or []), **vars(args)}
        record["out"] = str(args.out)
        args.out.write_text(json.dumps({"settings": record, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()

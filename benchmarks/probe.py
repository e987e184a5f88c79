"""One exploratory run with any optimizer settings, seed 0 (not a tuned comparison):

    python -m benchmarks.probe --task wikitext_gpt --optimizer kfac_sqrt --lr 3e-3 \
        --steps 250 --batch 16 --settings '{"damping": 0.01}' [--identity_bases]

Prints the metric at half the budget and at the end, as one JSON line. ``--identity_bases``
replaces every eigendecomposition by identity bases: the eigen-corrected path at exponent 1/2
with absolute damping is then Adam, a check of the pipeline rather than an optimizer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor, nn

import hf_fop.curvature
from benchmarks.drop_in import _task, warmup_cosine
from benchmarks.optimizers import make_optimizer


def identity_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(matrix.shape[-1]).expand(matrix.shape).clone()
    return torch.ones(matrix.shape[:-1]), eye


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="digits_vit")
    parser.add_argument("--optimizer", default="kfac_sqrt")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--settings", default="{}", help="FOP settings as JSON")
    parser.add_argument("--identity_bases", action="store_true")
    args = parser.parse_args()
    if args.identity_bases:
        hf_fop.curvature.symmetric_eigh = identity_eigh
    torch.set_num_threads(1)
    task = _task(args.task, False)
    settings = json.loads(args.settings)
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = make_optimizer(args.optimizer, model, args.lr, **settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    generator = torch.Generator().manual_seed(0)
    start, metrics = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        loss = task.sample(args.batch, generator)(model)
        optimizer.zero_grad()
        loss.backward()
        if task.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
        optimizer.step()
        schedule.step()
        if step % (args.steps // 2) == 0:
            metrics.append(round(task.evaluate(model), 4))
    print(json.dumps({**vars(args), "metrics": metrics, "s": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()

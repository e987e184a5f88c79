"""One exploratory run with any optimizer settings, seed 0 unless given (not a tuned comparison):

    python -m benchmarks.probe --task wikitext_gpt --optimizer kfac_sqrt_mb --lr 3e-3 \
        --steps 250 --batch 16 --settings '{"damping": 0.01}' [--identity_bases] [--seed 1]

Prints the metric at half the budget and at the end, as one JSON line. ``--identity_bases``
replaces every eigendecomposition by identity bases: the eigen-corrected path at exponent 1/2
with absolute damping is then Adam, a check of the pipeline rather than an optimizer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor

import hf_fop.curvature
from benchmarks.drop_in import _task, train_run


def identity_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(matrix.shape[-1]).expand(matrix.shape).clone()
    return torch.ones(matrix.shape[:-1]), eye


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="digits_vit")
    parser.add_argument("--optimizer", default="kfac_sqrt_mb")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--settings", default="{}", help="FOP settings as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity_bases", action="store_true")
    args = parser.parse_args()
    if args.identity_bases:
        hf_fop.curvature.symmetric_eigh = identity_eigh
    torch.set_num_threads(1)
    task = _task(args.task, False)
    settings = json.loads(args.settings)
    start = time.perf_counter()
    curve = train_run(
        task,
        args.optimizer,
        args.lr,
        args.batch,
        args.steps,
        args.seed,
        args.steps // 2,
        **settings,
    )
    metrics = [round(point["metric"], 4) for point in curve]
    print(json.dumps({**vars(args), "metrics": metrics, "s": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()

"""Per-step time of FOP on 1 vs 2 data-parallel processes (gloo, CPU), and its communication.

    python -m benchmarks.distributed_step_time            # writes benchmarks/results/distributed_step_time.json

Weak scaling: every process keeps the same local batch, so 2 processes do twice the work per
step. Each process uses one thread, so the 1-process run is the baseline measured in the same
run. Reported: median step time (all steps, and inverse-refresh steps alone, where each rank
decomposes only its share of the layers), FOP's own communication time per step, and the
throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import ViTConfig, ViTForImageClassification

from hf_fop import FOP

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(result: dict[str, Any], path: Path) -> None:
    """A benchmark's result as indented JSON at ``path``, echoed to stdout."""
    text = json.dumps(result, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)


def _model(hidden: int, layers: int) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _model(args.hidden, args.layers)
    optimizer = FOP(
        model, curvature_interval=args.curvature_interval, inverse_interval=args.inverse_interval
    )
    network = DistributedDataParallel(model) if world > 1 else model
    times = timed_steps(network, optimizer, args, rank, distributed=world > 1)
    steps, inverse_steps = [], []
    for step, seconds in enumerate(times, start=args.warmup):
        (inverse_steps if step % args.inverse_interval == 0 else steps).append(seconds)
    result = {
        "median_step_s": statistics.median(steps),
        "median_inverse_step_s": statistics.median(inverse_steps) if inverse_steps else None,
        "comm_s_per_step": optimizer.communicator.seconds / args.steps,
        "layers_decomposed_by_this_rank": len(optimizer.curvature.decomposed_by_rank),
        "layers": len(optimizer.layers),
    }
    Path(out, f"world{world}_rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def timed_steps(
    network: torch.nn.Module,
    optimizer: FOP,
    args: argparse.Namespace,
    rank: int,
    distributed: bool,
) -> list[float]:
    """Seconds of each training step after ``args.warmup`` (random images; the ranks start each
    step together). The communicator's clock restarts with the timed steps."""
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        images = torch.randn(args.local_batch, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (args.local_batch,), generator=generator)
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        loss = F.cross_entropy(network(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
        if step == args.warmup - 1:
            optimizer.communicator.seconds = 0.0
        if step >= args.warmup:
            times.append(seconds)
    return times


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and loop settings the multi-process benchmarks share."""
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--local_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument("--curvature_interval", type=int, default=1)
    parser.add_argument("--inverse_interval", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "distributed_step_time.json")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            ranks = [
                json.loads(Path(out, f"world{world}_rank{r}.json").read_text())
                for r in range(world)
            ]
            runs[world] = {
                "median_step_s": max(r["median_step_s"] for r in ranks),
                "median_inverse_step_s": max(r["median_inverse_step_s"] or 0 for r in ranks),
                "comm_s_per_step": max(r["comm_s_per_step"] for r in ranks),
                "layers_decomposed_per_rank": [r["layers_decomposed_by_this_rank"] for r in ranks],
            }
    one, two = runs[1], runs[2]
    result = {
        "command": "python -m benchmarks.distributed_step_time",
        "settings": vars(args) | {"output": str(args.output.name)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo, 1 thread per process",
        "processes": {str(k): v for k, v in runs.items()},
        "step_time_ratio_2_over_1": two["median_step_s"] / one["median_step_s"],
        "throughput_ratio_2_over_1": 2 * one["median_step_s"] / two["median_step_s"],
        "comm_share_of_step_2proc": two["comm_s_per_step"] / two["median_step_s"],
    }
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()

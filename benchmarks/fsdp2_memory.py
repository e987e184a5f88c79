"""Optimizer memory per rank and step time of FOP under FSDP2 against DDP, 2 processes (gloo).

    python -m benchmarks.fsdp2_memory      # writes benchmarks/results/fsdp2_memory.json

The same ViT, local batch and FOP settings under DDP and under fully_shard (every block and the
root). Per rank: the bytes of the parameters it holds, of the optimizer state (AdamW moments,
momentum, and FOP's curvature: factors, eigendecompositions, grafting moments), and the median
step time. One thread per process: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from benchmarks.distributed_step_time import (
    _free_port,
    _model,
    add_run_arguments,
    timed_steps,
    write_json,
)
from benchmarks.step_cost import tensor_bytes
from hf_fop import FOP

RESULTS = Path(__file__).resolve().parent / "results"


def _worker(rank: int, port: int, sharding: str, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = _model(args.hidden, args.layers)
    if sharding == "fsdp2":
        for block in model.vit.encoder.layer if hasattr(model.vit, "encoder") else model.vit.layers:
            fully_shard(block)
        fully_shard(model)
        network = model
    else:
        network = DistributedDataParallel(model)
    optimizer = FOP(
        model, curvature_interval=args.curvature_interval, inverse_interval=args.curvature_interval
    )
    times = timed_steps(network, optimizer, args, rank, distributed=True)
    state = optimizer.state_dict()
    curvature = optimizer.curvature.state_dict()  # the layers this rank holds
    result = {
        "median_step_s": statistics.median(times),
        "parameter_bytes": sum(tensor_bytes(p) for p in model.parameters()),
        "optimizer_state_bytes": tensor_bytes(state),
        "curvature_bytes": tensor_bytes(curvature),
        "curvature_layers": len(curvature),
    }
    Path(out, f"{sharding}_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument("--curvature_interval", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "fsdp2_memory.json")
    args = parser.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as out:
        for sharding in ("ddp", "fsdp2"):
            # Forked where the platform can (tests/helpers.start_ranks does the same): the ranks
            # start with this process's imports (seconds of CPU each when spawned); what they
            # measure (tensor bytes, step times) does not see the parent.
            mp.start_processes(
                _worker,
                args=(_free_port(), sharding, args, out),
                nprocs=2,
                join=True,
                start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn",
            )
            runs[sharding] = [
                json.loads(Path(out, f"{sharding}_rank{r}.json").read_text()) for r in (0, 1)
            ]
    ddp, fsdp = runs["ddp"], runs["fsdp2"]
    result = {
        "command": "python -m benchmarks.fsdp2_memory",
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": f"{platform.machine()}, torch {torch.__version__}, gloo, 1 thread per process",
        "ranks": runs,
        "optimizer_state_ratio_fsdp2_over_ddp": max(r["optimizer_state_bytes"] for r in fsdp)
        / max(r["optimizer_state_bytes"] for r in ddp),
        "step_time_ratio_fsdp2_over_ddp": max(r["median_step_s"] for r in fsdp)
        / max(r["median_step_s"] for r in ddp),
    }
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()

"""GPU check (under 8 minutes, one JSON): step time and peak memory of AdamW, K-FAC and FOP on a
ViT-S/16-sized model with bf16 autocast at curvature intervals 1, 5 and 10 (the ratios of
benchmarks.step_cost), the host synchronisations inside ``optimizer.step()`` (torch's CUDA sync
debug mode, per step of one curvature interval), and time to a target accuracy on a generated
task at the defaults.

    python -m benchmarks.gpu_step_time      # needs CUDA; writes benchmarks/results/gpu_step_time.json

The task is generated on the GPU (nothing is downloaded): 10 classes, each a fixed random
224 x 224 pattern plus fresh noise per image; the target is 90% on a held-out batch.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.distributed_step_time import write_json
from benchmarks.optimizers import make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def vit_small(num_labels: int = 10) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def gpu_optimizer(name: str, model: torch.nn.Module, interval: int = 5) -> torch.optim.Optimizer:
    """AdamW, or K-FAC / FOP at their defaults and AdamW's rate (the drop-in setting)."""
    every = (
        {} if name == "adamw" else {"curvature_interval": interval, "inverse_interval": interval}
    )
    return make_optimizer(name, model, 1e-3, weight_decay=0.05, **every)


def generated_batch(
    patterns: torch.Tensor, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(
        0, patterns.shape[0], (batch,), device=patterns.device, generator=generator
    )
    noise = torch.randn(batch, *patterns.shape[1:], device=patterns.device, generator=generator)
    return patterns[labels] + 2.0 * noise, labels


def backward(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(pixel_values=images).logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    loss = backward(model, optimizer, images, labels)
    optimizer.step()
    return loss


def fixed_batch_run(name: str, batch: int, interval: int) -> tuple[Any, ...]:
    """(model, optimizer, images, labels) on the GPU: one generated batch, seeded."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    patterns = torch.randn(10, 3, 224, 224, device=device, generator=generator)
    model = vit_small().to(device)
    optimizer = gpu_optimizer(name, model, interval)
    images, labels = generated_batch(patterns, batch, generator)
    return model, optimizer, images, labels


def step_time(name: str, batch: int, timed_steps: int, interval: int) -> dict[str, Any]:
    """Mean step time over whole curvature intervals, and peak memory."""
    model, optimizer, images, labels = fixed_batch_run(name, batch, interval)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(5):
        step(model, optimizer, images, labels)
    torch.cuda.synchronize()
    steps = max(timed_steps, 2 * interval)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, images, labels)
    torch.cuda.synchronize()
    return {
        "optimizer": name,
        "interval": None if name == "adamw" else interval,
        "step_ms": 1000 * (time.perf_counter() - start) / steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def host_syncs_in_step(name: str, batch: int, interval: int) -> dict[str, Any]:
    """Synchronising CUDA calls inside ``optimizer.step()`` (torch's sync debug mode), per step
    over one curvature interval after warm-up: steps that refresh the curvature (whose
    eigendecompositions synchronise) and steps that only precondition (none expected)."""
    model, optimizer, images, labels = fixed_batch_run(name, batch, interval)
    for _ in range(2 * interval + 1):  # past the first steps' loss-scale check
        step(model, optimizer, images, labels)
    counts = []
    for _ in range(interval):
        backward(model, optimizer, images, labels)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return {"optimizer": name, "interval": interval, "syncs_per_step": counts}


def time_to_target(name: str, batch: int, max_steps: int, target: float) -> dict[str, Any] | None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    patterns = torch.randn(10, 3, 224, 224, device=device, generator=generator)
    torch.manual_seed(1)
    model = vit_small().to(device)
    optimizer = gpu_optimizer(name, model)
    held_out = generated_batch(patterns, 512, generator)
    seconds = 0.0
    for index in range(1, max_steps + 1):
        images, labels = generated_batch(patterns, batch, generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, optimizer, images, labels)
        torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        if index % 10 == 0:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(pixel_values=held_out[0]).logits
                accuracy = (logits.argmax(-1) == held_out[1]).float().mean().item()
            if accuracy >= target:
                return {"steps": index, "seconds": seconds, "accuracy": accuracy}
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--timed_steps", type=int, default=20)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--intervals", default="1,5,10")
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_step_time.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.gpu_step_time needs a CUDA GPU; run it on a machine that has one"
        )
    intervals = [int(i) for i in args.intervals.split(",")]
    rows = [step_time("adamw", args.batch, args.timed_steps, 1)]
    for interval in intervals:
        for name in ("kfac", "fop"):
            rows.append(step_time(name, args.batch, args.timed_steps, interval))
    adamw = rows[0]["step_ms"]
    kfac = {r["interval"]: r["step_ms"] for r in rows if r["optimizer"] == "kfac"}
    for row in rows:
        row["step_ratio_to_adamw"] = row["step_ms"] / adamw
        if row["optimizer"] == "fop":
            row["step_ratio_to_kfac"] = row["step_ms"] / kfac[row["interval"]]
    syncs = [host_syncs_in_step(name, args.batch, 10) for name in ("adamw", "fop")]
    targets = {
        name: time_to_target(name, args.batch, args.max_steps, args.target)
        for name in ("adamw", "kfac", "fop")
    }
    result = {
        "command": "python -m benchmarks.gpu_step_time",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "ViT-S/16 (224 px, 384 wide, 12 layers), bf16 autocast",
        "batch": args.batch,
        "rows": rows,
        "host_syncs_in_step": syncs,
        "time_to_target": targets,
    }
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()

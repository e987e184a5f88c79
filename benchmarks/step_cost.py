"""Per-step cost and memory of FOP and K-FAC against AdamW on a small ViT, as the width grows.

    python -m benchmarks.step_cost          # writes benchmarks/results/step_cost.json and .md

Every configuration runs in a fresh process (one thread) so that its peak memory is its own;
AdamW is the baseline measured in the same run. The step time is the mean over a window that
spans several curvature intervals, so the periodic factor and eigendecomposition work is
amortised as in training. Curvature interval k means factors collected and decompositions
refreshed every k steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def _state_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(v) for v in value)
    return 0


def _measure(config: dict[str, Any], queue: Any) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    from hf_fop import FOP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = config["hidden"]
    model = ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_size=hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=4 * hidden,
            num_labels=10,
        )
    )
    if config["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        interval = config["interval"]
        optimizer = FOP(
            model, mode=config["optimizer"], curvature_interval=interval, inverse_interval=interval
        )
    images = torch.randn(config["batch"], 3, 32, 32)
    labels = torch.randint(0, 10, (config["batch"],))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(config["warmup"] + config["steps"]):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= config["warmup"]:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            **config,
            "mean_step_s": sum(times) / len(times),
            "optimizer_state_bytes": _state_bytes(optimizer.state_dict()),
            "peak_rss_increase_mib": (peak - rss_before) / 1024,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    )


def run_config(config: dict[str, Any]) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(config, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| hidden | optimizer | curvature interval | step (ms) | x AdamW | optimizer state (MiB) | peak RSS increase (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        interval = "-" if r["optimizer"] == "adamw" else str(r["interval"])
        lines.append(
            f"| {r['hidden']} | {r['optimizer']} | {interval} | {1000 * r['mean_step_s']:.1f} | "
            f"{r['ratio_to_adamw']:.2f} | {r['optimizer_state_bytes'] / 2**20:.2f} | {r['peak_rss_increase_mib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", default="64,128,256")
    parser.add_argument("--intervals", default="1,5,10")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        base = {"hidden": hidden, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
        adamw = run_config({**base, "optimizer": "adamw", "interval": None})
        adamw["ratio_to_adamw"] = 1.0
        rows.append(adamw)
        for name in ("kfac", "fop"):
            for interval in [int(i) for i in args.intervals.split(",")]:
                row = run_config({**base, "optimizer": name, "interval": interval})
                row["ratio_to_adamw"] = row["mean_step_s"] / adamw["mean_step_s"]
                rows.append(row)
                print(
                    f"hidden {hidden} {name} interval {interval}: {row['ratio_to_adamw']:.2f} x AdamW",
                    flush=True,
                )
    result = {
        "command": "python -m benchmarks.step_cost",
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 CPU thread per configuration",
        "model": "ViTForImageClassification, image 32, patch 4 (65 tokens), 4 layers, MLP 4x hidden",
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "step_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows)
    (args.output_dir / "step_cost.md").write_text(
        f"Command: `{result['command']}` ({result['machine']}).\n\n{table}\n"
    )
    print(table)
    return result


if __name__ == "__main__":
    main()

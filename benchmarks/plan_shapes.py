"""hf_fop.plan for real model shapes, built on the meta device (nothing is allocated or
downloaded): Llama-3.2-1B and Llama-3.1-8B, whole factors and blocks of 2048, 1024 and 512,
per GPU under FSDP2 on 8 GPUs, and the refresh time estimated at a stated fp32 rate.

    python -m benchmarks.plan_shapes [--output benchmarks/results/plan_llama.md]

The seconds are an estimate from flops (9 d^3 per eigendecomposition at ``--tflops``), not a
measurement: a GPU's batched eigh runs well below its matmul rate, so they are a lower bound.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import hf_fop

SHAPES: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": dict(
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": dict(
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
BLOCK_SIZES = (None, 2048, 1024, 512)


def meta_llama(shape: dict[str, Any]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**shape))


def report(world_size: int, tflops: float) -> str:
    lines = [
        "# hf_fop.plan on Llama shapes (meta device)",
        "",
        "Command: `python -m benchmarks.plan_shapes` (FOP's defaults otherwise; "
        f"FSDP2 on {world_size} GPUs; refresh seconds estimated at {tflops:g} Tflop/s fp32, "
        "9 d^3 flops per eigendecomposition: a lower bound, not a measurement).",
        "",
        "| model | block_size | preconditioned layers | FOP state | AdamW state | ratio | "
        f"per GPU ({world_size}) | refresh flops per GPU | est. refresh s per GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for name, shape in SHAPES.items():
        model = meta_llama(shape)
        for block_size in BLOCK_SIZES:
            plan = hf_fop.plan(model, block_size=block_size, world_size=world_size, sharded=True)
            lines.append(
                f"| {name} | {block_size or 'whole'} | {len(plan.layers)} | "
                f"{plan.state_bytes / 1e9:.1f} GB | {plan.adamw_state_bytes / 1e9:.1f} GB | "
                f"{plan.state_bytes / plan.adamw_state_bytes:.2f}x | "
                f"{plan.state_bytes_per_rank / 1e9:.2f} GB | "
                f"{plan.refresh_flops_per_rank / 1e12:.2f} Tflop | "
                f"{plan.refresh_flops_per_rank / (tflops * 1e12):.3f} |"
            )
            if block_size == 1024:
                details += ["", f"## {name}, block_size=1024", "", "```", str(plan), "```"]
    return "\n".join(lines + details) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--tflops", type=float, default=50.0)
    parser.add_argument("--output", default="benchmarks/results/plan_llama.md")
    args = parser.parse_args()
    text = report(args.world_size, args.tflops)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

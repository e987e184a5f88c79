"""fp16's loss scaler under the Trainer: how far the weights move against the fp32 run.

    python -m benchmarks.loss_scale --optimizers adamw_torch,fop --steps 24 [--out FILE]

A small Hugging Face ViT (benchmarks.real_tasks.small_vit's model) trains on scikit-learn's digits
through FOPTrainer twice per optimizer: in fp32, and with ``fp16=True`` and a
``torch.amp.GradScaler`` attached as accelerate attaches one on a GPU. On a CPU accelerate
clips (``max_grad_norm``, the Trainer's 1.0) before the scaler unscales, so the clip acts on
the scaled gradients and ``p.grad`` reaches the step rescaled: a rescaling the optimizer has
to follow. The report is, per optimizer, the distance each preconditioned block weight moved
with the scaler relative to its fp32 run (mean over the weights), and that ratio against
AdamW's, one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset

from benchmarks.real_tasks import digits_tensors, small_vit
from hf_fop.integration import FOPTrainer, FOPTrainingArguments


def _dataset() -> Dataset:
    x, y, _, _ = digits_tensors()
    data = Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()})
    return data.with_format("torch")


def distances(optim: str, steps: int, scaled: bool, seed: int = 0) -> dict[str, float]:
    """How far each block weight moved in ``steps`` Trainer steps (with the scaler or not)."""
    torch.manual_seed(seed)
    model = small_vit(image_size=8, patch_size=2, layers=2, intermediate=128).model
    before = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as folder:
        args = FOPTrainingArguments(
            output_dir=folder,
            optim=optim,
            learning_rate=3e-3,
            per_device_train_batch_size=16,
            max_steps=steps,
            fp16=scaled,
            use_cpu=True,
            seed=seed,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = FOPTrainer(model=model, args=args, train_dataset=_dataset())
        if scaled:  # what accelerate sets up for fp16 on a GPU
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        trainer.train()
    return {
        name: float((p.detach() - q.detach()).norm())
        for (name, p), q in zip(model.named_parameters(), before.parameters())
        if ".layers." in name and name.endswith("weight") and p.dim() == 2
    }


def ratio(optim: str, steps: int) -> float:
    """Mean over the block weights of (distance with the scaler) / (distance in fp32)."""
    fp32, fp16 = distances(optim, steps, False), distances(optim, steps, True)
    return sum(fp16[name] / fp32[name] for name in fp32) / len(fp32)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optimizers", default="adamw_torch,fop")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, help="write the ratios as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ratios = {optim: ratio(optim, args.steps) for optim in args.optimizers.split(",")}
    baseline = ratios.get("adamw_torch")
    for optim, value in ratios.items():
        against = f", {value / baseline:.2f}x AdamW's" if baseline else ""
        print(
            f"{optim:<12} fp16 + scaler / fp32 distance of the block weights: {value:.3f}{against}"
        )
    if args.out is not None:
        command = "python -m benchmarks.loss_scale " + " ".join(argv or [])
        args.out.write_text(json.dumps({"command": command, "ratios": ratios}, indent=1) + "\n")
    return ratios


if __name__ == "__main__":
    main()

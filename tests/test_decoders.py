"""The decoder families users fine-tune (Llama, Qwen2, Mistral; from configs): FOP takes every
block projection and trains them, alone, through the Trainer (gradient checkpointing, bf16
autocast) and with LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_fop import FOP
from hf_fop.integration import FOPTrainer
from hf_fop.integration.trainer import unwrap_optimizer
from tests.helpers import DECODERS, fop_args, lm_dataset, tiny_decoder

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lm_losses(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    ids = lm_dataset(n=16).columns["input_ids"]
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", DECODERS)
def test_fop_preconditions_every_projection_and_trains(family: str) -> None:
    torch.manual_seed(0)
    model = tiny_decoder(family)
    optimizer = FOP(model, lr=3e-3, curvature_interval=1, inverse_interval=2)
    names = optimizer.layer_names
    assert sorted(names) == sorted(
        [
            f"model.layers.{i}.{part}.{p}"
            for i in range(2)
            for p in PROJECTIONS
            for part in (("self_attn",) if p in PROJECTIONS[:4] else ("mlp",))
        ]
        + ["model.embed_tokens"]  # with the tied output layer, from their shared gradient
    )
    k_proj = optimizer.layers[names.index("model.layers.0.self_attn.k_proj")]
    q_proj = optimizer.layers[names.index("model.layers.0.self_attn.q_proj")]
    assert k_proj.out_dim == q_proj.out_dim // 2  # grouped-query attention: 2 k/v heads of 4
    assert (q_proj.in_dim == 33) == (family == "qwen2")  # Qwen2's q/k/v biases are folded in
    losses = _lm_losses(model, optimizer, 12)
    assert losses[-1] < 0.8 * losses[0]
    # Whole factors and blocks that cover every side (33, 48, 49) are the same optimizer.
    torch.manual_seed(0)
    blocked = tiny_decoder(family)
    same = _lm_losses(
        blocked, FOP(blocked, lr=3e-3, curvature_interval=1, inverse_interval=2, block_size=64), 12
    )
    assert same == losses


@pytest.mark.parametrize("family", DECODERS)
def test_the_trainer_trains_decoders_with_checkpointing_and_bf16(
    tmp_path: Path, family: str
) -> None:
    torch.manual_seed(0)
    model = tiny_decoder(family)
    args = fop_args(
        tmp_path, max_steps=10, gradient_checkpointing=True, bf16=True, fop_block_size=16
    )
    trainer = FOPTrainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.85 * losses[0]  # (10 steps, the rate decaying to 0)
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert len(optimizer.layer_names) == 2 * len(PROJECTIONS) + 1  # and the tied embedding
    assert optimizer.curvature.buckets[0].A.dtype == torch.float32
    blocked = [b for b in optimizer.curvature.buckets if b.layout_G.blocked]
    assert blocked  # block_size reached the optimizer through the training arguments
    assert optimizer.statistics()["beta_max"] != 0.0  # FOP's correction, not K-FAC alone


@pytest.mark.parametrize("family", DECODERS)
def test_lora_on_every_projection_preconditions_only_the_adapters(
    tmp_path: Path, family: str
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        tiny_decoder(family),
        LoraConfig(r=4, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM"),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = FOPTrainer(
        model=model, args=fop_args(tmp_path, max_steps=8), train_dataset=lm_dataset()
    )
    trainer.train()
    names = unwrap_optimizer(trainer.optimizer).layer_names
    assert len(names) == 2 * len(PROJECTIONS) * 2  # 2 layers x 7 projections x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]

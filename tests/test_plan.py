"""hf_fop.plan against the tensors a real FOP allocates, and on meta-device models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_fop
from hf_fop import FOP
from tests.helpers import KRONECKER, TokenClassifier, tiny_decoder, token_data


def _allocated_bytes(optimizer: FOP) -> int:
    """Every tensor the optimizer holds after a step: torch's state and each bucket's."""
    tensors = [t for state in optimizer.state.values() for t in state.values()]
    for bucket in optimizer.curvature.buckets:
        tensors += list(bucket.state.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(model, TokenClassifier):
        tokens, labels = token_data()
        loss = F.cross_entropy(model(tokens[:16]), labels[:16])
    else:
        ids = torch.arange(48).reshape(4, 12) % 24
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"block_size": 8},
        {"curvature": "eigen_corrected", "block_size": 7},
        {"graft": "none", "damping_mode": "absolute"},
        {**KRONECKER, "momentum": 0.0},
        {"factor_source": "gradient"},
        {"precondition_embeddings": True, "curvature": "eigen_corrected", "block_size": 8},
    ],
    ids=[
        "defaults",
        "blocked",
        "eigen-corrected-padded",
        "no-graft",
        "kronecker",
        "gradient-factors",
        "embeddings",
    ],
)
@pytest.mark.parametrize("model_name", ["token-classifier", "llama"])
def test_planned_state_bytes_are_what_fop_allocates(model_name: str, settings: dict) -> None:
    torch.manual_seed(0)
    model = TokenClassifier() if model_name == "token-classifier" else tiny_decoder("llama")
    planned = hf_fop.plan(model, **settings)
    optimizer = FOP(model, **settings)
    _one_step(model, optimizer)
    assert planned.state_bytes == _allocated_bytes(optimizer)
    assert optimizer.plan.state_bytes == planned.state_bytes  # what FOP logs when built
    assert len(planned.layers) == len(optimizer.layers)
    adamw = torch.optim.AdamW(model.parameters())
    _one_step(model, adamw)
    assert planned.adamw_state_bytes == sum(
        t.numel() * t.element_size() for s in adamw.state.values() for t in s.values()
    )


def test_the_plan_of_a_meta_device_decoder_allocates_nothing_and_reads_well() -> None:
    from benchmarks.plan_shapes import SHAPES, meta_llama

    model = meta_llama(SHAPES["Llama-3.2-1B"])
    whole = hf_fop.plan(model, block_size=None, precondition_embeddings=False)
    blocked = hf_fop.plan(
        model, block_size=1024, world_size=8, sharded=True, precondition_embeddings=False
    )
    assert all(p.is_meta for p in model.parameters())
    assert len(blocked.layers) == 16 * 7  # every block projection, gate/up/down included
    assert blocked.state_bytes < whole.state_bytes
    assert blocked.state_bytes_per_rank < blocked.state_bytes / 4
    assert max(x.layout_G.size for x in blocked.layers) <= 1024
    text = str(blocked)
    assert "model.layers.*.mlp.gate_proj" in text and "per rank (FSDP2, 8 ranks)" in text


def test_ddp_ranks_hold_everything_and_split_the_refresh() -> None:
    model = TokenClassifier()
    alone, ddp = hf_fop.plan(model), hf_fop.plan(model, world_size=2)
    assert ddp.state_bytes_per_rank == alone.state_bytes_per_rank == alone.state_bytes
    assert ddp.refresh_flops_per_rank < alone.refresh_flops_per_rank == alone.refresh_flops

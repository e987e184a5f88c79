"""FOP on FSDP2 (fully_shard, 2 gloo processes): the same training as DDP, curvature sharded."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hf_fop import FOP
from hf_fop.distributed import assign_layers, decomposition_cost
from tests.distributed_workers import (
    MODES,
    SETTINGS,
    fsdp2_resume,
    fsdp2_weight_norms,
    graft_owners,
    lora_fsdp2,
    train_ddp,
    train_fsdp2,
)
from tests.helpers import free_port, start_ranks, tiny_vit

STEPS = 4


def _runs(
    tmp_path: Path,
    worker,
    mode: str,
    optimizer_first: bool = False,
    micro_batches: int = 1,
    unsharded_layer: bool = False,
    compiled: bool = False,
) -> dict[int, dict]:
    out = tmp_path / worker.__name__
    out.mkdir()
    args = (2, free_port(), str(out), STEPS, 8)
    if worker is train_ddp:
        extra = (micro_batches, mode)
    else:
        extra = (mode, optimizer_first, micro_batches, unsharded_layer, compiled)
    start_ranks(worker, args + extra)
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[int, dict]]:
    """The DDP run of a mode, trained once per module and shared by the tests that compare."""
    runs: dict[tuple[str, int], dict[int, dict]] = {}

    def run(mode: str, micro_batches: int = 1) -> dict[int, dict]:
        if (mode, micro_batches) not in runs:
            folder = tmp_path_factory.mktemp(f"ddp_{mode}_{micro_batches}")
            runs[mode, micro_batches] = _runs(folder, train_ddp, mode, micro_batches=micro_batches)
        return runs[mode, micro_batches]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "optimizer_first", "micro_batches", "compiled"),
    [
        ("fop", False, 1, False),
        ("kfac", False, 1, False),
        ("fop", True, 1, False),
        ("fop", False, 2, False),
        ("fop", False, 1, True),
        ("fop-blocked", False, 1, False),
    ],
    ids=[
        "fop",
        "kfac",
        "fop-built-before-sharding",
        "fop-accumulating-2",
        "fop-compiled",
        "fop-blocked",
    ],
)
def test_fsdp2_trains_like_ddp_with_the_curvature_sharded(
    tmp_path: Path,
    ddp_reference: Callable[..., dict[int, dict]],
    mode: str,
    optimizer_first: bool,
    micro_batches: int,
    compiled: bool,
) -> None:
    fsdp = _runs(tmp_path, train_fsdp2, mode, optimizer_first, micro_batches, compiled=compiled)
    ddp = ddp_reference(mode, micro_batches)
    # The same parameters after several steps (and so the same as one process with the double
    # batch, which the DDP tests pin).
    for name, expected in ddp[0]["params"].items():
        for rank in (0, 1):
            torch.testing.assert_close(fsdp[rank]["params"][name], expected, rtol=1e-5, atol=1e-5)
    # Each rank holds the curvature of the layers it owns, and only those: half each here.
    reference = FOP(tiny_vit(), **SETTINGS)
    block_size = MODES[mode].get("block_size")
    costs = [decomposition_cost(x.in_dim, x.out_dim, block_size) for x in reference.layers]
    owners = assign_layers(costs, 2)
    names = [name for name, _ in reference.partition.layers]
    for rank in (0, 1):
        owned = sorted(n for n, o in zip(names, owners) if o == rank)
        assert fsdp[rank]["curvature_layers"] == owned
        assert fsdp[rank]["decomposed"] == [i for i, o in enumerate(owners) if o == rank]
    assert set(fsdp[0]["curvature_layers"]).isdisjoint(fsdp[1]["curvature_layers"])
    # Steps without a decomposition never wait for the device, on either rank.
    assert fsdp[0]["reads"] == fsdp[1]["reads"] == []
    total = fsdp[0]["curvature_bytes"] + fsdp[1]["curvature_bytes"]
    assert max(fsdp[r]["curvature_bytes"] for r in (0, 1)) <= 0.6 * total
    # Every rank logs every layer's statistics (shared with the directions).
    if mode != "kfac":
        assert fsdp[0]["statistics"] == pytest.approx(fsdp[1]["statistics"])
        assert fsdp[0]["statistics"]["beta_max"] != 0.0


@pytest.mark.slow
def test_a_layer_left_unsharded_trains_like_ddp(
    tmp_path: Path, ddp_reference: Callable[..., dict[int, dict]]
) -> None:
    # fully_shard(..., ignored_params=...) keeps the last MLP projection whole on every rank
    # (its gradients averaged by the caller): FOP preconditions it beside the sharded ones.
    fsdp = _runs(tmp_path, train_fsdp2, "fop", unsharded_layer=True)
    ddp = ddp_reference("fop")
    whole = ["vit.layers.1.mlp.fc2.weight", "vit.layers.1.mlp.fc2.bias"]
    assert fsdp[0]["whole"] == fsdp[1]["whole"] == whole
    for name, expected in ddp[0]["params"].items():
        for rank in (0, 1):
            torch.testing.assert_close(fsdp[rank]["params"][name], expected, rtol=1e-5, atol=1e-5)
    held = fsdp[0]["curvature_layers"] + fsdp[1]["curvature_layers"]
    assert sorted(held) == sorted(FOP(tiny_vit(), **SETTINGS).layer_names)  # still each layer once


@pytest.mark.slow
def test_fsdp2_resume_equals_uninterrupted_with_clipping(tmp_path: Path) -> None:
    # Both layouts resume one run's checkpoint: "dcp" (torch.distributed.checkpoint, as
    # accelerate and the Trainer save under FSDP2; it loads only what a fresh optimizer's
    # state_dict already holds) and "torch" (a torch.save file per rank).
    runs = (("full", "torch"), ("first", "both"), ("resume", "dcp"), ("resume", "torch"))
    for phase, layout in runs:
        args = (2, free_port(), str(tmp_path), phase, layout)
        start_ranks(fsdp2_resume, args)
    for layout, rank in itertools.product(("dcp", "torch"), (0, 1)):
        full = torch.load(tmp_path / f"full_torch{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"resume_{layout}{rank}.pt", weights_only=True)
        for name in full:
            torch.testing.assert_close(resumed[name], full[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_lora_under_fsdp2_trains_like_under_ddp(tmp_path: Path) -> None:
    for sharded in (True, False):
        start_ranks(lora_fsdp2, (2, free_port(), str(tmp_path), sharded))
    fsdp, ddp = (torch.load(tmp_path / f"{k}0.pt", weights_only=True) for k in ("fsdp2", "ddp"))
    # FOP preconditions the adapters only: 2 blocks x (q, v) x (A, B).
    assert len(fsdp["layers"]) == 8 and all(".lora_" in name for name in fsdp["layers"])
    assert fsdp["params"].keys() == ddp["params"].keys()
    for name, expected in ddp["params"].items():
        torch.testing.assert_close(fsdp["params"][name], expected, rtol=1e-5, atol=1e-6)
    # The adapters moved (LoRA's B starts at zero).
    assert all(p.abs().max() > 0 for n, p in fsdp["params"].items() if "lora_B" in n)


@pytest.mark.slow
def test_weight_norms_from_the_shards_are_the_whole_weights_norms(tmp_path: Path) -> None:
    # The output graft's bound compares a step with its layer's weights: each rank must see
    # the whole weight's norm, not its shard's.
    start_ranks(fsdp2_weight_norms, (2, free_port(), str(tmp_path)))
    torch.manual_seed(0)
    optimizer = FOP(tiny_vit())
    expected = torch.stack([layer.weight.detach().norm() for layer in optimizer.layers])
    for rank in (0, 1):
        norms = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)


def _ranks_within(seconds: float, worker: Callable[..., None], *args: object) -> None:
    """2 ranks of ``worker``; fails, instead of hanging, when they are not done in time (a
    collective that one rank skips leaves the other waiting forever)."""
    context = start_ranks(worker, (2, free_port(), *args), join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish in {seconds:.0f} s: a rank hangs")


@pytest.mark.slow
def test_a_rank_without_output_grafted_layers_takes_part_in_the_bound(tmp_path: Path) -> None:
    # The bound reads the weight norms, a collective under FSDP2: a rank that holds only an
    # embedding (no output graft) must still join it, or the other rank waits forever.
    runs = {}
    for name, sharded, settings in (
        ("fsdp2", True, {"lr": 1e-2}),
        ("ddp", False, {"lr": 1e-2}),
        ("ddp_unbounded", False, {"lr": 1e-2, "graft_trust": None}),
    ):
        out = tmp_path / name
        out.mkdir()
        _ranks_within(120, graft_owners, str(out), sharded, 3, settings)
        runs[name] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    fsdp, ddp, unbounded = runs["fsdp2"], runs["ddp"], runs["ddp_unbounded"]
    assert (fsdp[0]["held"], fsdp[1]["held"]) == (["embed"], ["mix", "head"])
    for name, expected in ddp[0]["params"].items():
        for rank in (0, 1):
            torch.testing.assert_close(fsdp[rank]["params"][name], expected, rtol=1e-5, atol=1e-6)
    # The bound acted on this run: without it the grafted layers end elsewhere.
    moved = unbounded[0]["params"]["head.weight"] - ddp[0]["params"]["head.weight"]
    assert moved.abs().max() > 1e-3

"""Data parallel FOP on 2 processes (gloo on loopback), and the unsupported wrappers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_fop import FOP, UnsupportedWrapperError
from hf_fop.distributed import assign_layers, decomposition_cost
from tests.distributed_workers import (
    SETTINGS,
    TwoBranches,
    local_batch,
    one_branch_step,
    partial_participation,
    train_ddp,
)
from tests.helpers import TokenClassifier, assert_identical, free_port, start_ranks, tiny_vit


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ddp")
    start_ranks(train_ddp, (2, free_port(), str(out), 4, 8))
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


@pytest.mark.slow
def test_ranks_hold_identical_parameters_and_state(two_rank_run: dict[int, dict]) -> None:
    assert_identical(two_rank_run[0]["params"], two_rank_run[1]["params"])
    assert_identical(two_rank_run[0]["optimizer"], two_rank_run[1]["optimizer"])
    # One bucketed all-reduce per step, plus one decomposition share on inverse steps (0, 2).
    assert two_rank_run[0]["comm_calls"] == 4 + 2
    # Steps 1 and 3 (no decomposition) never wait for the device, on either rank.
    assert two_rank_run[0]["reads"] == two_rank_run[1]["reads"] == []


@pytest.mark.slow
def test_gradient_accumulation_under_no_sync_communicates_once_per_step(tmp_path: Path) -> None:
    start_ranks(train_ddp, (2, free_port(), str(tmp_path), 4, 8, 2))
    runs = {rank: torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}
    assert_identical(runs[0]["params"], runs[1]["params"])
    assert_identical(runs[0]["optimizer"], runs[1]["optimizer"])
    assert runs[0]["comm_calls"] == 4 + 2  # as without accumulation: nothing per micro-batch


@pytest.mark.slow
def test_a_compiled_ddp_model_trains_like_the_eager_one(
    two_rank_run: dict[int, dict], tmp_path: Path
) -> None:
    # torch.compile over DDP (DDPOptimizer splits the graph at gradient buckets): the hooks'
    # compiled path (an identity Function and a custom op in backward) on two ranks.
    start_ranks(train_ddp, (2, free_port(), str(tmp_path), 4, 8, 1, "fop", True))
    for rank in (0, 1):
        compiled = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, param in two_rank_run[rank]["params"].items():
            torch.testing.assert_close(compiled["params"][name], param, rtol=1e-5, atol=1e-6)
        assert compiled["comm_calls"] == two_rank_run[rank]["comm_calls"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_double_batch(two_rank_run: dict[int, dict]) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = FOP(model, **SETTINGS)
    for step in range(4):
        # The same global batch, in the order whose first half is the ranks' first halves.
        parts = [local_batch(step, 8, rank, 2) for rank in (0, 1)]
        images = torch.cat([parts[0][0][:4], parts[1][0][:4], parts[0][0][4:], parts[1][0][4:]])
        labels = torch.cat([parts[0][1][:4], parts[1][1][:4], parts[0][1][4:], parts[1][1][4:]])
        loss = F.cross_entropy(model(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Four AdamW-sized steps move parameters by ~1e-2; the ranks sum in another order than one
    # process does, and the preconditioner amplifies that round-off to ~1e-6. A protocol error
    # (g1 or a factor not averaged, a rank's share lost) differs by ~1e-3.
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            two_rank_run[0]["params"][name], param.detach(), rtol=1e-5, atol=1e-5, msg=name
        )


@pytest.mark.slow
def test_inversion_work_is_divided(two_rank_run: dict[int, dict]) -> None:
    layers = FOP(tiny_vit(), **SETTINGS).layers
    costs = [decomposition_cost(layer.in_dim, layer.out_dim) for layer in layers]
    owners = assign_layers(costs, 2)
    for rank in (0, 1):
        expected = [i for i, owner in enumerate(owners) if owner == rank]
        assert two_rank_run[rank]["decomposed"] == expected
    assert set(two_rank_run[0]["decomposed"]).isdisjoint(two_rank_run[1]["decomposed"])
    assert sorted(two_rank_run[0]["decomposed"] + two_rank_run[1]["decomposed"]) == list(
        range(len(layers))
    )


def test_assignment_balances_by_cost() -> None:
    assert assign_layers([8.0, 1.0, 1.0, 6.0], 2) == [0, 1, 1, 1]
    assert assign_layers([3.0, 2.0, 1.0], 1) == [0, 0, 0]
    assert sorted(assign_layers([1.0] * 5, 3)) == [0, 0, 1, 1, 2]
    # Largest first, each to the lighter rank: 7 -> r0, 5 -> r1, 4 -> r1, 3 -> r0, 2 -> r1.
    assert assign_layers([3.0, 7.0, 2.0, 5.0, 4.0], 2) == [0, 0, 1, 1, 1]


def test_data_parallel_is_rejected_with_the_alternative() -> None:
    with pytest.raises(UnsupportedWrapperError, match="DistributedDataParallel"):
        FOP(nn.DataParallel(TokenClassifier()))


@pytest.mark.parametrize(
    ("name", "match"), [("DeepSpeedEngine", "DeepSpeed"), ("FullyShardedDataParallel", "FSDP")]
)
def test_sharding_wrappers_are_rejected(name: str, match: str) -> None:
    wrapper = type(name, (nn.Module,), {})()
    wrapper.module = TokenClassifier()
    with pytest.raises(UnsupportedWrapperError, match=match):
        FOP(wrapper)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (dict(deepspeed="ds_config.json"), "DeepSpeed"),
        (dict(fsdp=["full_shard"]), "FSDP2 only.*fsdp_version"),
        (
            dict(fsdp=["full_shard"], fsdp_config={"fsdp_version": 2}, save_strategy="steps"),
            "SHARDED_STATE_DICT",
        ),
        (dict(parallel_mode=SimpleNamespace(value="not_distributed")), "DataParallel"),
    ],
)
def test_trainer_setups_that_break_curvature_fail_early(args: dict, match: str) -> None:
    from hf_fop.integration.trainer import check_supported_setup

    settings = dict(
        optim="fop",
        deepspeed=None,
        fsdp=[],
        fsdp_config={},
        save_strategy="no",
        parallel_mode=SimpleNamespace(value="distributed"),
    )
    settings.update(args)
    with pytest.raises(UnsupportedWrapperError, match=match):
        check_supported_setup(SimpleNamespace(**settings))


def test_examples_are_the_spawned_workers_inputs() -> None:
    # The arrangement used above: the ranks' first halves are the global first half.
    first_halves = torch.cat([local_batch(0, 8, rank, 2)[0][:4] for rank in (0, 1)])
    whole = torch.cat([local_batch(0, 8, rank, 2)[0] for rank in (0, 1)])
    assert first_halves.shape[0] * 2 == whole.shape[0]
    assert not any(
        torch.equal(first_halves[i], whole[j])
        for i in range(8)
        for j in (4, 5, 6, 7, 12, 13, 14, 15)
    )


@pytest.mark.slow
def test_a_layer_run_by_one_rank_is_averaged_over_that_rank_only(tmp_path: Path) -> None:
    start_ranks(partial_participation, (2, free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for branch, name in enumerate(("a", "b")):
        # One process that ran only this branch, on the data of the rank that ran it.
        torch.manual_seed(0)
        model = TwoBranches()
        optimizer = FOP(model, targets="all-linear", curvature_interval=1)
        one_branch_step(model, optimizer, branch)
        expected = optimizer.curvature.state_dict()[name]
        for curvature in ranks:
            # Not halved by the rank that lacked it: averaged over the ranks that had it.
            torch.testing.assert_close(curvature[name]["A"], expected["A"], rtol=1e-6, atol=0)
            torch.testing.assert_close(curvature[name]["G"], expected["G"], rtol=1e-6, atol=0)


def test_trainer_accepts_fsdp2_configs() -> None:
    from hf_fop.integration.trainer import check_supported_setup

    args = SimpleNamespace(
        optim="fop",
        deepspeed=None,
        fsdp=["full_shard", "auto_wrap"],
        fsdp_config={"fsdp_version": 2},
        save_strategy="no",
        parallel_mode=SimpleNamespace(value="distributed"),
    )
    check_supported_setup(args)  # no error: FSDP2 is supported
    args.save_strategy = "steps"
    args.fsdp_config["state_dict_type"] = "SHARDED_STATE_DICT"
    check_supported_setup(args)  # checkpoints through torch.distributed.checkpoint

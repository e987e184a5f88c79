"""Worker functions for the 2-process tests (importable by torch.multiprocessing spawn)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from hf_fop import FOP
from hf_fop.config import KRONECKER_SETTINGS
from hf_fop.distributors.sharded import full_tensor, is_sharded
from tests.helpers import ValueReads, device_ahead, image_data, tiny_vit

# The layouts are compared to round-off, which the Kronecker path keeps at round-off. The
# defaults' Adam-normalised steps (eps 1e-8) turn all-reduce round-off on near-zero rotated
# coordinates into differences of order lr: with eps 1e-4 23 of these 26 tests passed as they
# stand and the three tight comparisons differed by 1.5e-6 to 3e-5.
SETTINGS = {**KRONECKER_SETTINGS, "lr": 3e-3, "curvature_interval": 1, "inverse_interval": 2}
# The workers' modes: FOP's own, and FOP with block-diagonal factors (the tiny ViT's sides of
# 17, 32 and 33 are split, its sides of 16 are not).
MODES = {"fop": {"mode": "fop"}, "kfac": {"mode": "kfac"}, "fop-blocked": {"block_size": 16}}


def init_process(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)


def finish_process() -> None:
    """Tear the process group down once every rank is done with it (a rank that leaves while
    the other still communicates can abort in gloo's threads), then leave at once: what still
    holds the group (an FSDP2 model's device mesh) would otherwise be torn down at interpreter
    exit, where gloo aborted once in CI ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = image_data(256)
    index = torch.arange(step * size, (step + 1) * size) % len(images)
    return images[index], labels[index]


def local_batch(
    step: int, local: int, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch, arranged so that the ranks' first halves make up
    the first half of the global batch (the split a single process would use)."""
    images, labels = _global_batch(step, local * world_size)
    index = rank_rows(local, rank, world_size)
    return images[index], labels[index]


def rank_rows(local: int, rank: int, world_size: int) -> torch.Tensor:
    """The rows of a global batch of ``local * world_size`` that are this rank's: its share of
    the first half, then of the second."""
    half, local_half = local * world_size // 2, local // 2
    first = torch.arange(rank * local_half, (rank + 1) * local_half)
    return torch.cat([first, first + half])


def measured_step(optimizer: FOP, step: int, reads: list[str]) -> None:
    """optimizer.step(), recording in ``reads`` what a step without a decomposition reads from
    the device (nothing, it should)."""
    if step % SETTINGS["inverse_interval"] == 0:
        optimizer.step()
        return
    optimizer.statistics()  # reads the last step's flags, outside the step measured
    with device_ahead(), ValueReads() as mode:
        optimizer.step()
    reads += mode.reads


def train_ddp(
    rank: int,
    world_size: int,
    port: int,
    out: str,
    steps: int,
    local: int,
    micro_batches: int = 1,
    mode: str = "fop",
    compiled: bool = False,
) -> None:
    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = FOP(model, **{**SETTINGS, **MODES[mode]}, gradient_accumulation_steps=micro_batches)
    ddp = DistributedDataParallel(model)
    forward = torch.compile(ddp, backend="eager") if compiled else ddp
    reads: list[str] = []
    for step in range(steps):
        images, labels = local_batch(step, local, rank, world_size)
        optimizer.zero_grad()
        for index, (x, y) in enumerate(
            zip(images.chunk(micro_batches), labels.chunk(micro_batches))
        ):
            # Gradient accumulation as the Trainer does it: no_sync on all but the last micro-batch.
            context = ddp.no_sync() if index < micro_batches - 1 else contextlib.nullcontext()
            with context:
                (F.cross_entropy(forward(x).logits, y) / micro_batches).backward()
        measured_step(optimizer, step, reads)
    torch.save(
        {
            "params": {n: p.detach() for n, p in model.named_parameters()},
            "optimizer": optimizer.state_dict(),
            "decomposed": list(optimizer.curvature.decomposed_by_rank),
            "comm_calls": optimizer.communicator.calls,
            "reads": reads,
        },
        Path(out) / f"rank{rank}.pt",
    )
    finish_process()


class TwoBranches(torch.nn.Module):
    """Two layers of which each rank runs only one: partial participation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        return (self.a if branch == 0 else self.b)(x)


def branch_batch(rank: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))


def one_branch_step(model: TwoBranches, optimizer: FOP, branch: int) -> None:
    loss = model(branch_batch(branch), branch).pow(2).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def partial_participation(rank: int, world_size: int, port: int, out: str) -> None:
    """Rank r runs only branch r (no DDP): each layer's statistics come from one rank."""
    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = TwoBranches()
    optimizer = FOP(model, targets="all-linear", curvature_interval=1)
    one_branch_step(model, optimizer, rank)
    torch.save(optimizer.curvature.state_dict(), Path(out) / f"rank{rank}.pt")
    finish_process()


def shard_vit(model: torch.nn.Module, unsharded: set[torch.nn.Parameter] | None = None) -> None:
    """FSDP2's usual recipe: fully_shard every transformer block, then the root; parameters in
    ``unsharded`` stay whole on every rank (``ignored_params``)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.vit.encoder.layer if hasattr(model.vit, "encoder") else model.vit.layers:
        fully_shard(block, ignored_params=unsharded)
    fully_shard(model, ignored_params=unsharded)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """What FSDP2 leaves to the user for parameters it ignores: averaging their gradients."""
    for param in params:
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()


def train_fsdp2(
    rank: int,
    world_size: int,
    port: int,
    out: str,
    steps: int,
    local: int,
    mode: str = "fop",
    optimizer_first: bool = False,
    micro_batches: int = 1,
    unsharded_layer: bool = False,
    compiled: bool = False,
) -> None:
    """As train_ddp, on a model sharded with fully_shard (parameters as DTensors); with
    ``optimizer_first`` the optimizer is built before sharding, as accelerate's prepare does;
    with ``micro_batches`` > 1, gradient accumulation without reduce-scatter until the last;
    with ``unsharded_layer``, the last MLP projection is left whole on every rank."""
    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = tiny_vit()
    whole = list(model.vit.layers[-1].mlp.fc2.parameters()) if unsharded_layer else []
    if optimizer_first:
        optimizer = FOP(model, **{**SETTINGS, **MODES[mode]})
        shard_vit(model, set(whole))
    else:
        shard_vit(model, set(whole))
        optimizer = FOP(model, **{**SETTINGS, **MODES[mode]})
    optimizer.gradient_accumulation_steps = micro_batches
    forward = torch.compile(model, backend="eager") if compiled else model
    reads: list[str] = []
    for step in range(steps):
        images, labels = local_batch(step, local, rank, world_size)
        optimizer.zero_grad()
        for index, (x, y) in enumerate(
            zip(images.chunk(micro_batches), labels.chunk(micro_batches))
        ):
            model.set_requires_gradient_sync(index == micro_batches - 1)
            (F.cross_entropy(forward(x).logits, y) / micro_batches).backward()
        average_gradients(whole)
        measured_step(optimizer, step, reads)
    curvature = optimizer.curvature.state_dict()
    torch.save(
        {
            "params": {n: full_tensor(p).detach() for n, p in model.named_parameters()},
            "whole": [n for n, p in model.named_parameters() if not is_sharded(p)],
            "curvature_layers": sorted(curvature),
            "curvature_bytes": sum(
                t.numel() * t.element_size()
                for layer in curvature.values()
                for t in layer.values()
                if isinstance(t, torch.Tensor)
            ),
            "decomposed": list(optimizer.curvature.decomposed_by_rank),
            "statistics": optimizer.statistics(),
            "reads": reads,
        },
        Path(out) / f"rank{rank}.pt",
    )
    finish_process()


def _save(model: torch.nn.Module, optimizer: FOP, path: Path, layout: str) -> None:
    if layout == "dcp":  # what accelerate and the Trainer do under FSDP2 (SHARDED_STATE_DICT)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    else:  # one torch.save file per rank, DTensors included
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            path / f"rank{dist.get_rank()}.pt",
        )


def _load(model: torch.nn.Module, optimizer: FOP, path: Path, layout: str) -> None:
    if layout == "dcp":  # in place into a fresh optimizer's state_dict, then set
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    else:
        saved = torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=False)  # DTensors
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])


def fsdp2_resume(
    rank: int, world_size: int, port: int, out: str, phase: str, layout: str = "torch"
) -> None:
    """FSDP2 + FOP with clipping: 4 steps straight ("full"), or 2 steps saved ("first") and
    then loaded into fresh processes for the last 2 ("resume"); ``layout``: "dcp"
    (torch.distributed.checkpoint) or "torch" (a torch.save file per rank), and for "first"
    also "both"."""
    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = tiny_vit()
    shard_vit(model)
    optimizer = FOP(model, **SETTINGS)
    checkpoint = Path(out) / f"checkpoint_{layout}"
    steps = range(4) if phase == "full" else range(2) if phase == "first" else range(2, 4)
    if phase == "resume":
        _load(model, optimizer, checkpoint, layout)
    for step in steps:
        images, labels = local_batch(step, 8, rank, world_size)
        optimizer.zero_grad()
        F.cross_entropy(model(images).logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # on DTensors
        optimizer.step()
    if phase == "first":
        for each in ("dcp", "torch") if layout == "both" else (layout,):
            folder = Path(out) / f"checkpoint_{each}"
            folder.mkdir(exist_ok=True)
            _save(model, optimizer, folder, each)
    else:
        params = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        torch.save(params, Path(out) / f"{phase}_{layout}{rank}.pt")
    finish_process()


def lora_fsdp2(rank: int, world_size: int, port: int, out: str, sharded: bool) -> None:
    """LoRA adapters on the attention projections, trained by FOP with or without FSDP2."""
    from peft import LoraConfig, get_peft_model

    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = get_peft_model(tiny_vit(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = model.base_model.model
    if sharded:
        shard_vit(base)
        network = base
    else:
        network = DistributedDataParallel(base)
    optimizer = FOP(base, **SETTINGS)
    for step in range(3):
        images, labels = local_batch(step, 8, rank, world_size)
        optimizer.zero_grad()
        F.cross_entropy(network(images).logits, labels).backward()
        optimizer.step()
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        for n, p in base.named_parameters()
        if p.requires_grad
    }
    torch.save(
        {"params": params, "layers": optimizer.layer_names},
        Path(out) / f"{'fsdp2' if sharded else 'ddp'}{rank}.pt",
    )
    finish_process()


def fsdp2_weight_norms(rank: int, world_size: int, port: int, out: str) -> None:
    """The weight norms that bound the output graft, as FOP computes them from the shards."""
    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = tiny_vit()
    shard_vit(model)
    optimizer = FOP(model)
    assert optimizer.curvature.distributor.sharded
    norms = optimizer.curvature.distributor.weight_norms()
    torch.save(norms, Path(out) / f"rank{rank}.pt")
    finish_process()


class TokenMixer(torch.nn.Module):
    """A wide embedding and two narrow Linear layers: under FOP's owner assignment (largest
    decomposition first) one of 2 ranks holds the embedding alone, which takes no output
    graft, and the other the two output-grafted Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 64)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pieces = self.embed(tokens).reshape(tokens.shape[0], -1, 8)
        return self.head(torch.tanh(self.mix(pieces))).mean(1)


def token_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, 50, (size, 6), generator=generator), torch.randint(
        0, 4, (size,), generator=generator
    )


def graft_owners(
    rank: int, world_size: int, port: int, out: str, sharded: bool, steps: int, settings: dict
) -> None:
    """TokenMixer trained by FOP (defaults and ``settings``) under FSDP2 or DDP; each rank
    saves the parameters and the layers whose curvature it holds."""
    init_process(rank, world_size, port)
    torch.manual_seed(0)
    model = TokenMixer()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        network: torch.nn.Module = model
    else:
        network = DistributedDataParallel(model)
    optimizer = FOP(model, **settings)
    for step in range(steps):
        tokens, labels = token_batch(step, 8 * world_size)
        index = rank_rows(8, rank, world_size)
        optimizer.zero_grad()
        F.cross_entropy(network(tokens[index]), labels[index]).backward()
        optimizer.step()
    params = {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}
    held = [
        optimizer.layer_names[index]
        for bucket in optimizer.curvature.buckets
        for index in bucket.indices
    ]
    torch.save({"params": params, "held": held}, Path(out) / f"rank{rank}.pt")
    finish_process()

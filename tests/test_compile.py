"""FOP on a torch.compile'd model: the same training as eager, and no more recompiles than
AdamW causes on the same model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
import torch._dynamo

from hf_fop import FOP
from tests.helpers import kronecker, tiny_gpt2, tiny_vit


class _RecompileLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.functions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Recompiling function" in message:
            self.functions.append(message.split("Recompiling function", 1)[1].split("\n")[0])


def _vit_batch(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    config = model.config
    size = (8, config.num_channels, config.image_size, config.image_size)
    return {
        "pixel_values": torch.randn(size, generator=generator),
        "labels": torch.randint(config.num_labels, (8,), generator=generator),
    }


def _gpt2_batch(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(model.config.vocab_size, (4, 12), generator=generator)
    return {"input_ids": ids, "labels": ids}


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable]] = {
    "vit": (tiny_vit, _vit_batch),
    "gpt2": (tiny_gpt2, _gpt2_batch),
}


def _train(model_name: str, make_optimizer: Callable, compiled: bool, steps: int = 6):
    """Final parameters and the recompiles logged, per step."""
    build, batch = MODELS[model_name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build()
    optimizer = make_optimizer(model)
    forward = torch.compile(model, backend="eager") if compiled else model
    generator = torch.Generator().manual_seed(1)
    recompiles_after = []
    log = _RecompileLog()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(log)
    torch._logging.set_logs(recompiles=True)
    try:
        for _ in range(steps):
            loss = forward(**batch(model, generator)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            recompiles_after.append(len(log.functions))
    finally:
        torch._logging.set_logs()
        logger.removeHandler(log)
        if isinstance(optimizer, FOP):
            optimizer.remove_hooks()
    params = [p.detach().clone() for p in model.parameters()]
    return params, recompiles_after, log.functions


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_compiled_model_trains_like_eager_without_recompiling_each_step(mode: str) -> None:
    def make(model):
        # The Kronecker path: Adam-normalised steps (the defaults) turn the kernels' round-off
        # on near-zero coordinates into differences of order lr.
        return FOP(model, **kronecker(mode=mode, curvature_interval=2, inverse_interval=2))

    eager, _, _ = _train("vit", make, compiled=False)
    compiled, counts, functions = _train("vit", make, compiled=True)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The hooks run eagerly (their Python state would be guarded on): no frame of hf_fop is
    # compiled, and after the first two steps (shapes settle) nothing recompiles; curvature and
    # non-curvature steps alternate and must not matter.
    assert not [f for f in functions if "hf_fop" in f], functions
    assert counts[-1] == counts[1], counts


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_compiled_model_recompiles_no_more_than_with_adamw(model_name: str) -> None:
    # The hooks break the graph at each preconditioned layer; the layer's own forward, run
    # between the breaks, must not be compiled once per layer shape.
    _, _, with_adamw = _train(model_name, lambda m: torch.optim.AdamW(m.parameters()), True)
    _, _, with_fop = _train(model_name, lambda m: FOP(m, curvature_interval=2), True)
    assert len(with_fop) <= len(with_adamw), (with_fop, with_adamw)
    assert not [f for f in with_fop if "linear.py" in f or "pytorch_utils" in f], with_fop


def test_a_plain_model_compiles_whole_with_fullgraph_and_trains_like_eager() -> None:
    # fullgraph=True fails on any graph break: the hooks (the root's counter included) must be
    # traceable; the in-place ReLU after a preconditioned layer must stay legal.
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 32),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(32, 32),
            torch.nn.GELU(),
            torch.nn.Linear(32, 4),
        )

    params = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build()
        optimizer = FOP(
            model, **kronecker(targets="all-linear", curvature_interval=2, inverse_interval=2)
        )
        forward = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(16, 8, generator=generator)
            y = torch.randint(4, (16,), generator=generator)
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert optimizer.statistics()["beta_max"] != 0.0  # the hooks delivered g1
        optimizer.remove_hooks()
        params.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*params):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)

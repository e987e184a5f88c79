"""FOP on a torch.compile'd model: the same training as eager, and no recompiles step after step."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo

from hf_fop import FOP
from tests.helpers import tiny_vit


class _RecompileLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.functions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Recompiling function" in message:
            self.functions.append(message.split("Recompiling function", 1)[1].split("\n")[0])


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, compiled: bool, steps: int):
    forward = torch.compile(model, backend="eager") if compiled else model
    generator = torch.Generator().manual_seed(1)
    config = model.config
    recompiles_after = []
    log = _RecompileLog()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(log)
    torch._logging.set_logs(recompiles=True)
    try:
        for _ in range(steps):
            x = torch.randn(
                8, config.num_channels, config.image_size, config.image_size, generator=generator
            )
            y = torch.randint(config.num_labels, (8,), generator=generator)
            loss = forward(pixel_values=x, labels=y).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            recompiles_after.append(len(log.functions))
    finally:
        torch._logging.set_logs()
        logger.removeHandler(log)
    return recompiles_after, log.functions


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_compiled_model_trains_like_eager_without_recompiling_each_step(mode: str) -> None:
    params = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_vit()
        optimizer = FOP(model, mode=mode, curvature_interval=2, inverse_interval=2)
        counts, functions = _train(model, optimizer, compiled, steps=6)
        params[compiled] = [p.detach().clone() for p in model.parameters()]
    for eager, compiled in zip(params[False], params[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # The hooks run eagerly (their Python state would be guarded on): no frame of hf_fop is
    # compiled, and after the first two steps (shapes settle) nothing recompiles; curvature and
    # non-curvature steps alternate and must not matter.
    assert not [f for f in functions if "hf_fop" in f], functions
    assert counts[-1] == counts[1], counts

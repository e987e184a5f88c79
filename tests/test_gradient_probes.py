"""The gradient probes: p.grad rescaled after the backward (clipping) rescales g1 with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_fop import FOP
from hf_fop.factor_sums import weight_gradient
from hf_fop.gradient_probes import gradient_factor, probe_matrices, probe_rows
from tests.helpers import TokenClassifier, token_data

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("bias", [True, False])
def test_probes_of_the_rows_are_those_of_the_gradient_and_recover_its_factor(bias: bool) -> None:
    torch.manual_seed(0)
    d, x = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    grad = weight_gradient(d, x, bias)
    seen = probe_rows(d.float(), x.float(), bias)
    torch.testing.assert_close(seen.double(), probe_matrices(grad).double(), rtol=1e-5, atol=1e-6)
    stack = torch.stack([grad, 3 * grad]).float()
    factor = gradient_factor(
        probe_matrices(stack * torch.tensor([0.1, 2.0])[:, None, None]),
        torch.stack([seen, 3 * seen]),
    )
    torch.testing.assert_close(factor, torch.tensor([0.1, 2.0]), rtol=1e-5, atol=0)
    # No gradient seen: no factor to learn.
    assert gradient_factor(seen, torch.zeros_like(seen)).item() == 1.0


def _run(clip: bool, steps: int = 4) -> nn.Module:
    """Train with p.grad quartered between backward and step (what clipping does), or with the
    loss quartered instead: the same gradients, but the hooks see the quarter only in the
    second run."""
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, lr=1e-2, curvature_interval=1, inverse_interval=2)
    for step in range(steps):
        batch = slice(16 * step, 16 * (step + 1))
        loss = nn.functional.cross_entropy(model(tokens[batch]), labels[batch])
        optimizer.zero_grad()
        if clip:
            loss.backward()
            for p in model.parameters():
                p.grad.mul_(0.25)  # a power of two: the two runs' gradients agree exactly
        else:
            (0.25 * loss).backward()
        optimizer.step()
    return model


def test_a_gradient_rescaled_after_the_backward_steps_like_a_rescaled_loss() -> None:
    # Without the probes g1 keeps the unclipped scale: g_diff = 2 (g1 - g_avg) is then mostly
    # g1, and the parameters part after four steps by up to 4e-2 here (0 with them).
    clipped, scaled = _run(clip=True), _run(clip=False)
    for (name, p), q in zip(clipped.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)

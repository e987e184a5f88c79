"""The layers' own backward (layer_backward.py): the gradients autograd gives, g1 out of the
weight gradient at no extra matmul work, and the cases that must keep autograd's semantics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_fop import FOP
from tests.helpers import tiny_gpt2, tiny_vit


def _vit_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.arange(n) % 4


def _vit_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(pixel_values=images).logits, labels)


def _gpt2_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("family", ["vit", "gpt2"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_parameter_gradients_are_autograds(family: str, micro_batches: int) -> None:
    """With the hooks on (the weight gradient summed from two halves where a micro-batch is
    cut), every parameter gets the gradient a plain backward gives."""
    torch.manual_seed(0)
    model = tiny_vit() if family == "vit" else tiny_gpt2()
    plain = copy.deepcopy(model)
    optimizer = FOP(model, gradient_accumulation_steps=micro_batches)
    if family == "vit":
        images, labels = _vit_batch()
        chunks = list(zip(images.chunk(micro_batches), labels.chunk(micro_batches)))
        loss = lambda m, chunk: _vit_loss(m, *chunk)  # noqa: E731
    else:
        chunks = list(torch.randint(0, 24, (6, 7)).chunk(micro_batches))
        loss = _gpt2_loss
    for m in (model, plain):
        for chunk in chunks:
            (loss(m, chunk) / micro_batches).backward()
    assert any(s.has_split for s in optimizer.capture.stats)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        assert p.grad.stride() == q.grad.stride(), name  # laid out as autograd lays it out


def test_fop_adds_no_matmul_work_to_the_backward() -> None:
    """On a step that gathers no factors, FOP's backward does the flops of autograd's alone:
    g1 is one of the two matmuls the weight gradient is summed from."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    optimizer = FOP(model, curvature_interval=100, precondition_embeddings=False)  # hooks only
    ids = torch.randint(0, 24, (8, 7))
    _gpt2_loss(model, ids).backward()
    optimizer.step()  # the curvature step
    optimizer.zero_grad()
    flops = []
    for m in (model, plain):
        loss = _gpt2_loss(m, ids)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops.append(counter.get_total_flops())
    assert all(s.has_split for s in optimizer.capture.stats)
    assert flops[0] == flops[1]


@pytest.mark.parametrize("backward_inside_autocast", [False, True])
def test_bf16_autocast_gradients_match_autograd(backward_inside_autocast: bool) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    plain = copy.deepcopy(model)
    optimizer = FOP(model)
    images, labels = _vit_batch()
    for m in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _vit_loss(m, images, labels)
            if backward_inside_autocast:
                loss.backward()
        if not backward_inside_autocast:
            loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        # bf16 matmuls: the two halves round differently from one product.
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3, msg=name)
    g1 = optimizer.capture.stats[0].g1()
    assert g1.dtype == torch.float32 and torch.isfinite(g1).all()


def test_a_second_backward_through_a_retained_graph_counts_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    plain = copy.deepcopy(model)
    optimizer = FOP(model, targets="all-linear")
    x = torch.randn(4, 5)
    for m in (model, plain):
        loss = m(x).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # both backwards reach the parameters
    single = copy.deepcopy(plain)
    once = FOP(single, targets="all-linear")
    single(x).square().mean().backward()
    for stats, single in zip(optimizer.capture.stats, once.capture.stats):
        torch.testing.assert_close(stats.G(), single.G())
        torch.testing.assert_close(stats.g1(), single.g1())


def test_a_copy_of_the_model_trains_its_own_weights() -> None:
    """copy.deepcopy copies the hooks; the copy's backward must reach the copy's parameters and
    leave the optimizer's statistics alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(model)
    optimizer = FOP(model, targets="all-linear")
    copied = copy.deepcopy(model)
    x = torch.randn(4, 5)
    copied(x).sum().backward()
    reference(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(s.examples == 0 for s in optimizer.capture.stats)
    for p, q in zip(copied.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class _OwnForward(nn.Linear):
    """A Linear subclass with a forward of its own (here the same map): FOP cannot know what
    it computes, so autograd keeps the backward and the output's hook gathers g1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def test_a_linear_subclass_with_its_own_forward_keeps_autograds_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_OwnForward(5, 6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(model)
    optimizer = FOP(model, targets="all-linear")
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    assert "LayerBackward" not in type(model[0](x).grad_fn).__name__
    F.cross_entropy(reference(x[:4]), y[:4]).backward()
    expected = torch.cat([reference[0].weight.grad, reference[0].bias.grad[:, None]], 1)
    torch.testing.assert_close(optimizer.capture.stats[0].g1(), expected, rtol=1e-5, atol=1e-6)

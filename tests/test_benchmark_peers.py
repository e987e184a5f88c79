"""The benchmarks' peers and the rate ladder that tunes them: Muon and SOAP built as their users
build them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks.optimizers import OptimizerPair, make_optimizer, muon_weights
from benchmarks.rate_curves import next_rate, past_the_edge
from benchmarks.real_tasks import small_vit
from benchmarks.training import warmup_cosine


def test_the_ladder_steps_about_x3_on_one_three_ten() -> None:
    assert [next_rate(lr, up=True) for lr in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 0.1]
    assert [next_rate(lr, up=False) for lr in (1e-3, 3e-3, 1e-2)] == [3e-4, 1e-3, 3e-3]


def test_the_ladder_extends_past_an_edge_and_stops_once_the_best_is_bracketed() -> None:
    # Accuracy peaked at lr = 0.03, beyond the ladder's top: extend until the best is interior.
    def accuracy(lr: float) -> float:
        return -((math.log10(lr) - math.log10(0.03)) ** 2)

    means = {lr: accuracy(lr) for lr in (1e-3, 3e-3, 1e-2)}
    tried = []
    while (rate := past_the_edge(means, higher_is_better=True)) is not None:
        tried.append(rate)
        means[rate] = accuracy(rate)
    assert tried == [0.03, 0.1]
    # Perplexity (lower is better) falling towards the lowest rate extends downwards; a
    # divergence (infinite perplexity) at the top brackets from above.
    assert past_the_edge({1e-3: 50.0, 3e-3: 60.0, 1e-2: math.inf}, False) == 3e-4
    assert past_the_edge({1e-3: 70.0, 3e-3: 60.0, 1e-2: math.inf}, False) is None
    assert past_the_edge({1e-3: 0.5}, True) is None  # one rate brackets nothing


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = _mlp()
    hidden = muon_weights(model)
    # Every Linear weight but the output layer's; biases and the head go to AdamW.
    assert [id(p) for p in hidden] == [id(model[0].weight), id(model[2].weight)]
    vit = small_vit(image_size=8, patch_size=2, layers=2, intermediate=32)
    vit_hidden = {id(p) for p in muon_weights(vit)}
    names = [n for n, p in vit.named_parameters() if id(p) in vit_hidden]
    assert len(names) == 2 * 6 and all(".layers." in n and n.endswith("weight") for n in names)
    assert not any("embeddings" in n or "classifier" in n for n in names)


def test_the_muon_pair_is_one_optimizer_to_a_scheduler_and_steps_both() -> None:
    model = _mlp()
    optimizer = make_optimizer("muon", model, lr=1e-2)
    assert isinstance(optimizer, OptimizerPair)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(100))
    # The scheduler's rate reaches the inner optimizers' own groups.
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == pytest.approx(1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    schedule.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert muon.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert set(optimizer.state) == {p for p in model.parameters()}


def test_soap_runs_from_heavyball_under_a_torch_scheduler() -> None:
    import heavyball

    model = _mlp()
    optimizer = make_optimizer("soap", model, lr=2e-2)
    assert isinstance(optimizer, heavyball.SOAP)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    x = torch.randn(64, 6)
    y = (x @ torch.randn(6, 3)).argmax(-1)  # a rule the model can learn
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    # The rate moves through the group's "lr" alone, and heavyball follows it.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert losses[-1] < 0.8 * losses[0], losses

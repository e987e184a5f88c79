"""The benchmarks' peers and their search: Muon and SOAP built as their users build them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks.optimizers import OptimizerPair, make_optimizer, muon_weights
from benchmarks.tasks import small_vit
from benchmarks.training import warmup_cosine
from benchmarks.tuning import bracketed_search


def test_search_extends_past_an_edge_until_the_pick_is_interior() -> None:
    # A score peaked at lr = 0.03, beyond the grid's top.
    calls = []

    def score(lr: float) -> float:
        calls.append(lr)
        return -((math.log10(lr) - math.log10(0.03)) ** 2)

    search = bracketed_search(score, [1e-3, 3e-3, 1e-2], extensions=3)
    assert calls == [1e-3, 3e-3, 1e-2, 0.03, 0.1]
    assert search.best == 0.03 and search.interior
    assert [value for value, _ in search.trials] == calls


def test_search_stops_at_an_interior_pick_and_reports_an_unbracketed_one() -> None:
    peaked = bracketed_search(lambda lr: -abs(lr - 1e-3), [3e-4, 1e-3, 3e-3])
    assert peaked.best == 1e-3 and peaked.interior and len(peaked.trials) == 3
    # Still improving after every extension allowed: the pick is an edge, and says so.
    rising = bracketed_search(lambda lr: lr, [1.0, 2.0], extensions=2)
    assert [v for v, _ in rising.trials] == [1.0, 2.0, 4.0, 8.0]
    assert rising.best == 8.0 and not rising.interior
    # The lower edge extends downwards; a divergence (-inf) brackets from above.
    falling = bracketed_search(lambda lr: -math.inf if lr > 0.5 else -lr, [0.1, 1.0], 1)
    assert [v for v, _ in falling.trials] == [0.1, 1.0, 0.03]
    with pytest.raises(ValueError, match="positive"):
        bracketed_search(lambda lr: 0.0, [0.0, 1.0])


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

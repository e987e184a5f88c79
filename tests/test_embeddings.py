"""precondition_embeddings: nn.Embedding (and a tied output layer) preconditioned from its
whole gradient, the vocabulary side diagonal, against dense references."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_fop import FOP, partition_model
from tests.dense import assert_solve_close, unvec, vec
from tests.helpers import TokenClassifier, kronecker, tiny_gpt2, token_data, train

pytestmark = pytest.mark.numerics


def _lm_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    ids = (torch.arange(48).reshape(4, 12) * (step + 1) + step) % 24
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_a_tied_embedding_is_preconditioned_once_with_its_head() -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    partition = partition_model(model, embeddings=True)
    names = [name for name, _ in partition.layers]
    assert "transformer.wte" in names and "transformer.wpe" in names
    assert not any("lm_head" in name for name in names)
    owned = [id(p) for _, layer in partition.layers for p in layer.params]
    owned += [id(p) for _, p in partition.adamw_decay + partition.adamw_no_decay]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert all(p.dim() == 1 for _, p in partition.adamw_decay + partition.adamw_no_decay)
    # Without the setting the embeddings stay with AdamW.
    assert "transformer.wte" not in [n for n, _ in partition_model(model).layers]


def test_embedding_factors_are_those_of_its_whole_gradient() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    optimizer = FOP(model, precondition_embeddings=True, curvature_interval=1)
    _lm_step(model, optimizer, 0)  # the first estimate has weight 1
    g = model.transformer.wte.weight.grad.T  # (width, vocab): the head's share included
    state = optimizer.curvature.layer_state("transformer.wte")
    assert state["A"].shape == (24, 1, 1)  # the vocabulary side: its diagonal alone
    torch.testing.assert_close(state["A"][:, 0, 0], (g * g).sum(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["G"], g @ g.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["kfac", "fop"])
def test_embedding_step_is_the_damped_kronecker_inverse_of_its_gradient(mode: str) -> None:
    # One step, raw direction (no graft, no momentum, no decay, lr 1, absolute damping):
    # the update is -(diag(A) (x) G + damping I)^-1 g with A, G from g itself. FOP's correction
    # needs the hooks' g1, which an embedding has not: its FOP step is K-FAC's.
    torch.manual_seed(0)
    model = tiny_gpt2()
    before = model.transformer.wte.weight.detach().clone()
    damping = 1e-3
    settings = dict(lr=1.0, graft="none", momentum=0.0, weight_decay=0.0, damping=damping)
    optimizer = FOP(
        model,
        **kronecker(mode=mode, damping_mode="absolute", precondition_embeddings=True, **settings),
    )
    _lm_step(model, optimizer, 0)
    g = model.transformer.wte.weight.grad.T.double()
    A, G = torch.diag((g * g).sum(0)), g @ g.T
    F = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=torch.float64)
    want = -unvec(torch.linalg.solve(F, vec(g)), g.shape[0]).T
    got = model.transformer.wte.weight.detach() - before
    assert_solve_close(got, want, F)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"curvature": "eigen_corrected", "graft": "none"},
        {"block_size": 8, "basis_refresh": "qr", "inverse_interval": 2},
    ],
    ids=["defaults", "soap-like", "blocked-qr"],
)
def test_a_resumed_run_with_preconditioned_embeddings_continues_exactly(settings: dict) -> None:
    tokens, labels = token_data()
    settings = {**settings, "precondition_embeddings": True}
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, **settings)
    assert "embed" in optimizer.layer_names
    train(model, optimizer, tokens, labels, steps=3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, tokens[48:], labels[48:], steps=3)
    resumed_model = TokenClassifier()
    resumed_model.load_state_dict(saved_model)
    resumed = FOP(resumed_model, **settings)
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, tokens[48:], labels[48:], steps=3)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_embeddings_train_a_tied_language_model() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    optimizer = FOP(model, lr=1e-2, precondition_embeddings=True)
    ids = torch.arange(48).reshape(4, 12) % 24
    first = model(input_ids=ids, labels=ids).loss.item()
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert model(input_ids=ids, labels=ids).loss.item() < 0.5 * first
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_targets_select_embeddings_as_they_select_layers() -> None:
    model = TokenClassifier()
    names = lambda targets: [n for n, _ in partition_model(model, targets, embeddings=True).layers]  # noqa: E731
    assert names("auto") == ["embed", "blocks.0.1", "blocks.0.3", "blocks.1.1", "blocks.1.3"]
    assert names(["blocks.0.1"]) == ["blocks.0.1"]  # a list takes what it names
    assert names(["embed", "blocks.0.1"]) == ["embed", "blocks.0.1"]
    assert names("embed|head") == ["embed", "head"]
    with pytest.raises(ValueError, match="Embedding"):
        partition_model(model, ["embed"])  # not a candidate without the setting

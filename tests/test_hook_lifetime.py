"""What the hooks hold and count: nothing after backward, one live set per model, stray
forwards, padded positions and empty batches."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from hf_fop import FOP
from hf_fop.capture import _CAPTURES_BY_KEY
from tests.helpers import TokenClassifier, tiny_bert, tiny_gpt2, token_data


def test_no_layer_input_is_alive_after_backward_while_the_loss_is() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, precondition_embeddings=False)  # every layer hooked
    loss = nn.functional.cross_entropy(model(tokens[:16]), labels[:16])
    assert optimizer.capture.pending_inputs == len(optimizer.layers)
    inputs = [weakref.ref(held.tensor) for held in optimizer.capture._held]
    loss.backward()
    gc.collect()
    assert optimizer.capture.pending_inputs == 0
    assert all(ref() is None for ref in inputs)  # `loss` (and its graph) is still alive
    assert loss.grad_fn is not None


def test_one_live_set_of_hooks_per_model_and_none_after_the_optimizer() -> None:
    model = TokenClassifier()
    first = FOP(model, precondition_embeddings=False)  # every layer hooked
    with pytest.warns(UserWarning, match="replace them"):
        second = FOP(model, precondition_embeddings=False)
    layer = second.layers[0].module
    assert len(layer._forward_hooks) == 1  # the first optimizer's hook is gone
    keys = [first.capture._key, second.capture._key]
    assert keys[0] not in _CAPTURES_BY_KEY and keys[1] in _CAPTURES_BY_KEY
    del first, second
    gc.collect()
    assert len(layer._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0
    # Nor is a capture left where compiled graphs look it up.
    assert keys[1] not in _CAPTURES_BY_KEY


def test_a_forward_without_backward_does_not_disturb_the_split() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(
        model, curvature_interval=1, precondition_embeddings=False
    )  # every layer hooked
    for _ in range(3):
        model(tokens[:8])  # a metric computed in train mode, with gradients on
        loss = nn.functional.cross_entropy(model(tokens[:16]), labels[:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert optimizer.statistics()["beta_max"] != 0.0
    reference = copy.deepcopy(model)
    optimizer.zero_grad()
    model(tokens[16:24])
    nn.functional.cross_entropy(model(tokens[:16]), labels[:16]).backward()
    g1 = optimizer.capture.stats[0].g1()
    nn.functional.cross_entropy(reference(tokens[:8]), labels[:8]).backward()
    layer = reference.blocks[0][1]
    expected = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(g1, expected, rtol=1e-5, atol=1e-6)


def _factors(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    optimizer = FOP(model, curvature_interval=1, precondition_embeddings=False)  # the hooks' A
    model(**batch).loss.backward()
    return [stats.A() for stats in optimizer.capture.stats]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_padding_does_not_change_the_curvature(family: str) -> None:
    torch.manual_seed(0)
    model = tiny_bert() if family == "bert" else tiny_gpt2()
    ids = torch.randint(8, 20, (4, 6))
    if family == "bert":
        short = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([0, 1, 0, 1]),
        }
        pad = torch.zeros(4, 6, dtype=torch.long)
        padded = {
            "input_ids": torch.cat([ids, pad], 1),
            "attention_mask": torch.cat([torch.ones_like(ids), pad], 1),
            "labels": short["labels"],
        }
    else:
        short = {"input_ids": ids, "labels": ids}
        padded = {
            "input_ids": torch.cat([ids, torch.zeros_like(ids)], 1),
            "labels": torch.cat([ids, torch.full_like(ids, -100)], 1),
        }
    # Dropout is off in the tiny models; the padded run sees the same real tokens.
    expected = _factors(copy.deepcopy(model), short)
    observed = _factors(copy.deepcopy(model), padded)
    for a, b in zip(observed, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_empty_batch_changes_nothing() -> None:
    tokens, labels = token_data()
    model = TokenClassifier()
    optimizer = FOP(model, curvature_interval=1)
    before = copy.deepcopy(model.state_dict())
    loss = nn.functional.cross_entropy(model(tokens[:0]), labels[:0], reduction="sum")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

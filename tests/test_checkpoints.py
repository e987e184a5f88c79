"""Checkpoints keep the curvature by layer name: mismatches fail at load, old ones still resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from hf_fop import FOP
from hf_fop.param_groups import param_indices
from tests.helpers import TokenClassifier, token_data, train

SETTINGS = dict(curvature_interval=2, inverse_interval=3, lr=0.03)


def _saved(optimizer: FOP) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def _trained(steps: int = 4) -> tuple[TokenClassifier, FOP]:
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, **SETTINGS)
    train(model, optimizer, tokens, labels, steps=steps)
    return model, optimizer


def test_curvature_is_saved_by_layer_name() -> None:
    _, optimizer = _trained()
    curvature = optimizer.state_dict()["curvature"]
    assert list(curvature) == ["blocks.0.1", "blocks.0.3", "blocks.1.1", "blocks.1.3"]
    first = curvature["blocks.0.1"]
    assert first["A"].shape == (17, 17) and first["G"].shape == (32, 32)
    assert first["factor_updates"] == 2  # curvature steps 0 and 2
    # Copies, not views of the stacked bucket: a checkpoint holds each layer once.
    assert first["A"].untyped_storage().nbytes() == 17 * 17 * 4


@pytest.mark.parametrize("other", ["narrower", "fewer_layers"])
def test_checkpoint_of_another_model_fails_at_load_naming_the_layer(other: str) -> None:
    _, optimizer = _trained()
    checkpoint = _saved(optimizer)
    if other == "narrower":
        model = TokenClassifier(dim=8)
        target = FOP(model, **SETTINGS)
        match = "layer 'blocks.0.1' has A of shape \\(17, 17\\).*needs \\(9, 9\\)"
    else:
        model = TokenClassifier()
        target = FOP(model, skip=["blocks.1.3"], **SETTINGS)
        match = "unexpected 'blocks.1.3'"
    train(model, target, *token_data(), steps=1)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(checkpoint)
    # Nothing was loaded: the failing load left the optimizer as it was.
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    flat_before = _tensors(before)
    assert flat_before and all(torch.equal(a, b) for a, b in zip(_tensors(after), flat_before))


def test_checkpoint_with_curvature_in_the_weights_state_resumes_exactly() -> None:
    # Release 0.1 kept each layer's curvature in its weight's optimizer state, by index.
    tokens, labels = token_data()
    model, optimizer = _trained()
    initial_model = copy.deepcopy(model.state_dict())
    checkpoint = _saved(optimizer)
    legacy = {"state": dict(checkpoint["state"]), "param_groups": checkpoint["param_groups"]}
    indices = param_indices(optimizer.param_groups)
    for name, layer in zip(optimizer.layer_names, optimizer.layers):
        index = indices[id(layer.weight)]
        legacy["state"][index] = {**legacy["state"].get(index, {}), **checkpoint["curvature"][name]}
    uninterrupted = train(model, optimizer, tokens, labels, steps=5)

    resumed_model = TokenClassifier()
    resumed_model.load_state_dict(initial_model)
    resumed = FOP(resumed_model, **SETTINGS)
    resumed.load_state_dict(legacy)
    assert train(resumed_model, resumed, tokens, labels, steps=5) == uninterrupted
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert "A" not in resumed.state[resumed.layers[0].weight]

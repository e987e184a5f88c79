"""Checkpoints: complete from the start, curvature nested in each weight's state, layers named;
mismatches fail at load, the two older layouts still resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from hf_fop import FOP
from hf_fop.param_groups import param_indices
from tests.helpers import TokenClassifier, assert_identical, kronecker, token_data, train

# Written for the Kronecker path (its layouts, the older ones included).
SETTINGS = kronecker(curvature_interval=2, inverse_interval=3, lr=0.03)
LAYERS = ["blocks.0.1", "blocks.0.3", "blocks.1.1", "blocks.1.3"]


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


def _layout(value: object, prefix: str = "") -> dict[str, tuple[int, ...] | str]:
    """Every leaf of a nested state as path -> tensor shape (or the type of a plain value)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_layout(item, f"{prefix}/{key}"))
        return out
    return {prefix: tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}


def _trained(steps: int = 4) -> tuple[TokenClassifier, FOP]:
    tokens, labels = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    optimizer = FOP(model, **SETTINGS)
    train(model, optimizer, tokens, labels, steps=steps)
    return model, optimizer


def _weight_indices(optimizer: FOP) -> dict[str, int]:
    indices = param_indices(optimizer.param_groups)
    return {n: indices[id(x.weight)] for n, x in zip(optimizer.layer_names, optimizer.layers)}


def test_curvature_is_nested_in_each_weights_state_and_the_layers_are_named() -> None:
    _, optimizer = _trained()
    state_dict = optimizer.state_dict()
    assert state_dict["param_groups"][0]["layers"] == LAYERS
    first = state_dict["state"][_weight_indices(optimizer)["blocks.0.1"]]
    assert first.keys() == {"curvature"}  # the momentum is the bucket's, in the curvature
    curvature = first["curvature"]
    assert curvature["A"].shape == (17, 17) and curvature["G"].shape == (32, 32)
    assert curvature["factor_updates"] == 2 and curvature["decomposed"] == 1  # steps 0 and 2
    # Copies, not views of the stacked bucket: a checkpoint holds each layer once.
    assert curvature["A"].untyped_storage().nbytes() == 17 * 17 * 4
    # The optimizer's own state is not changed by saving it.
    assert "curvature" not in optimizer.state[optimizer.layers[0].weight]


def test_state_dict_and_its_load_are_torchs_own_and_a_users_hooks_see_the_curvature() -> None:
    # FOP adds the curvature through torch's state-dict hooks, so hooks registered later (a
    # user's, a wrapper's) see the whole state, and its load pre-hooks see it before FOP's.
    assert FOP.state_dict is torch.optim.Optimizer.state_dict
    assert FOP.load_state_dict is torch.optim.Optimizer.load_state_dict
    _, optimizer = _trained()
    key = _weight_indices(optimizer)["blocks.0.1"]
    seen = []
    optimizer.register_state_dict_post_hook(
        lambda _, state_dict: seen.append(sorted(state_dict["state"][key]))
    )
    saved = optimizer.state_dict()
    assert seen == [sorted(saved["state"][key])] and "curvature" in seen[0]
    _, resumed = _trained(steps=1)
    resumed.register_load_state_dict_pre_hook(
        lambda _, state_dict: seen.append(sorted(state_dict["state"][key])), prepend=True
    )
    resumed.load_state_dict(saved)
    assert seen[1] == seen[0]
    for before, after in zip(_tensors(saved), _tensors(resumed.state_dict())):
        assert torch.equal(before, after)


def test_a_fresh_optimizer_offers_every_tensor_of_a_trained_one_to_dcp() -> None:
    # torch.distributed.checkpoint loads in place into a fresh optimizer's state_dict (after a
    # step at lr 0 on zero gradients), so whatever is missing there would silently not load.
    torch.manual_seed(0)
    model = TokenClassifier()
    fresh = FOP(model, **SETTINGS)
    trained_model, trained = _trained(steps=1)
    assert _layout(get_optimizer_state_dict(model, fresh)) == _layout(
        get_optimizer_state_dict(trained_model, trained)
    )
    assert all(p.grad is None for p in model.parameters())
    # ... and loading those zeros is the same as starting without them.
    tokens, labels = token_data()
    runs = []
    for load in (False, True):
        torch.manual_seed(0)
        model = TokenClassifier()
        optimizer = FOP(model, **SETTINGS)
        if load:
            zeros = FOP(TokenClassifier(), **SETTINGS)
            zeros.step()  # gradients of None: nothing to do, the state is created
            optimizer.load_state_dict(_saved(zeros))
        runs.append((train(model, optimizer, tokens, labels, steps=4), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name])


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


def test_a_checkpoint_without_some_layers_curvature_fails_naming_the_layer() -> None:
    # What a full state dict gathered on rank 0 under FSDP2 would hold: rank 0's layers only.
    _, optimizer = _trained()
    checkpoint = _saved(optimizer)
    del checkpoint["state"][_weight_indices(optimizer)["blocks.1.1"]]["curvature"]
    with pytest.raises(ValueError, match=r"no FOP curvature for layer 'blocks.1.1'.*SHARDED"):
        FOP(TokenClassifier(), **SETTINGS).load_state_dict(checkpoint)


def _older_layout(checkpoint: dict, optimizer: FOP, layout: str) -> dict:
    """The checkpoint as an earlier version wrote it: curvature by layer name at the top level,
    or release 0.1's flat keys in each weight's state; no layer names in the group."""
    state = {key: dict(value) for key, value in checkpoint["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "layers"} for g in checkpoint["param_groups"]]
    curvature = {}
    for name, index in _weight_indices(optimizer).items():
        layer = state[index].pop("curvature")
        del layer["decomposed"]
        curvature[name] = layer
        if layout == "release-0.1":
            state[index].update(layer)
    older = {"state": state, "param_groups": groups}
    if layout == "by-name":
        older["curvature"] = curvature
    return older


@pytest.mark.parametrize("layout", ["by-name", "release-0.1"])
def test_a_checkpoint_of_an_older_layout_fails_saying_what_to_do(layout: str) -> None:
    # Both layouts were written while the momentum came after the preconditioner: no exact
    # resume is possible, and loading must not half-succeed.
    _, optimizer = _trained()
    checkpoint = _older_layout(_saved(optimizer), optimizer, layout)
    resumed = FOP(TokenClassifier(), **SETTINGS)
    before = _saved(resumed)
    with pytest.raises(ValueError, match=r"v0\.5\.0"):
        resumed.load_state_dict(checkpoint)
    assert_identical(_saved(resumed), before)

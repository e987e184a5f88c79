"""Which layers FOP takes: by type and position, regex, lists, skips, caps, ties, freezing."""

from __future__ import annotations

import pytest
from torch import nn

from hf_fop import partition_model
from tests.helpers import TokenClassifier, tiny_gpt2


def _names(partition) -> list[str]:
    return [name for name, _ in partition.layers]


def test_auto_takes_the_blocks_and_leaves_the_head() -> None:
    partition = partition_model(TokenClassifier())
    assert _names(partition) == ["blocks.0.1", "blocks.0.3", "blocks.1.1", "blocks.1.3"]
    adamw = [name for name, _ in partition.adamw_decay + partition.adamw_no_decay]
    assert "head.weight" in adamw and "embed.weight" in adamw and "norm.weight" in adamw
    # No decay on 1-D tensors (biases, norms).
    assert all(p.dim() < 2 for _, p in partition.adamw_no_decay)


def test_auto_without_blocks_takes_every_supported_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert _names(partition_model(model)) == ["0", "2"]


def test_regex_list_skip_and_size_cap() -> None:
    model = TokenClassifier()
    assert _names(partition_model(model, targets=r"\.3$")) == ["blocks.0.3", "blocks.1.3"]
    assert _names(partition_model(model, targets=["head", "blocks.1.1"])) == ["blocks.1.1", "head"]
    skipped = partition_model(model, targets="all-linear", skip=[r"^blocks\.0"])
    assert _names(skipped) == ["blocks.1.1", "blocks.1.3", "head"]
    assert skipped.excluded == {"blocks.0.1": "skip list", "blocks.0.3": "skip list"}
    with pytest.warns(UserWarning, match="selects no layer"):
        capped = partition_model(model, max_factor_dim=20)
    assert _names(capped) == [] and all("max_factor_dim" in r for r in capped.excluded.values())


def test_tied_lm_head_and_frozen_layers_are_not_preconditioned() -> None:
    model = tiny_gpt2()
    partition = partition_model(model, targets="all-linear")
    assert "lm_head" not in _names(partition)
    assert partition.excluded["lm_head"] == "tied weight"
    assert sum(1 for _, p in partition.adamw_decay if p is model.transformer.wte.weight) == 1

    model.transformer.h[0].requires_grad_(False)
    frozen = partition_model(model)
    assert not any(name.startswith("transformer.h.0.") for name in _names(frozen))
    assert frozen.excluded["transformer.h.0.attn.c_attn"] == "frozen"


def test_grouped_conv_goes_to_adamw_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    partition = partition_model(model)
    assert _names(partition) == ["1"]
    assert "groups" in partition.excluded["0"]
    assert "not preconditioned (grouped" in partition.summary()


@pytest.mark.parametrize("bad", ["(unclosed", ["missing_layer"]])
def test_bad_targets_are_explained(bad) -> None:
    with pytest.raises(ValueError, match="targets"):
        partition_model(TokenClassifier(), targets=bad)


def test_a_selection_that_takes_nothing_warns_and_a_dropped_named_layer_fails() -> None:
    with pytest.warns(UserWarning, match="selects no layer"):
        partition_model(TokenClassifier(), targets=r"no_such_module")
    with pytest.raises(ValueError, match=r"blocks.0.1 \(skip list\)"):
        partition_model(TokenClassifier(), targets=["blocks.0.1", "head"], skip=[r"blocks\.0"])


def test_multihead_attention_projection_goes_to_adamw_with_its_reason() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    model = nn.Sequential(nn.Linear(4, 8), layer)
    partition = partition_model(model, targets="all-linear")
    assert _names(partition) == ["0", "1.linear1", "1.linear2"]
    assert "MultiheadAttention" in partition.excluded["1.self_attn.out_proj"]
    assert "nn.MultiheadAttention" in partition.summary()
    adamw = {name for name, _ in partition.adamw_decay + partition.adamw_no_decay}
    assert {"1.self_attn.out_proj.weight", "1.self_attn.in_proj_weight"} <= adamw


def test_a_layer_whose_hooks_never_fire_is_named_and_updated_as_by_adamw() -> None:
    import copy

    import torch
    import torch.nn.functional as F

    from hf_fop import FOP

    class Uncalled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # proj's weight is used without calling proj (as nn.MultiheadAttention does).
            return self.head(torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)))

    torch.manual_seed(0)
    model = Uncalled()
    reference = copy.deepcopy(model.proj)
    optimizer = FOP(model, targets="all-linear", lr=1e-2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    reference.weight.grad = model.proj.weight.grad.clone()
    reference.bias.grad = model.proj.bias.grad.clone()
    with pytest.warns(UserWarning, match="'proj' gets gradients but no curvature.*never fire"):
        optimizer.step()
    assert "proj" in optimizer.partition.uncovered and "proj" in optimizer.partition.summary()
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    adamw.step()
    torch.testing.assert_close(model.proj.weight, reference.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.proj.bias, reference.bias, rtol=1e-5, atol=1e-7)


def test_a_new_adapter_class_is_all_a_new_module_type_needs() -> None:
    from hf_fop.layers import ADAPTERS, LinearAdapter, make_adapter

    class ScaledLinear(nn.Linear):
        pass

    class ScaledLinearAdapter(LinearAdapter):
        @classmethod
        def module_types(cls) -> tuple[type[nn.Module], ...]:
            return (ScaledLinear,)

    try:
        assert type(make_adapter(ScaledLinear(3, 2))) is ScaledLinearAdapter
        assert type(make_adapter(nn.Linear(3, 2))) is LinearAdapter
    finally:
        ADAPTERS.remove(ScaledLinearAdapter)
    assert type(make_adapter(ScaledLinear(3, 2))) is LinearAdapter

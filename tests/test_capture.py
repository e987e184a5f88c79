"""The hooks: g1 against a second backward pass, factor normalisation, and the hook pitfalls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from hf_fop import FOP
from hf_fop.factor_sums import active_rows, sampled_rows, second_moment
from tests.helpers import image_data, tiny_vit


class Net(nn.Module):
    """A layer under test between two other layers, so d and a are non-trivial."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv2d":
            self.pre = nn.Conv2d(3, 4, 3, padding=1)
            self.layer = nn.Conv2d(4, 5, 3, stride=2, padding=1)
            self.head = nn.Linear(5 * 4 * 4, 3)
        else:
            self.pre = nn.Linear(6, 8)
            self.layer = Conv1D(7, 8) if kind == "conv1d" else nn.Linear(8, 7)
            self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(torch.tanh(self.pre(x)))
        if self.kind == "conv2d":
            return self.head(torch.tanh(h).flatten(1))
        h = torch.tanh(h)
        return self.head(h.mean(1) if h.dim() == 3 else h)


def _inputs(kind: str, n: int) -> torch.Tensor:
    if kind == "conv2d":
        return torch.randn(n, 3, 8, 8)
    if kind == "tokens":
        return torch.randn(n, 5, 6)
    return torch.randn(n, 6)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _layer_index(optimizer: FOP) -> int:
    return optimizer.layer_names.index("layer")


@pytest.mark.parametrize("kind", ["linear", "tokens", "conv2d", "conv1d"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_g1_equals_gradient_of_first_half(kind: str, micro_batches: int) -> None:
    model = Net("linear" if kind == "tokens" else kind)
    reference = copy.deepcopy(model)
    optimizer = FOP(model, targets="all-linear", gradient_accumulation_steps=micro_batches)
    x, y = _inputs(kind, 8), torch.randint(0, 3, (8,))
    for chunk_x, chunk_y in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        (_loss(model, chunk_x, chunk_y) / micro_batches).backward()
    g1 = optimizer.capture.stats[_layer_index(optimizer)].g1()

    # Second, independent backward pass: the mean loss over the first half of the examples.
    _loss(reference, x[:4], y[:4]).backward()
    expected = FOP(reference, targets="all-linear").layers[_layer_index(optimizer)].grad_matrix()
    torch.testing.assert_close(g1, expected, rtol=1e-5, atol=1e-6)

    # And g_avg is the ordinary batch gradient that autograd accumulated.
    full = copy.deepcopy(reference)
    _loss(full, x, y).backward()
    layer = optimizer.layers[_layer_index(optimizer)]
    torch.testing.assert_close(
        layer.grad_matrix(),
        FOP(full, targets="all-linear").layers[_layer_index(optimizer)].grad_matrix(),
        rtol=1e-5,
        atol=1e-6,
    )


def _factors(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], **settings
) -> tuple[torch.Tensor, torch.Tensor]:
    optimizer = FOP(model, targets="all-linear", **settings)
    for x, y in batches:
        (_loss(model, x, y) / len(batches)).backward()
    stats = optimizer.capture.stats[_layer_index(optimizer)]
    optimizer.remove_hooks()
    return stats.A(), stats.G()


@pytest.mark.parametrize("kind", ["linear", "tokens", "conv2d"])
def test_factors_do_not_change_with_batching(kind: str) -> None:
    model = Net("linear" if kind == "tokens" else kind)
    x, y = _inputs(kind, 8), torch.randint(0, 3, (8,))
    A, G = _factors(model, [(x, y)])
    A2, G2 = _factors(model, list(zip(x.chunk(2), y.chunk(2))), gradient_accumulation_steps=2)
    A_dup, G_dup = _factors(model, [(torch.cat([x, x]), torch.cat([y, y]))])
    for other in (A2, A_dup):
        torch.testing.assert_close(other, A, rtol=1e-5, atol=1e-6)
    for other in (G2, G_dup):
        torch.testing.assert_close(other, G, rtol=1e-5, atol=1e-7)


def test_factors_match_their_definition() -> None:
    model = Net("linear")
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    A, G = _factors(model, [(x, y)])
    a = torch.cat([torch.tanh(model.pre(x)), torch.ones(8, 1)], dim=1).detach()
    out = model.layer(torch.tanh(model.pre(x)))
    out.retain_grad()
    F.cross_entropy(model.head(torch.tanh(out)), y).backward()
    per_example = 8 * out.grad  # d carries the loss's 1/N
    torch.testing.assert_close(A, a.T @ a / 8)
    torch.testing.assert_close(G, per_example.T @ per_example / 8)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_factor_rows_take_every_kth_row_from_an_offset_that_moves_each_step(step: int) -> None:
    """10 rows, A from at most 4: every 3rd row from step mod 3; G from at most 2: every 5th
    from step mod 5, scaled back up by its stride."""
    model = Net("linear")
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    optimizer = FOP(model, targets="all-linear", factor_rows=4, output_factor_rows=2)
    optimizer.fop_group["step"] = step  # what the hooks of the step's backward pass read
    optimizer._arm_capture()
    _loss(model, x, y).backward()
    stats = optimizer.capture.stats[_layer_index(optimizer)]
    A, G = stats.A(), stats.G()
    optimizer.remove_hooks()
    kept_A, kept_G = torch.arange(step % 3, 10, 3), torch.arange(step % 5, 10, 5)
    full = torch.cat([torch.tanh(model.pre(x)), torch.ones(10, 1)], dim=1).detach()
    out = model.layer(torch.tanh(model.pre(x)))
    out.retain_grad()
    F.cross_entropy(model.head(torch.tanh(out)), y).backward()
    d = (10 * out.grad)[kept_G]
    a = full[kept_A]
    torch.testing.assert_close(A, a.T @ a / len(kept_A))
    torch.testing.assert_close(G, 5 * d.T @ d / 10)
    assert not torch.allclose(A, full.T @ full / 10, atol=1e-3)  # fewer rows: another estimate
    every = 10 * out.grad
    assert not torch.allclose(G, every.T @ every / 10, atol=1e-3)


def test_sampled_rows_visit_every_position_of_a_sequence() -> None:
    """8 sequences of 17 positions, at most 4 rows: stride 34 would keep one position of every
    second sequence; 35, coprime with 17, keeps four different positions."""
    rows = torch.arange(8 * 17, dtype=torch.float32)[:, None]
    kept, stride = sampled_rows(rows, 4, 0, period=17)
    assert stride == 35 and kept.flatten().tolist() == [0.0, 35.0, 70.0, 105.0]
    assert sorted(int(p) % 17 for p in kept.flatten()) == [0, 1, 2, 3]
    kept, stride = sampled_rows(rows, 4, 1)  # rows of no sequence: the plain stride
    assert stride == 34 and kept.flatten().tolist() == [1.0, 35.0, 69.0, 103.0]
    for limit in (None, 136):  # no cap, or no more rows than it
        kept, stride = sampled_rows(rows, limit, 5, period=17)
        assert kept is rows and stride == 1


def test_eval_mode_and_no_grad_leave_statistics_untouched() -> None:
    model = Net("linear")
    optimizer = FOP(model, targets="all-linear")
    x = torch.randn(8, 6)
    model.eval()
    model(x).sum()
    model.train()
    with torch.no_grad():
        model(x)
    assert all(s.A_sum is None and s.examples == 0 for s in optimizer.capture.stats)


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(6, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.head(x)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_statistics(use_reentrant: bool) -> None:
    x, y = torch.randn(8, 6, requires_grad=True), torch.randint(0, 3, (8,))
    results = []
    for mode in (None, use_reentrant):
        torch.manual_seed(0)
        model = Checkpointed(mode)
        optimizer = FOP(model)
        _loss(model, x, y).backward()
        results.append(optimizer.capture.stats)
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed.A(), plain.A())
        torch.testing.assert_close(checkpointed.G(), plain.G())
        torch.testing.assert_close(checkpointed.g1(), plain.g1())


class Shared(nn.Module):
    """One Linear called twice in a forward, with an in-place activation after each call."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.layer(self.act(self.layer(x)))))


def test_module_called_twice_and_inplace_activation() -> None:
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.manual_seed(0)
    model = Shared(inplace=True)
    reference = copy.deepcopy(model)
    reference.act.inplace = False
    optimizer = FOP(model, targets=["layer"])
    _loss(model, x, y).backward()
    stats = optimizer.capture.stats[0]

    ref_optimizer = FOP(reference, targets=["layer"])
    _loss(reference, x, y).backward()
    ref_stats = ref_optimizer.capture.stats[0]
    torch.testing.assert_close(stats.G(), ref_stats.G())
    assert stats.A_rows == 16 and stats.examples == 8  # two calls: rows twice, examples once

    first = copy.deepcopy(reference)
    first.zero_grad()
    _loss(first, x[:4], y[:4]).backward()
    expected = torch.cat([first.layer.weight.grad, first.layer.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(stats.g1(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [False, True])
def test_g1_and_g_of_pytorch_transformer_layers_in_either_layout(batch_first: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first
    )
    head = nn.Linear(8, 3)
    model = nn.ModuleDict({"layer": layer, "head": head})

    def loss_of(module: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = module["layer"](x if batch_first else x.transpose(0, 1))
        h = h if batch_first else h.transpose(0, 1)
        return F.cross_entropy(module["head"](h.mean(1)), y)

    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 5, 8), torch.randint(0, 3, (8,))
    optimizer = FOP(model, targets="all-linear", curvature_interval=1)
    loss_of(model, x, y).backward()
    index = optimizer.layer_names.index("layer.linear1")
    stats = optimizer.capture.stats[index]
    assert stats.examples == 8  # examples, not positions
    loss_of(reference, x[:4], y[:4]).backward()
    linear = reference["layer"].linear1
    expected = torch.cat([linear.weight.grad, linear.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(stats.g1(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inactive", ["some", "some, others tiny", "none", "all"])
def test_weighted_rows_give_the_factor_of_the_selected_rows(inactive: str) -> None:
    # The accelerator path (rows weighted, no host sync) against the CPU path (rows selected)
    # and against the definition: E[a a^T] over the rows whose output gradient is not zero,
    # every row when none is. Tiny rows (their squares underflow) are not zero.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=generator)
    d = torch.randn(12, 3, generator=generator)
    zero = {"none": [], "all": list(range(12))}.get(inactive, [1, 4, 5, 11])
    d[zero] = 0.0
    if "tiny" in inactive:
        d[[0, 6]] *= 1e-30
        assert (torch.linalg.vector_norm(d[[0, 6]], dim=1) == 0).all()
    factors = []
    for select in (True, False):
        rows, weights = active_rows(x, d, select=select)
        count = rows.shape[0] if weights is None else weights.sum()
        factors.append(second_moment(rows, True, weights) / count)
    kept = [i for i in range(12) if i not in zero] or list(range(12))
    a = torch.cat([x[kept], torch.ones(len(kept), 1)], dim=1)
    expected = a.T @ a / len(kept)
    for factor in factors:
        torch.testing.assert_close(factor, expected, rtol=1e-6, atol=1e-6)


def test_a_model_in_eval_mode_trains_with_fop_as_in_train_mode() -> None:
    # from_pretrained returns a model in eval mode: a loop that never calls model.train() (or a
    # model without dropout trained so on purpose) still gets FOP's curvature and correction.
    images, labels = image_data(64)
    runs = []
    for training in (True, False):
        torch.manual_seed(0)
        model = tiny_vit()  # no dropout: both modes compute the same forward
        model.train(training)
        optimizer = FOP(model, lr=3e-3)
        for step in range(4):
            batch = slice(16 * step, 16 * (step + 1))
            optimizer.zero_grad()
            F.cross_entropy(model(pixel_values=images[batch]).logits, labels[batch]).backward()
            optimizer.step()
        assert all(
            s["factor_updates"] for s in map(optimizer.curvature.layer_state, optimizer.layer_names)
        )
        assert optimizer.statistics()["rho_abs_max"] > 0  # FOP's correction, not AdamW's step
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

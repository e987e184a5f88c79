"""Hooks that gather, during the user's own backward pass, everything FOP needs per layer.

A forward hook keeps the layer's input and puts a tensor hook on its output (full backward hooks
break on in-place operations after the layer). The tensor hook sees the output gradient d of
every example, so it adds up the Kronecker factor sums and the gradient of the first half of
the step's examples, g1: no second backward pass.

All work happens in the tensor hook, which fires exactly once per forward that takes part in the
backward pass. Forwards in eval mode or under no_grad, and the recomputation inside a
non-reentrant gradient checkpoint (its output never receives a gradient), therefore count zero
times, and a module called twice counts twice, as its weight gradient does.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hf_fop.layers import LayerAdapter


@dataclass
class LayerStatistics:
    """What the hooks gathered for one layer since the last optimizer step."""

    A_sum: Tensor | None = None  # sum over rows of a a^T
    A_rows: int = 0
    G_sum: Tensor | None = None  # sum over rows of d d^T
    first_half_grad: Tensor | None = None  # sum over first-half rows of d a^T
    examples: int = 0  # each micro-batch's examples counted once, however often the layer ran
    first_half_examples: int = 0
    micro_batches: set[int] = field(default_factory=set)

    @property
    def has_factors(self) -> bool:
        return self.A_sum is not None and self.A_rows > 0

    @property
    def has_split(self) -> bool:
        return self.first_half_grad is not None and 0 < self.first_half_examples < self.examples

    def A(self) -> Tensor:
        """E[a a^T] over all rows: independent of batch size and accumulation steps."""
        return self.A_sum / self.A_rows

    def G(self) -> Tensor:
        """E over examples of sum over positions of delta delta^T, delta = N d.

        d carries the loss's 1/N (mean over the step's N examples), so N * sum(d d^T) does not
        change with the batch size, the number of accumulation steps or a duplicated batch.
        """
        return self.G_sum * self.examples

    def g1(self) -> Tensor:
        """Gradient of the mean loss over the first half of the step's examples (out x in')."""
        return self.first_half_grad * (self.examples / self.first_half_examples)


class CurvatureCapture:
    """Registers the hooks on the preconditioned modules and holds their per-step statistics.

    The optimizer sets ``collect_factors`` (curvature steps) and ``collect_first_half`` (FOP
    mode) before each step's backward passes, and calls ``reset`` after the step.

    Lifetime: a layer's input is held from its forward until its output's gradient arrives, and
    dropped then (the graph may live on, e.g. in a ``loss`` variable kept for logging). The hooks
    reach the capture through a weak reference and are removed when it is collected, so they go
    away with the optimizer; a model carries one live capture at a time.
    """

    def __init__(self, root: nn.Module, layers: Sequence[LayerAdapter]) -> None:
        self.layers = list(layers)
        self.collect_factors = True
        self.collect_first_half = True
        # Micro-batches per step: set by the caller, or (None) learned from the previous step.
        self.accumulation_steps: int | None = None
        self._observed_steps = 1
        self.stats = [LayerStatistics() for _ in self.layers]
        # Forwards of the root model are numbered; a micro-batch is a forward whose backward
        # ran, numbered in the order of the backward passes. A forward without a backward (a
        # metric computed in train mode) therefore never counts. g1 is taken over the first
        # half of the step's examples, so batch 8 x 1 and batch 4 x 2 agree.
        self._forwards = 0
        self._micro_batches: dict[int, int] = {}
        # Layer inputs waiting for their output gradient. Each is held by its output's hook (so
        # it dies with a graph that never runs backward) and dropped when the hook fires.
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        previous = _LIVE_CAPTURES.get(root)
        if previous is not None and previous() is not None:
            warnings.warn(
                "this model already had FOP hooks from another optimizer; they are removed and "
                "the new optimizer's hooks replace them (one live FOP per model)",
                stacklevel=3,
            )
            previous().remove()
        _LIVE_CAPTURES[root] = weakref.ref(self)
        self._root = weakref.ref(root)
        self_ref = weakref.ref(self)
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(partial(_call, self_ref, "_count_forward"))
        ]
        for index, layer in enumerate(self.layers):
            self._handles.append(
                layer.module.register_forward_hook(partial(_call, self_ref, "_on_forward", index))
            )
        weakref.finalize(self, _remove_handles, list(self._handles))

    @property
    def pending_inputs(self) -> int:
        """Layer inputs held for a backward that has not run yet."""
        return sum(held.tensor is not None for held in self._held)

    def reset(self) -> None:
        if self._micro_batches:
            self._observed_steps = len(self._micro_batches)
        self.stats = [LayerStatistics() for _ in self.layers]
        self._micro_batches = {}

    def remove(self) -> None:
        _remove_handles(self._handles)
        self._handles.clear()
        root = self._root()
        live = _LIVE_CAPTURES.get(root) if root is not None else None
        if live is not None and live() is self:
            del _LIVE_CAPTURES[root]

    def _count_forward(self, module: nn.Module, args: object) -> None:
        if module.training and torch.is_grad_enabled():
            self._forwards += 1

    def _on_forward(self, index: int, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        held = _Held(inputs[0].detach())
        self._held.add(held)
        self_ref = weakref.ref(self)
        output.register_hook(
            partial(_call, self_ref, "_on_output_grad", index, held, self._forwards)
        )

    def _first_half_count(self, micro_batch: int, examples: int) -> int:
        """How many leading examples of this micro-batch belong to the step's first half."""
        steps = self.accumulation_steps or self._observed_steps
        half = (steps * examples) // 2
        return min(max(half - micro_batch * examples, 0), examples)

    @torch.no_grad()
    def _on_output_grad(self, index: int, held: _Held, forward: int, grad_output: Tensor) -> None:
        layer_input, held.tensor = held.tensor, None
        if layer_input is None:  # a second backward through a retained graph
            return
        micro_batch = self._micro_batches.setdefault(forward, len(self._micro_batches))
        layer, stats = self.layers[index], self.stats[index]
        d = layer.output_grad_rows(grad_output)  # (N, L, out)
        examples = d.shape[0]
        if examples == 0:
            return
        first_half = self._first_half_count(micro_batch, examples)
        if micro_batch not in stats.micro_batches:
            stats.micro_batches.add(micro_batch)
            stats.examples += examples
            stats.first_half_examples += first_half
        if not (self.collect_factors or self.collect_first_half):
            return
        x = layer.input_positions(layer_input).float()  # (N, L, in)
        d = d.float()
        if self.collect_factors:
            x_rows, d_rows = x.flatten(0, 1), d.flatten(0, 1)
            # Positions that take no part in the loss (padding, ignored labels) have an output
            # gradient of exactly zero; they must not dilute A. G and the gradients are
            # unaffected by them anyway. (A layer whose output gradient is zero everywhere,
            # such as LoRA's A before B has moved, keeps every row: no row says more.)
            active = d_rows.ne(0).any(dim=1)
            if bool(active.any()) and not bool(active.all()):
                x_rows, d_rows = x_rows[active], d_rows[active]
            stats.A_sum = _accumulate(stats.A_sum, second_moment(x_rows, layer.has_bias))
            stats.A_rows += x_rows.shape[0]
            stats.G_sum = _accumulate(stats.G_sum, d_rows.T @ d_rows)
        if self.collect_first_half and first_half > 0:
            first_grad = weight_gradient(
                d[:first_half].flatten(0, 1), x[:first_half].flatten(0, 1), layer.has_bias
            )
            stats.first_half_grad = _accumulate(stats.first_half_grad, first_grad)
        elif self.collect_first_half and stats.first_half_grad is None:
            stats.first_half_grad = d.new_zeros(layer.out_dim, layer.in_dim)


# The live capture of each model (weak on both sides: nothing is kept alive, nothing is
# stored on the model, which stays picklable).
_LIVE_CAPTURES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class _Held:
    """A layer input on its way to the output gradient's hook."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor: Tensor | None = tensor


@torch.compiler.disable
def _call(capture_ref: weakref.ref, method: str, *args: object) -> None:
    """Dispatch a hook to the capture while it lives (hooks must not keep it alive).

    Left out of torch.compile: the hooks keep Python state (counters, held inputs) that dynamo
    would guard on, recompiling the model step after step; run eagerly they cost a graph break
    around each preconditioned layer instead."""
    capture = capture_ref()
    if capture is not None:
        getattr(capture, method)(*args)


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def second_moment(x_rows: Tensor, bias: bool) -> Tensor:
    """sum over rows of a a^T with a = [x, 1], built blockwise (no copy of the activations)."""
    xx = x_rows.T @ x_rows
    if not bias:
        return xx
    column = x_rows.sum(0)
    count = x_rows.new_tensor([float(x_rows.shape[0])])
    return torch.cat([torch.cat([xx, column[:, None]], 1), torch.cat([column, count])[None]], 0)


def weight_gradient(d_rows: Tensor, x_rows: Tensor, bias: bool) -> Tensor:
    """sum over rows of d a^T with a = [x, 1]: the (out x in') gradient matrix."""
    grad = d_rows.T @ x_rows
    return torch.cat([grad, d_rows.sum(0)[:, None]], 1) if bias else grad


def _accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)

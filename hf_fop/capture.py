"""Hooks that gather, during the user's own backward pass, everything FOP needs per layer.

A forward hook keeps the layer's input and sees to it that the output gradient d of every
example comes back to the capture, which adds up the Kronecker factor sums and the gradient of
the first half of the step's examples, g1: no second backward pass. For nn.Linear and
transformers' Conv1D the hook routes the output through the layer's own backward
(layer_backward.py), which computes the weight gradient as two half-batch matmuls, the first of
them g1, so g1 costs no extra matmul; for other layers (Conv2d, subclasses with a forward of
their own) a tensor hook on the output computes g1 beside autograd's gradient. Full backward
hooks are not used: they break on in-place operations after the layer.

All work happens when the output's gradient arrives, which is exactly once per forward that
takes part in the backward pass. Forwards under no_grad (evaluation), and the recomputation
inside a non-reentrant gradient checkpoint (its output never receives a gradient), therefore
count zero times, and a module called twice counts twice, as its weight gradient does. A deep
copy of the model carries the hooks but is ignored by them.

Under torch.compile the forward hook takes another road with the same result: it wraps the
output in an identity autograd Function whose backward hands (input, output gradient) to the
capture through an opaque custom op, so dynamo traces the layer without a graph break and the
compiled model has the graphs (and recompiles) it has without FOP.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.node import has_side_effect
from torch.utils.hooks import RemovableHandle

from hf_fop.blocks import Blocking
from hf_fop.bucket_data import factor_layouts
from hf_fop.factor_sums import (
    active_rows,
    output_second_moment,
    sampled_rows,
    second_moment,
    weight_gradient,
)
from hf_fop.gradient_probes import probe_rows
from hf_fop.layer_backward import LayerBackward, ModuleOutput
from hf_fop.layers import LayerAdapter, LinearAdapter


@dataclass
class LayerStatistics:
    """What the hooks gathered for one layer since the last optimizer step."""

    A_sum: Tensor | None = None  # sum over rows of a a^T
    A_rows: Tensor | int = 0  # rows that entered A (a device tensor where they are weighted)
    G_sum: Tensor | None = None  # sum over rows of d d^T
    first_half_grad: Tensor | None = None  # sum over first-half rows of d a^T
    probe_sum: Tensor | None = None  # sum over all rows of (u^T d)(w^T a): gradient_probes.py
    examples: int = 0  # each micro-batch's examples counted once, however often the layer ran
    first_half_examples: int = 0
    micro_batches: set[int] = field(default_factory=set)

    @property
    def has_factors(self) -> bool:
        return self.A_sum is not None

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

    def probe(self) -> Tensor:
        """The random probes of the whole step's gradient as the hooks saw it (PROBES,)."""
        assert self.probe_sum is not None
        return self.probe_sum


class CurvatureCapture:
    """Registers the hooks on the preconditioned modules and holds their per-step statistics.

    The optimizer sets ``collect_factors`` (curvature steps; anything with a truth value, read
    at the backward passes) and ``collect_first_half`` (FOP mode) before each step's backward
    passes, and calls ``reset`` after the step.

    Lifetime: a layer's input is held from its forward until its output's gradient arrives, and
    dropped then (the graph may live on, e.g. in a ``loss`` variable kept for logging). The hooks
    reach the capture through a weak reference and are removed when it is collected, so they go
    away with the optimizer; a model carries one live capture at a time.
    """

    def __init__(
        self, root: nn.Module, layers: Sequence[LayerAdapter], blocking: Blocking | None = None
    ) -> None:
        self.layers = list(layers)
        # How each layer's factors are blocked (blocks.py).
        blocking = blocking or Blocking()
        self.layouts = [factor_layouts(layer, blocking) for layer in self.layers]
        self.collect_factors: Any = True
        self.collect_first_half = True
        # At most about this many rows of a layer call enter A and G (None: all), every k-th
        # from row_offset mod k (factor_sums.sampled_rows); the optimizer sets all three.
        self.factor_rows: int | None = None
        self.output_factor_rows: int | None = None
        self.row_offset = 0
        self._accumulation_steps: int | None = None
        self._observed_steps = 1
        self.stats = [LayerStatistics() for _ in self.layers]
        # Forwards of the root model are numbered; a micro-batch is a forward whose backward
        # ran, numbered in the order of the backward passes. A forward without a backward (a
        # metric computed in train mode) therefore never counts. g1 is taken over the first
        # half of the step's examples, so batch 8 x 1 and batch 4 x 2 agree.
        self._forwards = torch.zeros((), dtype=torch.int64)  # a tensor: compiled code reads it
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
        self._key = next(_CAPTURE_KEYS)
        _CAPTURES_BY_KEY[self._key] = self_ref
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(partial(_count_forward, self._forwards))
        ]
        for index, layer in enumerate(self.layers):
            if not layer.hooked:
                continue
            hook = partial(_forward_hook, self_ref, self._key, self._forwards, index)
            # First among the module's forward hooks: later ones (FSDP2's) see the output
            # that carries FOP's backward.
            self._handles.append(layer.module.register_forward_hook(hook, prepend=True))
        weakref.finalize(self, _release, list(self._handles), self._key)

    @property
    def accumulation_steps(self) -> int | None:
        """Micro-batches per step: set by the caller, or (None) learned from the previous step."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, steps: int | None) -> None:
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(
                f"gradient_accumulation_steps must be an integer >= 1 or None, got {steps!r}"
            )
        self._accumulation_steps = steps

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
        _release(self._handles, self._key)
        root = self._root()
        live = _LIVE_CAPTURES.get(root) if root is not None else None
        if live is not None and live() is self:
            del _LIVE_CAPTURES[root]

    def _on_forward(
        self, index: int, module: nn.Module, inputs: tuple, output: object
    ) -> Tensor | None:
        layer = self.layers[index]
        if module is not layer.module:
            return None  # a deep copy of the model (copy.deepcopy copies hooks): not ours
        if not _takes_part_in_backward(module, inputs, output):
            return None
        held = _Held(inputs[0].detach())
        self._held.add(held)
        self_ref = weakref.ref(self)
        forward = int(self._forwards)
        splits = self.collect_first_half and isinstance(layer, LinearAdapter)
        if splits and layer.runs_plain_forward(inputs[0], output):
            # g1 comes out of the layer's own weight gradient (layer_backward.py); without g1
            # (K-FAC mode) autograd's own backward is faster.
            hidden = ModuleOutput(output.detach())
            return LayerBackward.apply(
                inputs[0], layer.weight, layer.bias, hidden, layer, self_ref, index, forward, held
            )
        output.register_hook(partial(_call, self_ref, "_on_output_grad", index, held, forward))
        return None

    def _first_half_count(self, micro_batch: int, examples: int) -> int:
        """How many leading examples of this micro-batch belong to the step's first half."""
        steps = self.accumulation_steps or self._observed_steps
        half = (steps * examples) // 2
        return min(max(half - micro_batch * examples, 0), examples)

    def _on_output_grad(self, index: int, held: _Held, forward: int, grad_output: Tensor) -> None:
        layer_input, held.tensor = held.tensor, None
        if layer_input is not None:  # else a second backward through a retained graph
            self.record(index, layer_input, forward, grad_output)

    @torch.no_grad()
    def record(self, index: int, layer_input: Tensor, forward: int, grad_output: Tensor) -> None:
        """Add one call's statistics: layer ``index`` saw ``layer_input`` in root forward number
        ``forward`` and ``grad_output`` came back."""
        layer = self.layers[index]
        d = layer.output_grad_rows(grad_output)  # (N, L, out)
        first_half = self.first_half_of(index, forward, d.shape[0])
        needs_input = first_half is not None or (self.collect_factors and d.shape[0] > 0)
        x = layer.input_positions(layer_input) if needs_input else None  # (N, L, in)
        first_grad = None
        if first_half:
            assert x is not None
            d1 = d[:first_half].float().flatten(0, 1)
            first_grad = weight_gradient(d1, x[:first_half].float().flatten(0, 1), layer.has_bias)
        self.add(index, x, d, first_grad)

    def first_half_of(self, index: int, forward: int, examples: int) -> int | None:
        """Count a call's ``examples`` (once per micro-batch, however often the layer ran) and
        say how many leading ones belong to the step's first half (None: g1 is not gathered)."""
        micro_batch = self._micro_batches.setdefault(forward, len(self._micro_batches))
        if examples == 0:
            return None
        stats = self.stats[index]
        first_half = self._first_half_count(micro_batch, examples)
        if micro_batch not in stats.micro_batches:
            stats.micro_batches.add(micro_batch)
            stats.examples += examples
            stats.first_half_examples += first_half
        return first_half if self.collect_first_half else None

    @torch.no_grad()
    def add(
        self,
        index: int,
        x: Tensor | None,
        d: Tensor,
        first_grad: Tensor | None,
        probe: Tensor | None = None,
    ) -> None:
        """Add a counted call's factor sums (on curvature steps; from its input positions ``x``,
        (N, L, in), and output-gradient rows ``d``, (N, L, out)), its part of g1
        (``first_grad``: the fp32 out x in' gradient of its first-half examples, None if none)
        and of the whole gradient's probes (gradient_probes.py; ``probe``: already taken from
        the weight gradient, else from the rows)."""
        layer, stats = self.layers[index], self.stats[index]
        if d.shape[0] == 0:
            return
        if self.collect_factors:
            assert x is not None
            x_rows = x.float().flatten(0, 1)
            d_rows = d.float().flatten(0, 1)
            # On the CPU reading a flag costs nothing: select; elsewhere weight (no host sync).
            x_rows, weights = active_rows(x_rows, d_rows, select=x_rows.device.type == "cpu")
            limit, offset, period = self.factor_rows, self.row_offset, x.shape[1]
            if weights is not None:
                weights, _ = sampled_rows(weights, limit, offset, period)
            x_rows, _ = sampled_rows(x_rows, limit, offset, period)
            d_rows, d_stride = sampled_rows(d_rows, self.output_factor_rows, offset, period)
            layout_A, layout_G = self.layouts[index]
            A_sum = second_moment(x_rows, layer.has_bias, weights, layout_A)
            stats.A_sum = _accumulate(stats.A_sum, A_sum)
            stats.A_rows = stats.A_rows + (x_rows.shape[0] if weights is None else weights.sum())
            G_sum = output_second_moment(d_rows, layout_G)
            stats.G_sum = _accumulate(stats.G_sum, G_sum if d_stride == 1 else G_sum * d_stride)
        if not self.collect_first_half:
            return
        if probe is None:
            assert x is not None
            probe = probe_rows(d.float().flatten(0, 1), x.float().flatten(0, 1), layer.has_bias)
        stats.probe_sum = _accumulate(stats.probe_sum, probe)
        if first_grad is not None:
            stats.first_half_grad = _accumulate(stats.first_half_grad, first_grad)
        elif stats.first_half_grad is None:
            stats.first_half_grad = d.new_zeros(layer.out_dim, layer.in_dim, dtype=torch.float32)


# The live capture of each model (weak on both sides: nothing is kept alive, nothing is
# stored on the model, which stays picklable).
_LIVE_CAPTURES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class _Held:
    """A layer input on its way to the output gradient's hook."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor: Tensor | None = tensor


def _takes_part_in_backward(module: nn.Module, inputs: tuple, output: object) -> bool:
    """A call with gradients on whose output will receive a gradient. Train or eval mode does
    not matter: ``from_pretrained`` returns a model in eval mode, and a loop that trains it so
    (no dropout on purpose, or a forgotten ``model.train()``) still runs backward passes."""
    if not torch.is_grad_enabled():
        return False
    return isinstance(output, Tensor) and output.requires_grad and bool(inputs)


def _count_forward(forwards: Tensor, module: nn.Module, args: object) -> None:
    """The root's forward pre-hook: number the forwards that can take part in a backward (an
    in-place add that torch.compile traces, so the root's call has no graph break)."""
    if torch.is_grad_enabled():
        forwards.add_(1)


def _forward_hook(
    capture_ref: weakref.ref,
    key: int,
    forwards: Tensor,
    index: int,
    module: nn.Module,
    inputs: tuple,
    output: object,
) -> Tensor | None:
    """The forward hook of preconditioned layer ``index``: eager, it puts a hook on the output
    (see ``CurvatureCapture._on_forward``); traced by torch.compile, it returns the output
    wrapped in ``_TapOutputGrad``."""
    if not torch.compiler.is_compiling():
        return _call(capture_ref, "_on_forward", index, module, inputs, output)
    if not _takes_part_in_backward(module, inputs, output):
        return None
    return _TapOutputGrad.apply(output, inputs[0].detach(), forwards.clone(), key, index)


class _TapOutputGrad(torch.autograd.Function):
    """Identity on a layer's output (a copy, so that in-place operations after the layer stay
    legal) whose backward records the layer's statistics: what the tensor hook does in eager
    mode, in a form dynamo traces without a graph break. (Unlike the eager hook, a second
    backward through a retained graph records again.)"""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, output: Tensor, layer_input: Tensor, forward: Tensor, key: int, index: int
    ) -> Tensor:
        ctx.save_for_backward(layer_input, forward)
        ctx.key, ctx.index = key, index
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        layer_input, forward = ctx.saved_tensors
        torch.ops.hf_fop.record_output_grad(grad_output, layer_input, forward, ctx.key, ctx.index)
        return grad_output, None, None, None, None


@torch.library.custom_op("hf_fop::record_output_grad", mutates_args=())
def _record_output_grad(
    grad_output: Tensor, layer_input: Tensor, forward: Tensor, key: int, index: int
) -> None:
    """Opaque to the compiler: hands one layer's backward to the capture registered as
    ``key`` (gone captures are ignored)."""
    capture_ref = _CAPTURES_BY_KEY.get(key)
    capture = capture_ref() if capture_ref is not None else None
    if capture is not None:
        capture.record(index, layer_input, int(forward), grad_output)


@_record_output_grad.register_fake
def _(grad_output: Tensor, layer_input: Tensor, forward: Tensor, key: int, index: int) -> None:
    return None


# It returns nothing: without this the compiler would drop it as dead code.
has_side_effect(torch.ops.hf_fop.record_output_grad.default)

# Captures by a plain int key, which compiled graphs can hold as a constant.
_CAPTURE_KEYS = itertools.count()
_CAPTURES_BY_KEY: dict[int, weakref.ref] = {}


@torch.compiler.disable
def _call(capture_ref: weakref.ref, method: str, *args: object) -> Any:
    """Dispatch an eager hook to the capture while it lives (hooks must not keep it alive).

    Never traced: the capture's Python state (counters, held inputs) would be guarded on and
    recompile the model step after step; compiled code takes ``_TapOutputGrad`` instead."""
    capture = capture_ref()
    return getattr(capture, method)(*args) if capture is not None else None


def _release(handles: list[RemovableHandle], key: int) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
    _CAPTURES_BY_KEY.pop(key, None)


def _accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)

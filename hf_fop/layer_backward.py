"""A Linear-type layer's own backward, with the weight gradient split at the step's first half.

FOP needs g1, the gradient of the first half of the step's examples. Computed beside autograd's
weight gradient it costs one more half-batch matmul per layer (N in' out flops: on a ViT almost
all of what FOP adds to K-FAC). Computed *as part of* the weight gradient it is free: the
gradient is d^T a = d[:k]^T a[:k] + d[k:]^T a[k:], the same flops in two matmuls, and the first
one is g1 (k = the micro-batch's examples in the step's first half, known only when its backward
runs, so the split happens there).

The forward hook (capture.py) routes the layer's output through ``LayerBackward``: its forward
hands back the output the module already computed (no second forward), its backward computes the
input, weight and bias gradients autograd would and gives the capture (a, d, g1). Gradients reach
the parameters through autograd as usual, so DDP's and FSDP2's gradient hooks see nothing new.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch import Tensor

from hf_fop.gradient_probes import probe_matrices
from hf_fop.layers import LinearAdapter


class Recorder(Protocol):
    """What the backward reports to (``CurvatureCapture``)."""

    def first_half_of(self, index: int, forward: int, examples: int) -> int | None: ...

    def add(
        self,
        index: int,
        layer_input: Tensor,
        grad_output: Tensor,
        first_grad: Tensor | None,
        probe: Tensor | None = None,
    ) -> None: ...


class ModuleOutput:
    """The module's output, hidden from autograd's view of the inputs: returned as the Function's
    output, it takes this node as its grad_fn instead of becoming a view of an input (which
    would forbid in-place operations after the layer) or a copy."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor: Tensor | None = tensor


class LayerBackward(torch.autograd.Function):
    """Identity on the module's output; backward = the layer's backward plus FOP's statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        layer_input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: ModuleOutput,
        adapter: LinearAdapter,
        recorder: weakref.ref[Recorder],
        index: int,
        forward: int,
        held: Any,  # capture._Held: the input, until this call's backward has run
    ) -> Tensor:
        ctx.save_for_backward(layer_input, weight)
        ctx.adapter, ctx.recorder, ctx.index, ctx.forward = adapter, recorder, index, forward
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.held = held
        result, output.tensor = output.tensor, None
        return result

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        device_type = grad_output.device.type
        if torch.is_autocast_enabled(device_type):  # a backward called inside autocast
            with torch.autocast(device_type, enabled=False):
                grads = _layer_backward(ctx, grad_output)
        else:
            grads = _layer_backward(ctx, grad_output)
        return (*grads, None, None, None, None, None, None)


def _layer_backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """(input, weight, bias) gradients in the layer's compute dtype (grad_output's: autocast's
    where the forward ran under it), cast back to the tensors' own; FOP's statistics on the way."""
    layer_input, weight = ctx.saved_tensors
    adapter: LinearAdapter = ctx.adapter
    dtype = grad_output.dtype
    x = layer_input.to(dtype)
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = (grad_output @ adapter.weight_matrix(weight).to(dtype)).to(layer_input.dtype)
    x_rows = adapter.input_positions(x)  # (N, L, in)
    d_rows = adapter.output_grad_rows(grad_output)  # (N, L, out)
    recorder = ctx.recorder() if ctx.held.tensor is not None else None  # None: a 2nd backward
    ctx.held.tensor = None
    first_half = None
    if recorder is not None:
        first_half = recorder.first_half_of(ctx.index, ctx.forward, d_rows.shape[0])
    has_bias = ctx.bias_dtype is not None
    grad_weight, grad_bias, g1 = split_weight_gradient(
        adapter, x_rows, d_rows, has_bias, first_half
    )
    if recorder is not None:
        # The factors read the input in its own precision (x may be autocast's).
        positions = x_rows if x is layer_input else adapter.input_positions(layer_input)
        probe = None
        if first_half is not None:  # the gradient's probes come with g1
            probe = probe_matrices(_fresh_matrix(adapter, grad_weight, grad_bias))
        recorder.add(ctx.index, positions, d_rows, g1, probe)
    grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias


def split_weight_gradient(
    adapter: LinearAdapter,
    x_rows: Tensor,
    d_rows: Tensor,
    bias: bool,
    first_half: int | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(weight gradient shaped like the weight, bias gradient, g1 as an fp32 out x in' matrix).

    ``first_half``: how many leading examples of the micro-batch belong to the step's first
    half (None: g1 is not wanted). Where it cuts the micro-batch, the gradient is the sum of the
    two halves' matmuls and g1 is the first; g1 is always a tensor of its own, so accumulating
    into it never touches a gradient autograd keeps."""
    examples = x_rows.shape[0]
    if first_half is None or first_half in (0, examples):
        x_all, d_all = x_rows.flatten(0, 1), d_rows.flatten(0, 1)
        grad_weight = adapter.weight_gradient(d_all, x_all)
        grad_bias = d_all.sum(0) if bias else None
        g1 = _fresh_matrix(adapter, grad_weight, grad_bias) if first_half == examples else None
        return grad_weight, grad_bias, g1
    x1, d1 = x_rows[:first_half].flatten(0, 1), d_rows[:first_half].flatten(0, 1)
    x2, d2 = x_rows[first_half:].flatten(0, 1), d_rows[first_half:].flatten(0, 1)
    first_weight = adapter.weight_gradient(d1, x1)
    first_bias = d1.sum(0) if bias else None
    g1 = _fresh_matrix(adapter, first_weight, first_bias)
    grad_weight = first_weight.add_(adapter.weight_gradient(d2, x2))
    grad_bias = first_bias.add_(d2.sum(0)) if first_bias is not None else None
    return grad_weight, grad_bias, g1


def _fresh_matrix(adapter: LinearAdapter, grad_weight: Tensor, grad_bias: Tensor | None) -> Tensor:
    """A weight-shaped gradient (and the bias's) as a new fp32 out x in' matrix."""
    matrix = adapter.weight_matrix(grad_weight)
    if grad_bias is None:
        return matrix.to(torch.float32, copy=True)
    return torch.cat([matrix, grad_bias[:, None]], 1).float()

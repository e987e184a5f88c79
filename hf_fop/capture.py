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
    """

    def __init__(self, root: nn.Module, layers: Sequence[LayerAdapter]) -> None:
        self.layers = list(layers)
        self.collect_factors = True
        self.collect_first_half = True
        # Micro-batches per step: set by the caller, or (None) learned from the previous step.
        self.accumulation_steps: int | None = None
        self._observed_steps = 1
        self.stats = [LayerStatistics() for _ in self.layers]
        self._micro_batch = -1
        # Counting calls of the root model numbers the micro-batches of a step; g1 is taken over
        # the first half of the step's examples, so batch 8 x 1 and batch 4 x 2 agree.
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(self._count_micro_batch)
        ]
        for index, layer in enumerate(self.layers):
            self._handles.append(
                layer.module.register_forward_hook(partial(self._on_forward, index))
            )

    def reset(self) -> None:
        if self._micro_batch >= 0:
            self._observed_steps = self._micro_batch + 1
        self.stats = [LayerStatistics() for _ in self.layers]
        self._micro_batch = -1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count_micro_batch(self, module: nn.Module, args: object) -> None:
        if module.training and torch.is_grad_enabled():
            self._micro_batch += 1

    def _on_forward(self, index: int, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not (self.collect_factors or self.collect_first_half):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        micro_batch = max(self._micro_batch, 0)
        output.register_hook(partial(self._on_output_grad, index, inputs[0].detach(), micro_batch))

    def _first_half_count(self, micro_batch: int, examples: int) -> int:
        """How many leading examples of this micro-batch belong to the step's first half."""
        steps = self.accumulation_steps or self._observed_steps
        half = (steps * examples) // 2
        return min(max(half - micro_batch * examples, 0), examples)

    @torch.no_grad()
    def _on_output_grad(
        self, index: int, layer_input: Tensor, micro_batch: int, grad_output: Tensor
    ) -> None:
        layer, stats = self.layers[index], self.stats[index]
        x = layer.input_positions(layer_input).float()  # (N, L, in)
        d = layer.output_grad_rows(grad_output).float()  # (N, L, out)
        examples = x.shape[0]
        first_half = self._first_half_count(micro_batch, examples)
        if micro_batch not in stats.micro_batches:
            stats.micro_batches.add(micro_batch)
            stats.examples += examples
            stats.first_half_examples += first_half
        if self.collect_factors:
            x_rows, d_rows = x.flatten(0, 1), d.flatten(0, 1)
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

"""Layer adapters: how a module type turns into the K-FAC view (a, d, gradient matrix).

Every adapter gives, for one call of its module, the layer inputs ``a`` as (N, L, in) and the
output gradients ``d`` as (N, L, out), with N examples and L positions per example (tokens, or
conv output locations). The bias is folded in as a constant input column, so a layer's gradient
is one (out x in') matrix, in' = in + 1. A new module type is one new adapter class that names
the types it takes (``module_types``): defining the class registers it; nothing else changes.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_is(tensor: Tensor) -> Tensor:
    return tensor


# Every adapter class, the most recently defined first (LayerAdapter.__init_subclass__).
ADAPTERS: list[type[LayerAdapter]] = []


class UnsupportedLayerError(ValueError):
    """The module cannot be preconditioned; the message says why (it goes to AdamW)."""


class LayerAdapter(ABC):
    """One preconditioned module: shapes, the (a, d) view of a call, and its gradient matrix."""

    # Whether FOP's hooks capture the layer's calls. A layer without hooks takes its Kronecker
    # factors from its gradient matrix (factor_source="gradient") and has no g1 (its FOP
    # direction is K-FAC's).
    hooked = True
    # Whether the input side's factor is diagonal by construction (one-hot inputs).
    diagonal_input = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # The most derived adapter of a type wins: subclasses go first (Conv1D before Linear).
        ADAPTERS.insert(0, cls)

    @classmethod
    def module_types(cls) -> tuple[type[nn.Module], ...]:
        """The module types this adapter takes (an empty tuple: none of its own)."""
        return ()

    @classmethod
    def for_module(cls, module: nn.Module, sequence_first: bool = False) -> LayerAdapter:
        return cls(module)

    # Read from the module each time: wrappers (accelerate, PEFT) may swap parameter objects.
    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.module, "bias", None)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def in_dim(self) -> int:
        """Size of A: inputs per position, plus one for a folded bias."""
        return self.weight_matrix(self.weight).shape[1] + (self.bias is not None)

    @property
    def out_dim(self) -> int:
        """Size of G."""
        return self.weight_matrix(self.weight).shape[0]

    @abstractmethod
    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The weight (or its gradient) as out x in, without copying where possible."""

    @abstractmethod
    def _unflatten_weight(self, matrix: Tensor) -> Tensor:
        """Inverse of ``weight_matrix``."""

    @abstractmethod
    def input_positions(self, inputs: Tensor) -> Tensor:
        """Layer input as (N, L, in), without the bias column (the capture adds it blockwise,
        so the activations are never copied)."""

    @abstractmethod
    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Gradient w.r.t. the output as (N, L, out)."""

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def grad_matrix(self, whole: Callable[[Tensor], Tensor] = _as_is) -> Tensor | None:
        """The current gradient as one out x in' matrix, or None when the layer got none.

        ``whole``: what makes a gradient whole (the distributor's: under FSDP2 an all-gather,
        which every rank calls for the same layers in the same order)."""
        if self.weight.grad is None:
            return None
        matrix = self.weight_matrix(whole(self.weight.grad))
        if self.bias is not None:
            bias_grad = self.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros(self.bias.shape, device=matrix.device, dtype=matrix.dtype)
            matrix = torch.cat([matrix, whole(bias_grad).reshape(-1, 1)], dim=1)
        return matrix

    def split_matrix(self, matrix: Tensor) -> list[Tensor]:
        """An out x in' matrix as tensors shaped like ``params``."""
        if self.bias is None:
            return [self._unflatten_weight(matrix)]
        return [self._unflatten_weight(matrix[:, :-1]), matrix[:, -1].reshape(self.bias.shape)]


class LinearAdapter(LayerAdapter):
    """nn.Linear (and LoRA's Linear pieces), on inputs of any number of leading dimensions.

    ``sequence_first``: 3-D inputs are (L, N, features), as in PyTorch's transformer layers with
    batch_first=False; examples must be told apart from positions for g1 and G.
    """

    def __init__(self, module: nn.Module, sequence_first: bool = False) -> None:
        super().__init__(module)
        self.sequence_first = sequence_first

    @classmethod
    def module_types(cls) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)

    @classmethod
    def for_module(cls, module: nn.Module, sequence_first: bool = False) -> LayerAdapter:
        return cls(module, sequence_first)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight

    def _unflatten_weight(self, matrix: Tensor) -> Tensor:
        return matrix

    def _examples_first(self, tensor: Tensor) -> Tensor:
        if self.sequence_first and tensor.dim() == 3:
            tensor = tensor.transpose(0, 1)
        return _as_examples(tensor)

    def input_positions(self, inputs: Tensor) -> Tensor:
        return self._examples_first(inputs)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return self._examples_first(grad_output)

    def weight_gradient(self, d_rows: Tensor, x_rows: Tensor) -> Tensor:
        """sum over rows of d x^T, shaped (and laid out) like the weight, as autograd makes it."""
        return d_rows.T @ x_rows

    def runs_plain_forward(self, layer_input: object, output: Tensor) -> bool:
        """``output`` is the module's affine map of ``layer_input`` by its library's own forward
        (subclasses that compute something else keep autograd's backward)."""
        return (
            type(self.module).forward is self._library_forward()
            and isinstance(layer_input, Tensor)
            and output.shape[:-1] == layer_input.shape[:-1]
        )

    def _library_forward(self) -> object:
        return nn.Linear.forward


class Conv1DAdapter(LinearAdapter):
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored transposed (in x out)."""

    @classmethod
    def module_types(cls) -> tuple[type[nn.Module], ...]:
        conv1d = _conv1d_type()
        return () if conv1d is None else (conv1d,)

    @classmethod
    def for_module(cls, module: nn.Module, sequence_first: bool = False) -> LayerAdapter:
        return cls(module)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.T

    def _unflatten_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T

    def weight_gradient(self, d_rows: Tensor, x_rows: Tensor) -> Tensor:
        return x_rows.T @ d_rows

    def _library_forward(self) -> object:
        return getattr(_conv1d_type(), "forward", None)


class Conv2dAdapter(LayerAdapter):
    """nn.Conv2d with groups=1 and zero padding; patches are unfolded into rows."""

    @classmethod
    def module_types(cls) -> tuple[type[nn.Module], ...]:
        return (nn.Conv2d,)

    def __init__(self, module: nn.Module) -> None:
        if module.groups != 1:
            raise UnsupportedLayerError("grouped or depthwise Conv2d (groups != 1)")
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"Conv2d with padding_mode={module.padding_mode!r}")
        if module.padding == "same" and any(s != 1 for s in module.stride):
            raise UnsupportedLayerError("Conv2d with padding='same' and stride != 1")
        super().__init__(module)

    def _padding(self) -> tuple[int, int]:
        module = self.module
        if module.padding == "valid":
            return (0, 0)
        if module.padding == "same":
            # nn.Conv2d pads (dilation * (k - 1)) in total; unfold needs it symmetric.
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in totals):
                raise UnsupportedLayerError("Conv2d with padding='same' and an even kernel")
            return (totals[0] // 2, totals[1] // 2)
        return tuple(module.padding)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _unflatten_weight(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.weight.shape)

    def input_positions(self, inputs: Tensor) -> Tensor:
        module = self.module
        if inputs.dim() == 3:  # unbatched (C, H, W)
            inputs = inputs.unsqueeze(0)
        patches = F.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=self._padding(),
            stride=module.stride,
        )
        return patches.transpose(1, 2)  # (N, L, C * kh * kw)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.flatten(2).transpose(1, 2)  # (N, H' * W', out)


class EmbeddingAdapter(LayerAdapter):
    """nn.Embedding (with ``precondition_embeddings``), as the linear map of one-hot inputs:
    out = the embedding width (G's side), in = the vocabulary (A's side). One-hot inputs make A
    diagonal, so the vocabulary side is kept diagonal however large it is. It has no hooks: a
    tied output layer adds its share to the same gradient, which the gradient's own factors
    (g g^T, the diagonal of g^T g) see whole. Not chosen by ``make_adapter`` (embeddings are
    no ``targets``); the partition takes them when asked."""

    hooked = False
    diagonal_input = True

    def __init__(self, module: nn.Module) -> None:
        if getattr(module, "sparse", False):
            raise UnsupportedLayerError("nn.Embedding with sparse=True (sparse gradients)")
        super().__init__(module)

    @property
    def bias(self) -> None:
        return None

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.T

    def _unflatten_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T

    def input_positions(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError("embeddings are not hooked")

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        raise NotImplementedError("embeddings are not hooked")


def _as_examples(tensor: Tensor) -> Tensor:
    """(N, ..., features) -> (N, L, features); a 1-D input is one example at one position."""
    if tensor.dim() == 1:
        return tensor.reshape(1, 1, -1)
    positions = math.prod(tensor.shape[1:-1])
    return tensor.reshape(tensor.shape[0], positions, tensor.shape[-1])


def _conv1d_type() -> type[nn.Module] | None:
    # A model holding transformers' Conv1D has imported it already; never import transformers
    # here (the core optimizer does not depend on it).
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def make_adapter(module: nn.Module, sequence_first: bool = False) -> LayerAdapter | None:
    """The adapter for a supported module, None for other types.

    Raises UnsupportedLayerError for a supported type in a configuration that is not (the caller
    sends it to AdamW and reports why).
    """
    for adapter in ADAPTERS:
        types = adapter.module_types()
        if types and isinstance(module, types):
            return adapter.for_module(module, sequence_first)
    return None

"""What a bucket's step takes and gives: one step's averaged statistics of a bucket's layers,
the directions it computes, and the layout of a layer's factors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from hf_fop.blocks import Blocking, BlockLayout
from hf_fop.curvature import EigenPreconditioner
from hf_fop.fop_math import FOPDirection
from hf_fop.gradient_probes import PROBES
from hf_fop.layers import LayerAdapter


class BucketRows(Protocol):
    """What this module needs of a bucket (bucket.ShapeBucket): which layers its rows hold and
    how their factors are laid out. A protocol, so the data does not import its producer."""

    indices: list[int]
    layout_A: BlockLayout
    layout_G: BlockLayout

    def __len__(self) -> int: ...


# The per-layer FOP scalars a step reports besides its direction.
SCALARS = ("beta", "eta", "rho", "kfac_cosine")


def factor_layouts(layer: LayerAdapter, blocking: Blocking) -> tuple[BlockLayout, BlockLayout]:
    """How the layer's A and G sides are laid out (blocks.py); a diagonal input side (an
    embedding's vocabulary) in blocks of one."""
    if layer.diagonal_input:
        layout_A = BlockLayout.diagonal(layer.in_dim)
    else:
        layout_A = blocking.side(layer.in_dim)
    return layout_A, blocking.side(layer.out_dim)


def factors_from_gradient(layer: LayerAdapter, factor_source: str) -> bool:
    """Whether the layer's Kronecker factors come from its gradient matrix (g^T g, g g^T)
    instead of the hooks' A and G: asked for, or a layer without hooks (an embedding)."""
    return factor_source == "gradient" or not layer.hooked


def layer_state_shapes(
    layout_A: BlockLayout, layout_G: BlockLayout, graft: str, curvature: str
) -> dict[str, tuple[int, ...]]:
    """Every tensor a preconditioned layer keeps, by name, with its shape: the one declaration
    that allocation (bucket.py), checkpoints (save, load, shape checks) and the plan's byte
    counts read. Adding a tensor to a layer's state means adding it here (and using it)."""
    matrix = (layout_G.dim, layout_A.dim)
    shapes = {
        "A": layout_A.factor_shape,
        "G": layout_G.factor_shape,
        **EigenPreconditioner.state_shapes(layout_A, layout_G),  # the Kronecker eigenbasis
        "gradient_exp_avg": matrix,  # the momentum
    }
    if graft != "none":  # AdamW's second moment, for the step size
        shapes["graft_exp_avg_sq"] = matrix
    if graft == "output":  # 1: the weights were all zero when FOP was built (graft_trust)
        shapes["starts_from_zero"] = ()
    if curvature == "eigen_corrected":  # the metric: the rotated gradient's second moment
        shapes["rotated_second_moment"] = (layout_G.padded, layout_A.padded)
    return shapes


def statistic_shape(kind: str, layout_A: BlockLayout, layout_G: BlockLayout) -> tuple[int, ...]:
    """The shape of one layer's statistic of ``kind`` ("A", "G", "g1" or "probe")."""
    shapes = {
        "A": layout_A.factor_shape,
        "G": layout_G.factor_shape,
        "g1": (layout_G.dim, layout_A.dim),
        "probe": (PROBES,),
    }
    return shapes[kind]


@dataclass
class BucketStatistics:
    """One step's averaged statistics of a bucket (zeros in the rows a layer lacks)."""

    A: Tensor | None
    G: Tensor | None
    has_factors: list[bool]
    g1: Tensor | None
    has_split: list[bool]
    # The hooks' probes of each layer's whole gradient (gradient_probes.py), beside g1.
    probe: Tensor | None = None

    @classmethod
    def empty(cls, bucket: BucketRows) -> BucketStatistics:
        return cls(None, None, [False] * len(bucket), None, [False] * len(bucket))

    @classmethod
    def stacked(
        cls, bucket: BucketRows, per_kind: dict[str, list[Tensor | None]], like: Tensor
    ) -> BucketStatistics:
        """The bucket's rows of every layer's statistics (``per_kind``: kind -> per layer)."""
        gathered = {kind: [values[i] for i in bucket.indices] for kind, values in per_kind.items()}
        stacked = {
            kind: _stack(values, statistic_shape(kind, bucket.layout_A, bucket.layout_G), like)
            for kind, values in gathered.items()
        }
        absent = [False] * len(bucket)
        present = {kind: [t is not None for t in values] for kind, values in gathered.items()}
        return cls(
            stacked.get("A"),
            stacked.get("G"),
            present.get("A", absent),
            stacked.get("g1"),
            present.get("g1", absent),
            stacked.get("probe"),
        )

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.A, self.G, self.g1, self.probe) if t is not None]


@dataclass
class BucketStep:
    """The directions a bucket's layers take this step (before the learning rate)."""

    bucket: BucketRows
    rows: list[int]  # rows of the bucket that have gradients, in order
    direction: Tensor  # (layers, out, in); zeros in the rows without a gradient
    g_avg: Tensor  # (layers, out, in); zeros likewise
    scalars: FOPDirection  # direction unused; beta, eta, rho, kfac_cosine per row
    waiting: list[int]  # rows that took AdamW's direction: no decomposition yet

    def directions(self) -> list[tuple[int, Tensor]]:
        """(layer index, direction) of every row with a gradient."""
        return [(self.bucket.indices[row], self.direction[row]) for row in self.rows]

    def scalar(self, name: str) -> Tensor:
        """One FOP scalar of the rows with a gradient."""
        values = getattr(self.scalars, name)
        return values if len(self.rows) == len(values) else values[self.rows]


def step_statistics(steps: list[BucketStep]) -> dict[str, Tensor]:
    """Per-layer FOP scalars of a step, one tensor each (kept on the device until read)."""
    stacked = {name: torch.cat([s.scalar(name) for s in steps]) for name in SCALARS}
    return {**stacked, "rho_abs": stacked["rho"].abs()}


def _stack(tensors: list[Tensor | None], shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.stack([t if t is not None else like.new_zeros(shape) for t in tensors])

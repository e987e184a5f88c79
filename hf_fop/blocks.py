"""Block-diagonal Kronecker factors (pure functions).

A factor side longer than ``block_size`` is split into ``count`` equal diagonal blocks, so the
factor is stored as (count, size, size) instead of (dim, dim): for a side of 8192 and blocks of
1024, 8 M numbers instead of 67 M, and a refresh decomposes eight 1024 x 1024 blocks (batched)
instead of one 8192 x 8192 matrix. F = blockdiag(A) (x) blockdiag(G) is still a Kronecker
product of symmetric factors, so its eigenbasis is block-diagonal and everything FOP computes
in that basis is unchanged: only the rotations in and out apply block by block.

Sides that the block size does not divide are padded with zero coordinates up to
count * size (fewer than ``count`` of them). A zero coordinate has no gradient and no factor
entry, and every damped product of the padded factor restricted to the real coordinates is
that of the unpadded block-diagonal factor. The trace of a block-diagonal factor equals that of
the whole one, so the relative damping (by mean eigenvalue) is the same whether or not a side
is blocked, up to the padding: the mean is over count * size coordinates instead of dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class BlockLayout:
    """How one factor side of ``dim`` coordinates is split: ``count`` blocks of ``size``."""

    dim: int
    count: int = 1
    size: int = 0

    @classmethod
    def for_side(cls, dim: int, block_size: int | None) -> BlockLayout:
        """One block when the side fits in ``block_size`` (or blocking is off), else the fewest
        equal blocks no larger than it."""
        if block_size is None or dim <= block_size:
            return cls(dim, 1, dim)
        count = math.ceil(dim / block_size)
        return cls(dim, count, math.ceil(dim / count))

    @classmethod
    def diagonal(cls, dim: int) -> BlockLayout:
        """Blocks of one coordinate: the factor's diagonal alone (an embedding's input side,
        whose one-hot inputs make A diagonal; its eigenbasis is the identity)."""
        return cls(dim, dim, 1)

    @property
    def is_diagonal(self) -> bool:
        return self.size == 1 and self.count > 1

    @property
    def blocked(self) -> bool:
        return self.count > 1

    @property
    def padded(self) -> int:
        """Coordinates including the zero padding."""
        return self.count * self.size

    @property
    def factor_shape(self) -> tuple[int, ...]:
        return (self.count, self.size, self.size) if self.blocked else (self.dim, self.dim)

    @property
    def factor_numel(self) -> int:
        return math.prod(self.factor_shape)


@dataclass(frozen=True)
class Blocking:
    """How every factor side is laid out: sides longer than ``diagonal_above`` keep their
    diagonal alone (that side's eigenbasis is the identity: the layer is preconditioned by its
    other factor, as SOAP leaves long sides unrotated); the others are split into blocks no
    larger than ``block_size`` (None: whole)."""

    block_size: int | None = None
    diagonal_above: int | None = None

    def side(self, dim: int) -> BlockLayout:
        if self.diagonal_above is not None and dim > self.diagonal_above:
            return BlockLayout.diagonal(dim)
        return BlockLayout.for_side(dim, self.block_size)


def pad_matrix(matrix: Tensor, rows: BlockLayout, cols: BlockLayout) -> Tensor:
    """``matrix`` (..., rows.dim, cols.dim) with zero padding to (..., rows.padded, cols.padded)."""
    extra_rows, extra_cols = rows.padded - rows.dim, cols.padded - cols.dim
    if not (extra_rows or extra_cols):
        return matrix
    return F.pad(matrix, (0, extra_cols, 0, extra_rows))


def unpad_matrix(matrix: Tensor, rows: BlockLayout, cols: BlockLayout) -> Tensor:
    """The real coordinates of a padded (..., rows.padded, cols.padded) matrix."""
    if matrix.shape[-2:] == (rows.dim, cols.dim):
        return matrix
    return matrix[..., : rows.dim, : cols.dim]


def block_gram(rows: Tensor, layout: BlockLayout, weights: Tensor | None = None) -> Tensor:
    """The diagonal blocks of sum_n w_n r_n r_n^T for rows (n, dim): (count, size, size)."""
    padded = F.pad(rows, (0, layout.padded - layout.dim)) if layout.padded > layout.dim else rows
    if layout.is_diagonal:  # blocks of one: a sum of squares per coordinate
        squares = padded.square() if weights is None else padded.square() * weights[:, None]
        return squares.sum(0)[:, None, None]
    split = padded.reshape(rows.shape[0], layout.count, layout.size).transpose(0, 1)  # (k, n, b)
    weighted = split if weights is None else split * weights[None, :, None]
    return weighted.mT @ split


def is_blocked(factor: Tensor, matrix: Tensor) -> bool:
    """A factor stack (..., count, size, size) beside gradient matrices (..., out, in) has
    one dimension more than the plain (..., d, d) one."""
    return factor.dim() == matrix.dim() + 1


def left_multiply(factor: Tensor, matrix: Tensor) -> Tensor:
    """blockdiag(factor) @ matrix, for (..., d, d) or block-diagonal (..., k, b, b) factors."""
    if not is_blocked(factor, matrix):
        return factor @ matrix
    if factor.shape[-1] == 1:  # diagonal: scale the rows
        return factor[..., 0] * matrix
    count, size = factor.shape[-3], factor.shape[-1]
    split = matrix.reshape(*matrix.shape[:-2], count, size, matrix.shape[-1])
    return (factor @ split).reshape(matrix.shape)


def right_multiply(matrix: Tensor, factor: Tensor) -> Tensor:
    """matrix @ blockdiag(factor), for (..., d, d) or block-diagonal (..., k, b, b) factors."""
    if not is_blocked(factor, matrix):
        return matrix @ factor
    if factor.shape[-1] == 1:  # diagonal: scale the columns
        return matrix * factor[..., 0].mT
    count, size = factor.shape[-3], factor.shape[-1]
    split = matrix.reshape(*matrix.shape[:-1], count, size).transpose(-3, -2)  # (..., k, out, b)
    return (split @ factor).transpose(-3, -2).reshape(matrix.shape)

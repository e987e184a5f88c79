"""The layers of one shape, stacked: running factors, decompositions and moments as
(layers, ...) tensors, so folding, decomposing and preconditioning them are batched calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_fop.curvature import PRECONDITIONERS
from hf_fop.layers import LayerAdapter


class ShapeBucket:
    """The layers of one (in, out) shape on one device: stacked factors and decompositions."""

    def __init__(self, indices: list[int], names: list[str], layer: LayerAdapter, method: str):
        self.indices, self.names = indices, names
        self.in_dim, self.out_dim = layer.in_dim, layer.out_dim
        self.method = PRECONDITIONERS[method]
        count, device = len(indices), layer.weight.device
        self.A = torch.zeros(count, self.in_dim, self.in_dim, device=device)
        self.G = torch.zeros(count, self.out_dim, self.out_dim, device=device)
        self.factor_updates = [0] * count
        shapes = self.method.state_shapes(self.in_dim, self.out_dim)
        self.decomposition = {
            key: torch.zeros(count, *shape, device=device) for key, shape in shapes.items()
        }
        self.ready = [False] * count  # a decomposition exists
        # AdamW's second moment per layer, for grafting (and for layers without curvature yet).
        self.graft_exp_avg_sq: Tensor | None = None
        self._cache: tuple[tuple[float, str], Any] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def preconditioner(self, rows: list[int] | None, damping: float, damping_mode: str) -> Any:
        """The damped preconditioner of ``rows`` (None: every layer, cached between refreshes)."""
        if rows is not None:
            sliced = {key: value[rows] for key, value in self.decomposition.items()}
            return self.method.from_state(sliced, damping, damping_mode)
        if self._cache is None or self._cache[0] != (damping, damping_mode):
            built = self.method.from_state(self.decomposition, damping, damping_mode)
            self._cache = ((damping, damping_mode), built)
        return self._cache[1]

    def fold(self, A: Tensor, G: Tensor, present: list[bool], decay: float, ok: Tensor) -> None:
        """Fold this step's estimates into the running factors (see update_running_factor).

        ``ok`` (a device flag) false leaves the factors exactly as they were (a lerp toward
        themselves); the host's counts are put back by the optimizer once it reads the flag."""
        weights = [
            (1.0 if done == 0 else max(1.0 - decay, 1.0 / (done + 1))) if has else 0.0
            for has, done in zip(present, self.factor_updates)
        ]
        A, G = torch.where(ok, A, self.A), torch.where(ok, G, self.G)
        if len(set(weights)) == 1:
            self.A.lerp_(A, weights[0])
            self.G.lerp_(G, weights[0])
        else:
            weight = torch.tensor(weights, device=self.A.device)[:, None, None]
            self.A.lerp_(A, weight)
            self.G.lerp_(G, weight)
        self.factor_updates = [done + has for done, has in zip(self.factor_updates, present)]

    def decompose(self, rows: list[int], damping: float, damping_mode: str, ok: Tensor) -> None:
        """Decompose the running factors of ``rows``; kept only where the device flag ``ok``
        is true (the old decomposition stays otherwise)."""
        everything = rows == list(range(len(self)))
        A, G = (self.A, self.G) if everything else (self.A[rows], self.G[rows])
        computed = self.method.from_factors(A, G, damping, damping_mode).state()
        for key, value in computed.items():
            if everything:
                self.decomposition[key] = torch.where(ok, value, self.decomposition[key])
            else:
                self.decomposition[key][rows] = torch.where(
                    ok, value, self.decomposition[key][rows]
                )
        self.mark_ready(rows)

    def mark_ready(self, rows: list[int]) -> None:
        for row in rows:
            self.ready[row] = True
        self._cache = None

    def second_moment(self) -> Tensor:
        """AdamW's second moment of each layer's gradient matrix (created at first use)."""
        if self.graft_exp_avg_sq is None:
            self.graft_exp_avg_sq = torch.zeros(
                len(self), self.out_dim, self.in_dim, device=self.A.device
            )
        return self.graft_exp_avg_sq

"""The layers of one shape, stacked, and their step: running factors, decompositions and
moments as (layers, ...) tensors, so folding, decomposing and preconditioning them are batched
calls, and a bucket turns its layers' gradients into directions on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hf_fop.config import FOPConfig
from hf_fop.curvature import (
    PRECONDITIONERS,
    EigenPreconditioner,
    KroneckerPreconditioner,
    running_factor_weight,
)
from hf_fop.eigen_corrected import (
    EigenCorrectedPreconditioner,
    carry_second_moment,
    corrected_metric,
    power_qr_refresh,
    update_rotated_second_moment,
)
from hf_fop.fop_math import FOPDirection
from hf_fop.grafting import adam_direction, adam_step_norm, graft
from hf_fop.layers import LayerAdapter

# The per-layer FOP scalars a step reports besides its direction.
SCALARS = ("beta", "eta", "rho", "kfac_cosine")


class ShapeBucket:
    """The layers of one (in, out) shape on one device: stacked factors and decompositions."""

    def __init__(
        self, indices: list[int], names: list[str], layer: LayerAdapter, config: FOPConfig
    ) -> None:
        self.indices, self.names = indices, names
        self.in_dim, self.out_dim = layer.in_dim, layer.out_dim
        self.method = PRECONDITIONERS[config.method]
        self.basis_refresh = config.basis_refresh
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
        # curvature="eigen_corrected": the rotated gradient's second moment and its count.
        self.rotated_second_moment: Tensor | None = None
        self.moment_updates = [0] * count
        if config.curvature == "eigen_corrected":
            self.rotated_second_moment = torch.zeros(
                count, self.out_dim, self.in_dim, device=device
            )
        self._cache: tuple[tuple[float, str], KroneckerPreconditioner] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def preconditioner(
        self, rows: list[int] | None, damping: float, damping_mode: str
    ) -> KroneckerPreconditioner:
        """The damped preconditioner of ``rows`` (None: every layer, cached between refreshes)."""
        if rows is not None:
            sliced = {key: value[rows] for key, value in self.decomposition.items()}
            return self.method.from_state(sliced, damping, damping_mode)
        if self._cache is None or self._cache[0] != (damping, damping_mode):
            built = self.method.from_state(self.decomposition, damping, damping_mode)
            self._cache = ((damping, damping_mode), built)
        return self._cache[1]

    def fold(self, A: Tensor, G: Tensor, present: list[bool], decay: float, ok: Tensor) -> None:
        """Fold this step's estimates into the running factors (see running_factor_weight).

        ``ok`` (a device flag) false leaves the factors exactly as they were (a lerp toward
        themselves); the host's counts are put back by the optimizer once it reads the flag."""
        weights = [
            running_factor_weight(done, decay) if has else 0.0
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
        if self.basis_refresh == "qr" and all(self.ready[row] for row in rows):
            old = (
                self.decomposition
                if everything
                else {key: value[rows] for key, value in self.decomposition.items()}
            )
            eigvals_A, eigvecs_A = power_qr_refresh(A, old["eigvecs_A"])
            eigvals_G, eigvecs_G = power_qr_refresh(G, old["eigvecs_G"])
            computed = {
                "eigvals_A": eigvals_A,
                "eigvecs_A": eigvecs_A,
                "eigvals_G": eigvals_G,
                "eigvecs_G": eigvecs_G,
            }
        else:  # the first decomposition is always a full one
            computed = self.method.from_factors(A, G, damping, damping_mode).state()
        for key, value in computed.items():
            if everything:
                self.decomposition[key] = torch.where(ok, value, self.decomposition[key])
            else:
                self.decomposition[key][rows] = torch.where(
                    ok, value, self.decomposition[key][rows]
                )
        self.mark_ready(rows)

    def moment_bases(self, rows: list[int]) -> tuple[Tensor, Tensor] | None:
        """The eigenbases the rotated second moment of ``rows`` is expressed in (copies), to
        carry it into the bases a refresh brings; None when there is nothing to carry."""
        if self.rotated_second_moment is None or not any(self.ready[row] for row in rows):
            return None
        return self.decomposition["eigvecs_A"][rows], self.decomposition["eigvecs_G"][rows]

    def carry_moment(self, rows: list[int], old: tuple[Tensor, Tensor], ok: Tensor) -> None:
        """Express the rotated second moment of ``rows`` in their refreshed bases (rows
        without a decomposition before hold zeros, which stay zeros)."""
        assert self.rotated_second_moment is not None
        new_A, new_G = self.decomposition["eigvecs_A"][rows], self.decomposition["eigvecs_G"][rows]
        moment = self.rotated_second_moment[rows]
        carried = carry_second_moment(moment, *old, new_A, new_G)
        self.rotated_second_moment[rows] = torch.where(ok, carried, moment)

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

    def invalidate(self) -> None:
        """Forget the cached preconditioner (the decomposition was written from outside)."""
        self._cache = None

    def step(
        self,
        stats: BucketStatistics,
        grads: list[Tensor | None],
        damping: float,
        beta2: float,
        config: FOPConfig,
        step: int,
        ok: Tensor,
    ) -> BucketStep | None:
        """The preconditioned (and, with grafting, AdamW-sized) direction of every layer of
        the bucket with a gradient; None when no layer has one.

        ``damping`` and ``beta2`` are the FOP group's; ``step`` is 1-based (the bias
        corrections of the grafting norm). Layers without a
        decomposition yet take AdamW's direction. Where ``ok`` (the step's finiteness flag) is
        false the moments stay as they were and the directions are zeros, so nothing
        downstream sees a NaN.
        """
        rows = [row for row, grad in enumerate(grads) if grad is not None]
        if not rows:
            return None
        g_avg = torch.stack([grads[row] for row in rows]).float()
        ready = [j for j, row in enumerate(rows) if self.ready[row]]
        waiting = [j for j, row in enumerate(rows) if not self.ready[row]]
        direction = torch.empty_like(g_avg)
        zeros = g_avg.new_zeros(len(rows))
        scalars = FOPDirection(direction, zeros, zeros + 1, zeros.clone(), zeros + 1)
        needs_adam = config.graft == "adamw" or bool(waiting)
        exp_avg_sq = self.second_moment() if needs_adam else None
        if ready:
            every = len(ready) == len(self)
            picked = [rows[j] for j in ready]
            preconditioner = self.preconditioner(
                None if every else picked, damping, config.damping_mode
            )
            g = g_avg if every else g_avg[ready]
            # The eigen-corrected metric needs g in the eigenbasis for its second moment; the
            # direction then starts from that rotation instead of making its own.
            rotated: dict[str, Tensor] = {}
            if self.rotated_second_moment is not None:
                preconditioner, rotated["rotated_avg"] = self._corrected(
                    preconditioner, g, picked, damping, config, ok
                )
            if stats.g1 is not None:
                # A layer without two halves this step has g_diff = 0: its FOP direction is
                # exactly K-FAC's.
                g1 = stats.g1 if every else stats.g1[picked]
                if not all(stats.has_split[row] for row in picked):
                    split = [stats.has_split[row] for row in picked]
                    mask = torch.tensor(split, device=g.device)[:, None, None]
                    g1 = torch.where(mask, g1, g)
                result = preconditioner.fop(g, 2 * (g1 - g), config.fop_zero_tol, **rotated)
            else:
                result = preconditioner.kfac(g, **rotated)
            chosen = result.direction
            if config.graft == "adamw":
                v = exp_avg_sq if every else exp_avg_sq[picked]
                chosen = graft(chosen, adam_step_norm(g, v, beta2, config.adamw_eps, step, ok))
                if not every:
                    exp_avg_sq[picked] = v
            if every:
                direction = chosen
                scalars = result._replace(direction=direction)
            else:
                direction[ready] = chosen
                for name in SCALARS:
                    getattr(scalars, name)[ready] = getattr(result, name)
        if waiting:
            picked = [rows[j] for j in waiting]
            v = exp_avg_sq[picked]
            direction[waiting] = adam_direction(
                g_avg[waiting], v, beta2, config.adamw_eps, step, ok
            )
            exp_avg_sq[picked] = v
        direction = torch.where(ok, direction, 0.0)
        waiting_rows = [rows[j] for j in waiting]
        return BucketStep(
            self, rows, direction, g_avg, scalars._replace(direction=direction), waiting_rows
        )

    def _corrected(
        self,
        kronecker: KroneckerPreconditioner,
        g: Tensor,
        rows: list[int],
        damping: float,
        config: FOPConfig,
        ok: Tensor,
    ) -> tuple[EigenCorrectedPreconditioner, Tensor]:
        """The eigen-corrected metric of ``rows`` after this step's gradient ``g`` went into
        their rotated second moment (only where ``ok``), and ``g`` in their eigenbasis."""
        assert isinstance(kronecker, EigenPreconditioner)  # config: method="eigen"
        basis_A, basis_G = kronecker.eigvecs_A, kronecker.eigvecs_G
        every = len(rows) == len(self)
        moment = self.rotated_second_moment if every else self.rotated_second_moment[rows]
        decay = config.second_moment_decay
        rotated = kronecker.rotate(g)
        update_rotated_second_moment(moment, rotated, decay, ok)
        if not every:
            self.rotated_second_moment[rows] = moment
        for row in rows:
            self.moment_updates[row] += 1
        updates = torch.tensor([self.moment_updates[r] for r in rows], device=g.device)
        metric = corrected_metric(
            moment, updates[:, None, None], decay, config.exponent, damping, config.damping_mode
        )
        return EigenCorrectedPreconditioner(basis_A, basis_G, metric), rotated


def statistic_shape(kind: str, in_dim: int, out_dim: int) -> tuple[int, int]:
    return {"A": (in_dim, in_dim), "G": (out_dim, out_dim), "g1": (out_dim, in_dim)}[kind]


@dataclass
class BucketStatistics:
    """One step's averaged statistics of a bucket (zeros in the rows a layer lacks)."""

    A: Tensor | None
    G: Tensor | None
    has_factors: list[bool]
    g1: Tensor | None
    has_split: list[bool]

    @classmethod
    def empty(cls, bucket: ShapeBucket) -> BucketStatistics:
        return cls(None, None, [False] * len(bucket), None, [False] * len(bucket))

    @classmethod
    def stacked(
        cls, bucket: ShapeBucket, per_kind: dict[str, list[Tensor | None]], like: Tensor
    ) -> BucketStatistics:
        """The bucket's rows of every layer's statistics (``per_kind``: kind -> per layer)."""
        gathered = {kind: [values[i] for i in bucket.indices] for kind, values in per_kind.items()}
        stacked = {
            kind: _stack(values, statistic_shape(kind, bucket.in_dim, bucket.out_dim), like)
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
        )

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.A, self.G, self.g1) if t is not None]


@dataclass
class BucketStep:
    """The directions a bucket's layers take this step (before the learning rate)."""

    bucket: ShapeBucket
    rows: list[int]  # rows of the bucket that have gradients, in order
    direction: Tensor  # (len(rows), out, in)
    g_avg: Tensor
    scalars: FOPDirection  # direction unused; beta, eta, rho, kfac_cosine per row
    waiting: list[int]  # rows that took AdamW's direction: no decomposition yet


def step_statistics(steps: list[BucketStep]) -> dict[str, Tensor]:
    """Per-layer FOP scalars of a step, one tensor each (kept on the device until read)."""
    stacked = {name: torch.cat([getattr(s.scalars, name) for s in steps]) for name in SCALARS}
    return {**stacked, "rho_abs": stacked["rho"].abs()}


def _stack(tensors: list[Tensor | None], shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.stack([t if t is not None else like.new_zeros(shape) for t in tensors])

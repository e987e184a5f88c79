"""The layers of one shape, stacked, and their step: running factors, decompositions and
moments as (layers, ...) tensors, so folding, decomposing and preconditioning them are batched
calls, and a bucket turns its layers' gradients into directions on its own."""

from __future__ import annotations

import torch
from torch import Tensor

from hf_fop.blocks import BlockLayout, pad_matrix, unpad_matrix
from hf_fop.bucket_data import (
    SCALARS,
    BucketStatistics,
    BucketStep,
    factor_layouts,
    factors_from_gradient,
    layer_state_shapes,
)
from hf_fop.config import FOPConfig
from hf_fop.curvature import EigenPreconditioner, flat_eigenvalues, running_factor_weight
from hf_fop.eigen_corrected import (
    EigenCorrectedPreconditioner,
    carry_second_moment,
    corrected_metric,
    power_qr_refresh,
    update_rotated_second_moment,
)
from hf_fop.factor_sums import gradient_factors
from hf_fop.fop_math import FOPDirection
from hf_fop.gradient_probes import gradient_factor, probe_matrices
from hf_fop.grafting import adam_direction, graft, graft_output, layer_graft
from hf_fop.layers import LayerAdapter


class ShapeBucket:
    """The layers of one (in, out) shape on one device: stacked factors and decompositions."""

    def __init__(
        self, indices: list[int], names: list[str], layer: LayerAdapter, config: FOPConfig
    ) -> None:
        self.indices, self.names = indices, names
        self.in_dim, self.out_dim = layer.in_dim, layer.out_dim
        self.layout_A, self.layout_G = factor_layouts(layer, config.blocking)
        self.basis_refresh = config.basis_refresh
        # Kronecker factors of the gradient matrix (g^T g, g g^T) instead of the hooks' A and G.
        self.factors_from_gradient = factors_from_gradient(layer, config.factor_source)
        self.graft = layer_graft(config.graft, self.factors_from_gradient)
        count, device = len(indices), layer.weight.device
        # Every per-layer tensor, stacked, as layer_state_shapes declares them.
        self.shapes = layer_state_shapes(self.layout_A, self.layout_G, self.graft, config.curvature)
        state = {
            key: torch.zeros(count, *shape, device=device) for key, shape in self.shapes.items()
        }
        self.A, self.G = state.pop("A"), state.pop("G")
        self.decomposition = {key: state.pop(key) for key in EigenPreconditioner.STATE_KEYS}
        # The momentum: the moving average of each layer's gradient matrix.
        self.gradient_exp_avg = state.pop("gradient_exp_avg")
        # AdamW's second moment per layer, for grafting (created at first use without grafting,
        # for layers without curvature yet).
        self.graft_exp_avg_sq: Tensor | None = state.pop("graft_exp_avg_sq", None)
        # curvature="eigen_corrected": the rotated gradient's second moment.
        self.rotated_second_moment: Tensor | None = state.pop("rotated_second_moment", None)
        assert not state, f"layer_state_shapes declares {sorted(state)}, which no attribute holds"
        # Host-side counts per layer: estimates folded in, a decomposition present, moments.
        self.factor_updates, self.ready, self.moment_updates = (
            [0] * count,
            [False] * count,
            [0] * count,
        )
        self._cache: tuple[tuple[float, str], EigenPreconditioner] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def preconditioner(self, damping: float, damping_mode: str) -> EigenPreconditioner:
        """The damped preconditioner of every layer, cached between refreshes."""
        if self._cache is None or self._cache[0] != (damping, damping_mode):
            built = EigenPreconditioner.from_state(self.decomposition, damping, damping_mode)
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
                "eigvals_A": flat_eigenvalues(eigvals_A, self.layout_A),
                "eigvecs_A": eigvecs_A,
                "eigvals_G": flat_eigenvalues(eigvals_G, self.layout_G),
                "eigvecs_G": eigvecs_G,
            }
        else:  # the first decomposition is always a full one
            layouts = (self.layout_A, self.layout_G)
            computed = EigenPreconditioner.from_factors(
                A, G, damping, damping_mode, layouts
            ).state()
        # Written into the bucket's own tensors: their layout (eigh returns column-major
        # eigenvectors) stays that of a loaded checkpoint, so a resumed run multiplies in the
        # same order and continues bit for bit.
        for key, value in computed.items():
            if everything:
                torch.where(ok, value, self.decomposition[key], out=self.decomposition[key])
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

    def gradient_statistics(
        self, grads: list[Tensor | None], stats: BucketStatistics
    ) -> BucketStatistics:
        """``stats`` with the factor estimates of ``factor_source="gradient"``: g^T g and
        g g^T of each layer's gradient matrix (rows without a gradient take none)."""
        g = _stacked_gradients(grads)
        if g is None:
            return stats
        A, G = gradient_factors(g, self.layout_A, self.layout_G)
        present = [x is not None for x in grads]
        return BucketStatistics(A, G, present, stats.g1, stats.has_split, stats.probe)

    def state_tensors(self) -> dict[str, Tensor]:
        """Every stacked per-layer tensor the bucket holds, by its name in layer_state_shapes
        (what a checkpoint saves and loads, row by row)."""
        tensors = {
            "A": self.A,
            "G": self.G,
            **self.decomposition,
            "gradient_exp_avg": self.gradient_exp_avg,
        }
        if self.graft_exp_avg_sq is not None:
            tensors["graft_exp_avg_sq"] = self.graft_exp_avg_sq
        if self.rotated_second_moment is not None:
            tensors["rotated_second_moment"] = self.rotated_second_moment
        return tensors

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
        betas: tuple[float, float],
        config: FOPConfig,
        step: int,
        ok: Tensor,
    ) -> BucketStep | None:
        """The preconditioned (and, with grafting, AdamW-sized) direction of every layer of
        the bucket with a gradient; None when no layer has one.

        ``damping`` and ``beta2`` are the FOP group's; ``step`` is 1-based (the bias
        corrections of the grafting norm). Every row is computed in one batch and row masks
        choose: a layer without a decomposition yet takes AdamW's direction, one without a
        gradient changes no moment and gets a zero direction. Where ``ok`` (the step's
        finiteness flag) is false the moments stay as they were and the directions are zeros,
        so nothing downstream sees a NaN.
        """
        beta1, beta2 = betas
        g_avg = _stacked_gradients(grads)
        if g_avg is None:
            return None
        present = [grad is not None for grad in grads]
        ready = [has and done for has, done in zip(present, self.ready)]
        waiting = [has and not done for has, done in zip(present, self.ready)]
        updating = _row_flag(present, g_avg, ok)  # where moments may change
        averaged = self._averaged_gradient(g_avg, beta1, step, updating)
        adam = None
        if self.graft != "none" or any(waiting):
            v = self.second_moment()
            adam = adam_direction(g_avg, v, beta2, config.adamw_eps, step, updating, averaged)
        if any(ready):
            result = self._preconditioned(stats, g_avg, ready, damping, config, ok, averaged)
            if self.graft == "adamw":
                assert adam is not None
                result = result._replace(direction=graft(result.direction, _norm(adam)))
            elif self.graft == "output":
                assert adam is not None
                grafted = graft_output(result.direction, adam, self.A, self.layout_A)
                result = result._replace(direction=grafted)
            if any(waiting):
                result = _choose(_row_flag(ready, g_avg), result, _adam_result(adam))
        else:
            assert adam is not None
            result = _adam_result(adam)
        direction = torch.where(updating, result.direction, 0.0)
        waiting_rows = [row for row, wait in enumerate(waiting) if wait]
        rows = [row for row, has in enumerate(present) if has]
        return BucketStep(
            self, rows, direction, g_avg, result._replace(direction=direction), waiting_rows
        )

    def _averaged_gradient(
        self, g_avg: Tensor, beta1: float, step: int, updating: Tensor
    ) -> Tensor:
        """The bias-corrected moving average of the gradient (updated where ``updating``),
        which the preconditioner then acts on."""
        average = self.gradient_exp_avg
        torch.where(updating, average.lerp(g_avg, 1 - beta1), average, out=average)
        return average / (1 - beta1**step)

    def _preconditioned(
        self,
        stats: BucketStatistics,
        g_avg: Tensor,
        ready: list[bool],
        damping: float,
        config: FOPConfig,
        ok: Tensor,
        averaged: Tensor,
    ) -> FOPDirection:
        """FOP's (or K-FAC's) direction of every row, meaningful in the ``ready`` rows: that of
        the averaged gradient ``averaged`` (the momentum), FOP's correction from this step's
        two halves, the metric from this step's gradient ``g_avg``."""
        preconditioner = self.preconditioner(damping, config.damping_mode)
        unpadded, g_avg = g_avg, self._padded(g_avg)
        g_diff = None
        # No layer of the bucket has two halves this step (an embedding has no hooks): g_diff
        # would be 0, its FOP direction exactly K-FAC's, and its second moment that of two
        # halves that agree (r^2 / 2); so skip the zeros (the probes, the rotation, the FOP
        # scalars), which on a vocabulary-sized matrix cost more than the step itself.
        halves_agree = stats.g1 is not None and not any(stats.has_split)
        if stats.g1 is not None and any(stats.has_split):
            # g1 as p.grad carries it: clipped, unscaled or rescaled with it after the backward.
            g1 = stats.g1
            if stats.probe is not None:
                factor = gradient_factor(probe_matrices(unpadded), stats.probe)
                g1 = g1 * factor[:, None, None]
            # A layer without two halves this step has g_diff = 0: its FOP direction is exactly
            # K-FAC's, and its second moment that of the whole batch.
            g1 = self._padded(g1)
            if not all(stats.has_split):
                g1 = torch.where(_row_flag(stats.has_split, g_avg), g1, g_avg)
            g_diff = 2 * (g1 - g_avg)
        # The eigen-corrected metric needs g_avg and g_diff in the eigenbasis for its second
        # moment; the direction then starts from those rotations instead of making its own.
        rotated: dict[str, Tensor] = {}
        if self.rotated_second_moment is not None:
            preconditioner, rotated = self._corrected(
                preconditioner, g_avg, g_diff, ready, damping, config, ok, halves_agree
            )
        base = self._padded(averaged)
        rotated.pop("rotated_avg", None)
        if config.mode == "kfac" or g_diff is None:
            rotated.pop("rotated_diff", None)  # the halves fed the metric only
            result = preconditioner.kfac(base, **rotated)
        else:
            result = preconditioner.fop(base, g_diff, config.fop_zero_tol, **rotated)
        return result._replace(direction=unpad_matrix(result.direction, *self._layouts_out_in))

    @property
    def _layouts_out_in(self) -> tuple[BlockLayout, BlockLayout]:
        return self.layout_G, self.layout_A

    def _padded(self, matrices: Tensor) -> Tensor:
        """Gradient matrices with the zero coordinates of padded factor sides (blocks.py)."""
        return pad_matrix(matrices, *self._layouts_out_in)

    def _corrected(
        self,
        kronecker: EigenPreconditioner,
        g: Tensor,
        g_diff: Tensor | None,
        ready: list[bool],
        damping: float,
        config: FOPConfig,
        ok: Tensor,
        halves_agree: bool = False,
    ) -> tuple[EigenCorrectedPreconditioner, dict[str, Tensor]]:
        """The eigen-corrected metric after this step's gradient ``g`` (and the difference of
        its halves, ``g_diff``; ``halves_agree``: a difference of zero) went into the rotated
        second moment of the ``ready`` rows (only where ``ok``), and both in the eigenbasis
        (``rotated_avg``, ``rotated_diff``)."""
        assert self.rotated_second_moment is not None
        decay = config.second_moment_decay
        rotated = {"rotated_avg": kronecker.rotate(g)}
        if g_diff is not None:
            rotated["rotated_diff"] = kronecker.rotate(g_diff)
        moment = self.rotated_second_moment
        update_rotated_second_moment(
            moment,
            rotated["rotated_avg"],
            decay,
            _row_flag(ready, g, ok),
            rotated.get("rotated_diff"),
            halves_agree,
        )
        self.moment_updates = [done + has for done, has in zip(self.moment_updates, ready)]
        # Rows without a moment yet divide by one (their metric is never used).
        updates = torch.tensor([max(n, 1) for n in self.moment_updates], device=g.device)
        metric = corrected_metric(
            moment, updates[:, None, None], decay, config.exponent, damping, config.damping_mode
        )
        corrected = EigenCorrectedPreconditioner(kronecker.eigvecs_A, kronecker.eigvecs_G, metric)
        return corrected, rotated


def _row_flag(rows: list[bool], like: Tensor, ok: Tensor | None = None) -> Tensor:
    """The host's per-row flags ``rows`` (and the device flag ``ok``), shaped to mask a
    (layers, out, in) stack on the device of ``like`` (``ok`` itself when every row is set)."""
    if ok is not None and all(rows):
        return ok
    mask = torch.tensor(rows, device=like.device)[:, None, None]
    return mask if ok is None else ok & mask


def _stacked_gradients(grads: list[Tensor | None]) -> Tensor | None:
    """The layers' gradient matrices as one fp32 stack, zeros for a layer without one (None
    when no layer has one)."""
    like = next((grad for grad in grads if grad is not None), None)
    if like is None:
        return None
    return torch.stack([like.new_zeros(like.shape) if g is None else g for g in grads]).float()


def _norm(matrices: Tensor) -> Tensor:
    return torch.linalg.vector_norm(matrices, dim=(-2, -1), keepdim=True)


def _adam_result(adam: Tensor) -> FOPDirection:
    """AdamW's direction with the FOP scalars of a plain gradient step (beta 0, eta 1)."""
    zeros = adam.new_zeros(len(adam))
    return FOPDirection(adam, zeros, zeros + 1, zeros.clone(), zeros + 1)


def _choose(mask: Tensor, chosen: FOPDirection, other: FOPDirection) -> FOPDirection:
    """``chosen`` in the rows of ``mask`` (layers, 1, 1), ``other`` elsewhere."""
    direction = torch.where(mask, chosen.direction, other.direction)
    rows = mask.flatten()
    scalars = {
        name: torch.where(rows, getattr(chosen, name), getattr(other, name)) for name in SCALARS
    }
    return FOPDirection(direction, **scalars)

"""The layers of one shape, stacked: their state as (layers, ...) tensors, so folding,
decomposing and stepping them are batched calls. A bucket stacks its layers' gradients, runs
the update (fop_update.py) on all of them at once and keeps its results where the step is kept;
the rule itself is not here."""

from __future__ import annotations

import torch
from torch import Tensor

from hf_fop.bucket_data import (
    BucketStatistics,
    BucketStep,
    factor_layouts,
    factors_from_gradient,
    layer_state_shapes,
)
from hf_fop.config import FOPConfig
from hf_fop.curvature import EigenPreconditioner, flat_eigenvalues, running_factor_weight
from hf_fop.eigen_corrected import carry_second_moment, power_qr_refresh
from hf_fop.factor_sums import gradient_factors
from hf_fop.fop_update import UpdateRule, fop_update
from hf_fop.gradient_probes import gradient_factor, probe_matrices
from hf_fop.grafting import layer_graft
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
        # Every per-layer tensor, stacked, by its name in layer_state_shapes: the factors A and
        # G, their eigenbasis, the momentum and the moments of the metric and the step size.
        self.shapes = layer_state_shapes(self.layout_A, self.layout_G, self.graft, config.curvature)
        self.state = {
            key: torch.zeros(count, *shape, device=device) for key, shape in self.shapes.items()
        }
        # The step's finiteness flag (begin_step).
        self.keep = torch.ones((), dtype=torch.bool, device=device)
        # Host-side counts per layer: estimates folded in, a decomposition present, moments.
        self.factor_updates, self.ready, self.moment_updates = (
            [0] * count,
            [False] * count,
            [0] * count,
        )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def A(self) -> Tensor:
        return self.state["A"]

    @property
    def G(self) -> Tensor:
        return self.state["G"]

    @property
    def decomposition(self) -> dict[str, Tensor]:
        """The eigenbasis (and, for the Kronecker metric, the eigenvalues) of the factors."""
        return {key: self.state[key] for key in EigenPreconditioner.STATE_KEYS}

    def begin_step(self, keep: Tensor) -> None:
        """The step's finiteness flag (a device scalar): whatever the step computes is kept
        only where it holds (``_commit``); the host's counts are put back by the optimizer once
        it reads the flag."""
        self.keep = keep

    def _commit(
        self, key: str, value: Tensor, rows: list[int] | None = None, keep: Tensor | None = None
    ) -> None:
        """``value`` into the state tensor ``key`` (into its ``rows`` where given) where the
        step is kept (``keep``: a narrower mask that includes the flag): the one place where a
        skipped step is undone."""
        keep = self.keep if keep is None else keep
        target = self.state[key]
        if rows is None:
            torch.where(keep, value, target, out=target)
        else:
            target[rows] = torch.where(keep, value, target[rows])

    def fold(self, A: Tensor, G: Tensor, present: list[bool], decay: float) -> None:
        """Fold this step's estimates into the running factors (see running_factor_weight)."""
        weights = [
            running_factor_weight(done, decay) if has else 0.0
            for has, done in zip(present, self.factor_updates)
        ]
        weight: float | Tensor = weights[0]
        if len(set(weights)) > 1:
            weight = torch.tensor(weights, device=self.A.device)[:, None, None]
        self._commit("A", self.A.lerp(A, weight))
        self._commit("G", self.G.lerp(G, weight))
        self.factor_updates = [done + has for done, has in zip(self.factor_updates, present)]

    def decompose(self, rows: list[int], damping: float, damping_mode: str) -> None:
        """Decompose the running factors of ``rows``."""
        selection = self._selection(rows)
        A, G = _take(self.A, selection), _take(self.G, selection)
        if self.basis_refresh == "qr" and all(self.ready[row] for row in rows):
            old = {key: _take(value, selection) for key, value in self.decomposition.items()}
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
            self._commit(key, value, selection)
        self.mark_ready(rows)

    def _selection(self, rows: list[int]) -> list[int] | None:
        """``rows``, or None where they are every layer of the bucket: its tensors are then read
        and written themselves, without row copies."""
        return None if rows == list(range(len(self))) else rows

    def moment_bases(self, rows: list[int]) -> tuple[Tensor, Tensor] | None:
        """The eigenbases the rotated second moment of ``rows`` is expressed in (copies), to
        carry it into the bases a refresh brings; None when there is nothing to carry."""
        if "rotated_second_moment" not in self.state or not any(self.ready[row] for row in rows):
            return None
        return self.state["eigvecs_A"][rows], self.state["eigvecs_G"][rows]

    def carry_moment(self, rows: list[int], old: tuple[Tensor, Tensor]) -> None:
        """Express the rotated second moment of ``rows`` in their refreshed bases (rows
        without a decomposition before hold zeros, which stay zeros)."""
        selection = self._selection(rows)
        new_A, new_G, moment = (
            _take(self.state[key], selection)
            for key in ("eigvecs_A", "eigvecs_G", "rotated_second_moment")
        )
        carried = carry_second_moment(moment, *old, new_A, new_G)
        self._commit("rotated_second_moment", carried, selection)

    def mark_ready(self, rows: list[int]) -> None:
        for row in rows:
            self.ready[row] = True

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

    def adam_second_moment(self) -> Tensor:
        """AdamW's second moment of each layer's gradient matrix: declared with grafting, and
        otherwise created when a layer first steps without an eigenbasis (as AdamW)."""
        if "graft_exp_avg_sq" not in self.state:  # shaped as the momentum, as declared
            self.state["graft_exp_avg_sq"] = torch.zeros_like(self.state["gradient_exp_avg"])
        return self.state["graft_exp_avg_sq"]

    def step(
        self,
        stats: BucketStatistics,
        grads: list[Tensor | None],
        rule: UpdateRule,
        step: int,
        weight_norms: Tensor | None = None,
    ) -> BucketStep | None:
        """Every layer's direction by ``fop_update`` (None when no layer has a gradient), and
        its new state kept in the rows with a gradient where the step is kept; elsewhere the
        state stays and the direction is zero. ``step`` is 1-based; ``weight_norms``: each
        layer's weight norm ||W|| (layers, 1, 1), which bounds the output graft."""
        g_avg = _stacked_gradients(grads)
        if g_avg is None:
            return None
        present = [grad is not None for grad in grads]
        ready = [has and done for has, done in zip(present, self.ready)]
        waiting = [
            row for row, (has, done) in enumerate(zip(present, self.ready)) if has and not done
        ]
        if waiting:
            self.adam_second_moment()
        counts = None  # the rotated moment's updates, where the metric keeps one
        if "rotated_second_moment" in self.state:
            self.moment_updates = [done + has for done, has in zip(self.moment_updates, ready)]
            # Rows without a moment yet divide by one (their metric is never used).
            at_least_one = [max(n, 1) for n in self.moment_updates]
            counts = torch.tensor(at_least_one, device=g_avg.device)[:, None, None]
        new, result = fop_update(
            self.state,
            g_avg,
            self._difference(stats, g_avg),
            rule,
            step,
            counts,
            ready,
            (self.layout_A, self.layout_G),
            weight_norms,
        )
        keep = _row_flag(present, g_avg, self.keep)
        for key, value in new.items():
            self._commit(key, value, keep=keep)
        # fop_update returns a direction of its own: zeroed in place where the step is not kept.
        result = result._replace(direction=result.direction.masked_fill_(~keep, 0.0))
        rows = [row for row, has in enumerate(present) if has]
        return BucketStep(self, rows, result.direction, g_avg, result, waiting)

    def _difference(self, stats: BucketStatistics, g_avg: Tensor) -> Tensor | None:
        """g_diff = g1 - g2 = 2 (g1 - g_avg) of every row (0 in a row without two halves this
        step); None when no row has two halves (an embedding has no hooks)."""
        if stats.g1 is None or not any(stats.has_split):
            return None
        # g1 as p.grad carries it: clipped, unscaled or rescaled with it after the backward.
        g1 = stats.g1
        if stats.probe is not None:
            factor = gradient_factor(probe_matrices(g_avg), stats.probe)
            g1 = g1 * factor[:, None, None]
        if not all(stats.has_split):
            g1 = torch.where(_row_flag(stats.has_split, g_avg), g1, g_avg)
        return 2 * (g1 - g_avg)


def _take(tensor: Tensor, selection: list[int] | None) -> Tensor:
    """The rows ``selection`` of a stacked state tensor (a copy), or the tensor itself."""
    return tensor if selection is None else tensor[selection]


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

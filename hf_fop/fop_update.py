"""The update of the preconditioned layers, written once: ``fop_update``.

Everything a preconditioned layer's step does after its Kronecker factors and their eigenbasis
are refreshed (``ModelCurvature.refresh``) happens in ``fop_update``, top to bottom, for a stack
of layers of one shape at a time (a bucket). It writes nothing: it returns the state's new
values, and the bucket keeps them where the step is kept (``ShapeBucket._commit``), so a step
with non-finite gradients is undone in one place instead of in every formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_fop.blocks import BlockLayout, pad_matrix, unpad_matrix
from hf_fop.config import FOPConfig
from hf_fop.curvature import EigenPreconditioner, RotatedDiagonalPreconditioner
from hf_fop.eigen_corrected import (
    EigenCorrectedPreconditioner,
    clustered_second_moment,
    corrected_metric,
    update_rotated_second_moment,
)
from hf_fop.fop_math import FOPDirection
from hf_fop.grafting import (
    adam_direction,
    graft,
    graft_output,
    trusted_scale,
    update_adam_second_moment,
)


@dataclass(frozen=True)
class UpdateRule:
    """The settings ``fop_update`` reads: the FOP group's (damping, betas) and the config's."""

    betas: tuple[float, float]
    damping: float
    damping_mode: str
    curvature: str
    exponent: float
    second_moment_decay: float
    cluster_gap: float
    null_space_floor: float
    mode: str
    graft: str
    adamw_eps: float
    zero_tol: float
    wants_halves: bool
    lr: float
    graft_trust: float | None

    @classmethod
    def of(cls, config: FOPConfig, group: Mapping[str, Any], graft: str) -> UpdateRule:
        """``graft``: the layer's own (``grafting.layer_graft``)."""
        beta1, beta2 = group["betas"]
        return cls(
            betas=(beta1, beta2),
            damping=group["damping"],
            damping_mode=config.damping_mode,
            curvature=config.curvature,
            exponent=config.exponent,
            second_moment_decay=config.second_moment_decay,
            cluster_gap=config.cluster_gap,
            null_space_floor=config.null_space_floor,
            mode=config.mode,
            graft=graft,
            adamw_eps=config.adamw_eps,
            zero_tol=config.fop_zero_tol,
            wants_halves=config.wants_halves,
            lr=float(group["lr"]),
            graft_trust=config.graft_trust,
        )


def fop_update(
    state: Mapping[str, Tensor],
    grad: Tensor,
    grad_diff: Tensor | None,
    rule: UpdateRule,
    step: int,
    moment_updates: Tensor | None,
    ready: list[bool],
    layouts: tuple[BlockLayout, BlockLayout],
    weight_norms: Tensor | None = None,
) -> tuple[dict[str, Tensor], FOPDirection]:
    r"""The direction u of each layer of a stack, and the new values of its ``state``.

    For the batch gradient g (layers, out, in), the difference of the step's two halves
    g_d = g1 - g2 (``grad_diff``; None: no layer was split), the eigenbases Q_A, Q_G and the
    input factor A of ``state``, b1, b2 = ``betas``, b = ``second_moment_decay``, t = ``step``,
    k = ``moment_updates`` (the eigen-corrected metric's; None for the Kronecker metric):

        m <- b1 m + (1 - b1) g;   m^ = m / (1 - b1^t)                      momentum, as Adam's
        r = Q_G^T g Q_A;   r_d = Q_G^T g_d Q_A                             the eigenbasis
        s <- b s + (1 - b) (r^2 / 2 + r_d^2 / 8);   M = (C(s) / (1 - b^k))^p + eps  metric
        n = eta M^-1 (m^ + beta g_perp)                                    FOP (fop_math.py)
        v <- b2 v + (1 - b2) g^2;   a = m^ / (sqrt(v / (1 - b2^t)) + eps')        AdamW's step
        u = n min(sqrt(tr(a A a^T) / tr(n A n^T)), max(1, tau ||W|| / (lr ||n||)))
                                                  AdamW's output change, within tau ||W||

    and, once the distributor has shared u (and the KL clip scaled it), AdamW's decoupled decay
    and the step p <- p (1 - lr wd) - lr u (``update_rules.preconditioned_step``). C(s) is s
    averaged over each cluster of eigenvalues whose eigenvectors are rounding's pick: a
    factor's numerical null space (below ``null_space_floor`` of its largest) and, with
    ``cluster_gap`` > 0, runs of nearly equal ones. A layer not ``ready`` (no eigenbasis yet)
    takes a. ``weight_norms``: ||W|| (layers, 1, 1) of the layers' weights; tau =
    ``graft_trust``; None for either, or a layer whose weights ``starts_from_zero``: the graft
    unbounded. Options: ``mode="kfac"`` n = M^-1 m^; ``curvature="kronecker"``
    M = l_G l_A + lambda; ``graft="adamw"`` u = n ||a|| / ||n||; ``graft="none"`` u = n.
    """
    beta1, beta2 = rule.betas
    layout_A, layout_G = layouts
    rows = None if all(ready) else torch.tensor(ready, device=grad.device)[:, None, None]
    new = {"gradient_exp_avg": state["gradient_exp_avg"].lerp(grad, 1 - beta1)}
    averaged = new["gradient_exp_avg"] / (1 - beta1**step)
    adam = None  # AdamW's step, where the layers' state holds its second moment v
    if "graft_exp_avg_sq" in state:
        new["graft_exp_avg_sq"] = update_adam_second_moment(state["graft_exp_avg_sq"], grad, beta2)
        adam = adam_direction(averaged, new["graft_exp_avg_sq"], beta2, rule.adamw_eps, step)
    if not any(ready):
        return new, _adam_result(_needed(adam))
    kronecker = EigenPreconditioner.from_state(state, rule.damping, rule.damping_mode)
    preconditioner: RotatedDiagonalPreconditioner = kronecker
    rotated_diff = None
    if grad_diff is not None:
        rotated_diff = kronecker.rotate(pad_matrix(grad_diff, layout_G, layout_A))
    if rule.curvature == "eigen_corrected":
        assert moment_updates is not None, "the eigen-corrected metric counts its moments"
        old = state["rotated_second_moment"]
        rotated = kronecker.rotate(pad_matrix(grad, layout_G, layout_A))
        halves_agree = rule.wants_halves and grad_diff is None
        decay = rule.second_moment_decay
        moment = update_rotated_second_moment(old, rotated, decay, rotated_diff, halves_agree)
        new["rotated_second_moment"] = moment if rows is None else torch.where(rows, moment, old)
        eigvals, sizes = (kronecker.eigvals_A, kronecker.eigvals_G), (layout_A.size, layout_G.size)
        gap, floor = rule.cluster_gap, rule.null_space_floor
        shared = clustered_second_moment(moment, *eigvals, sizes, gap, floor)
        metric = corrected_metric(
            shared, moment_updates, decay, rule.exponent, rule.damping, rule.damping_mode
        )
        preconditioner = EigenCorrectedPreconditioner(
            kronecker.eigvecs_A, kronecker.eigvecs_G, metric
        )
    momentum = pad_matrix(averaged, layout_G, layout_A)
    if rule.mode == "kfac" or rotated_diff is None:
        result = preconditioner.kfac(momentum)
    else:
        result = preconditioner.fop(momentum, None, rule.zero_tol, rotated_diff=rotated_diff)
    direction = unpad_matrix(result.direction, layout_G, layout_A)
    if rule.graft == "adamw":
        direction = graft(direction, _needed(adam))
    elif rule.graft == "output":
        largest = None
        if rule.graft_trust is not None and weight_norms is not None:
            from_zero = state["starts_from_zero"][:, None, None] > 0
            largest = trusted_scale(direction, weight_norms, rule.lr, rule.graft_trust, from_zero)
        direction = graft_output(direction, _needed(adam), state["A"], layout_A, largest)
    result = result._replace(direction=direction)
    return new, result if rows is None else _choose(rows, result, _adam_result(_needed(adam)))


def _needed(adam: Tensor | None) -> Tensor:
    """AdamW's step, which grafting and a layer without an eigenbasis use."""
    if adam is None:
        raise ValueError("the layers' state holds no graft_exp_avg_sq: AdamW's step is unknown")
    return adam


def _adam_result(adam: Tensor) -> FOPDirection:
    """AdamW's direction with the FOP scalars of a plain gradient step (beta 0, eta 1)."""
    zeros = adam.new_zeros(len(adam))
    return FOPDirection(adam, zeros, zeros + 1, zeros.clone(), zeros + 1)


def _choose(rows: Tensor, chosen: FOPDirection, other: FOPDirection) -> FOPDirection:
    """``chosen`` in the ``rows`` (a (layers, 1, 1) flag), ``other`` elsewhere."""
    return FOPDirection(
        *(
            torch.where(rows if mine.dim() == 3 else rows.flatten(), mine, theirs)
            for mine, theirs in zip(chosen, other)
        )
    )

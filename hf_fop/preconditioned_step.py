"""The preconditioned layers' part of an FOP step, between the hooks and the parameters.

``gather_statistics`` collects what the hooks saw (averaged across ranks, a loss scale undone);
``preconditioned_update`` refreshes the curvature, computes each layer's direction, applies the
KL clip and updates the parameters. The optimizer decides whether the step happens at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_fop.config import FOPConfig
from hf_fop.fop_math import kl_clip_scale
from hf_fop.mixed_precision import loss_scale, unscale_statistics, unscaled_ratio
from hf_fop.model_curvature import BucketStatistics, ModelCurvature
from hf_fop.update_rules import grafted_step, heavy_ball_step, parameter_updates

# An unannounced loss scale is looked for during the first steps only.
UNSCALED_CHECK_STEPS = 10


def gather_statistics(
    curvature: ModelCurvature,
    group: dict[str, Any],
    config: FOPConfig,
    grad_scale: Tensor | None,
    grad_scaler: Any | None,
) -> tuple[list[BucketStatistics], list[Tensor | None], Tensor | None]:
    """This step's bucket statistics (factor estimates on curvature steps, g1 in FOP mode),
    every layer's full gradient matrix, free of any loss scale, and during the first steps
    without a known scale the ``unscaled_ratio`` that tells an unannounced one.

    ``grad_scale``: what GradScaler.step hands over while p.grad is still scaled; else the
    scale of ``grad_scaler``, if any."""
    refresh = group["step"] % config.curvature_interval == 0
    statistics = curvature.gather(refresh, config.mode == "fop")
    gradients = curvature.full_gradients()
    scale = loss_scale(grad_scale, grad_scaler)
    if isinstance(scale, Tensor) or scale != 1.0:
        unscale_statistics(statistics, scale)
    elif group["step"] < UNSCALED_CHECK_STEPS:
        return statistics, gradients, unscaled_ratio(*curvature.scaled_pairs(statistics, gradients))
    return statistics, gradients, None


def preconditioned_update(
    curvature: ModelCurvature,
    group: dict[str, Any],
    state: dict[Tensor, dict[str, Any]],
    config: FOPConfig,
    statistics: list[BucketStatistics],
    gradients: list[Tensor | None],
    ok: Tensor,
) -> dict[str, Tensor | float]:
    """Update the FOP group's parameters (and its step count); returns the step's statistics
    (per-layer tensors, kept on the device until read).

    ``ok`` is the step's device flag: false, and nothing on the device changes (the host's
    counts are put back by the optimizer once it reads the flag)."""
    lr, damping = group["lr"], group["damping"]
    refreshed = curvature.refresh(statistics, group["step"], damping, ok)
    step = group["step"] + 1  # 1-based, for the bias corrections
    steps = curvature.directions(statistics, damping, group["betas"][1], step, gradients, ok)
    pairs, layer_statistics, vg = curvature.layer_directions(steps, gradients)
    scale = None
    if pairs and group["kl_clip"] is not None:
        scale = kl_clip_scale(torch.where(ok, vg, 0.0), lr, group["kl_clip"])
    params, targets, directions = parameter_updates(curvature.layers, pairs, scale)
    if config.graft == "adamw":
        grafted_step(params, targets, directions, state, group, step, ok)
    else:
        heavy_ball_step(params, targets, directions, state, group, (~ok).to(torch.float32))
    group["step"] += 1
    folded = any(any(s.has_factors) for s in statistics if s.A is not None)
    out: dict[str, Tensor | float] = {}
    if pairs:
        out = {**layer_statistics, "kl_scale": torch.ones(()) if scale is None else scale}
    out.update(
        damping=damping, curvature_refreshed=float(folded), inverse_refreshed=float(refreshed)
    )
    return out

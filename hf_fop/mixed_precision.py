"""Loss scaling (fp16 with a GradScaler): what the hooks saw, and how to undo it.

A loss scaler multiplies every output gradient by S during backward; ``GradScaler.unscale_``
divides ``p.grad`` by S but cannot reach what FOP's hooks gathered: the G factor carries S^2
and g1 carries S. Left alone, the preconditioned layers stall (g1 swamps g_avg, G swamps the
damping). FOP therefore learns S:

- from ``torch.amp.GradScaler.step`` itself: FOP declares ``_step_supports_amp_scaling``, so the
  scaler calls ``FOP.step()`` with ``grad_scale`` (S, when ``p.grad`` is still scaled) and
  ``found_inf`` set, and FOP unscales, or skips the step, on its own;
- from ``grad_scaler`` (``FOP(model, grad_scaler=scaler)``; FOPTrainer passes accelerate's),
  which covers ``unscale_`` before ``step`` (gradient clipping).

A scaled backward FOP was not told about is detected from g1 being orders of magnitude larger
than the gradient it is half of (during the first steps), and named in an error once the
host reads the step's flags; that step changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger("hf_fop")

# g1 (a half-batch gradient) is O(1) times g_avg; loss scales are 2^8 - 2^24.
UNSCALED_RATIO_LIMIT = 1000.0


def loss_scale(grad_scale: Tensor | None, grad_scaler: Any | None) -> Tensor | float:
    """S, the factor the last backward passes multiplied the output gradients by: a tensor on
    the device (GradScaler.step hands it over, else the scaler's own), so nothing waits."""
    if grad_scale is not None:
        return grad_scale
    if grad_scaler is not None and grad_scaler.is_enabled():
        scale = getattr(grad_scaler, "_scale", None)
        return scale if isinstance(scale, Tensor) else float(grad_scaler.get_scale())
    return 1.0


def unscaled_ratio(g1: Sequence[Tensor], g_avg: Sequence[Tensor]) -> Tensor | None:
    """The median over layers of ||g1|| / ||g_avg||, on the device: O(1) normally, the loss
    scale when the hooks saw a scaled backward that FOP was not told about (NaN: no layer)."""
    if not g1:
        return None
    top = torch.stack(torch._foreach_norm(list(g1)))
    bottom = torch.stack(torch._foreach_norm(list(g_avg)))
    valid = bottom > 0
    return torch.where(valid, top / torch.where(valid, bottom, 1.0), float("nan")).nanmedian()


def raise_if_unscaled(ratio: float) -> None:
    """Raise when ``unscaled_ratio`` says the hooks saw a loss scale FOP was not told about."""
    if ratio > UNSCALED_RATIO_LIMIT:
        raise RuntimeError(
            f"FOP's hooks saw output gradients about {ratio:.3g}x larger than the parameters' "
            "gradients: the backward ran under a loss scaler (fp16 GradScaler) that FOP was not "
            "told about, and its curvature would be wrong. Pass the scaler: "
            "FOP(model, grad_scaler=scaler) (FOPTrainer and accelerate launch do it for you), "
            "or call scaler.step(optimizer) without unscale_ first."
        )


def unscale_statistics(statistics: Sequence[Any], scale: Tensor | float) -> None:
    """Undo a loss scale S in the hooks' statistics (``BucketStatistics``), in place: G carries
    S^2, g1 and the gradient's probes carry S."""
    G = [s.G for s in statistics if s.G is not None]
    g1 = [t for s in statistics for t in (s.g1, s.probe) if t is not None]
    if G:
        torch._foreach_div_(G, scale * scale)
    if g1:
        torch._foreach_div_(g1, scale)


def unscale_and_check(grads: Sequence[Tensor], grad_scale: Tensor | None) -> Tensor | None:
    """Divide the gradients by ``grad_scale`` in place (when given) and return a device flag
    that is non-zero if any of them holds NaN or Inf: GradScaler's own fused kernel, one pass
    over all gradients instead of a handful of small kernels per parameter."""
    inverse_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    flags = []
    for (device, _), group in groups.items():
        found = torch.zeros(1, device=device)
        inverse = (
            torch.ones(1, device=device)
            if inverse_scale is None
            else inverse_scale.reshape(1).to(device=device, dtype=torch.float32)
        )
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, inverse)
        flags.append(found)
    if not flags:
        return None
    return torch.cat([f.to(flags[0].device) for f in flags]).sum()


def all_finite(tensor: Tensor) -> Tensor:
    """Whether every element of a non-empty ``tensor`` is finite, as a 0-d bool tensor.

    Its least and largest elements decide it (NaN propagates through both, an infinity is one
    of them): one reduction without a temporary, about 10x faster on a CPU than
    ``isfinite().all()``, which writes a mask first (2% of a decoder's step)."""
    return torch.stack(torch.aminmax(tensor)).isfinite().all()


def step_verdict(
    statistics: Sequence[Tensor],
    overflow: Tensor | None,
    found_inf: Tensor | None,
    device: torch.device,
    unscaled: Tensor | None = None,
) -> Tensor:
    """[ok, scaler_skipped, unscaled ratio] (fp32) on ``device``, computed without waiting.

    ``ok``: every statistic is finite, no gradient overflowed and no unannounced loss scale
    was seen (``unscaled_ratio``), so the step may change anything; ``scaler_skipped``:
    GradScaler's ``found_inf`` was set (it reports such skips itself)."""
    checks = [all_finite(t).to(device) for t in statistics if t.numel()]
    checks += [(flag.sum() == 0).to(device) for flag in (overflow, found_inf) if flag is not None]
    ratio = torch.zeros((), device=device)
    if unscaled is not None:
        ratio = unscaled.to(device, torch.float32)
        checks.append(~(ratio > UNSCALED_RATIO_LIMIT))
    ok = torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=device)
    scaler_skipped = (
        (found_inf.sum() > 0).to(device)
        if found_inf is not None
        else torch.zeros((), dtype=torch.bool, device=device)
    )
    return torch.stack([ok.float(), scaler_skipped.float(), ratio])


def report_skipped_step(flags: Sequence[float]) -> None:
    """Say why a step was skipped, once the host has read its ``step_verdict``: an unannounced
    loss scale is an error; non-finite gradients a warning (GradScaler reports its own)."""
    _, scaler_skipped, unscaled = flags
    raise_if_unscaled(unscaled)
    if not scaler_skipped:
        logger.warning(
            "FOP skipped a step: the gradients hold NaN or Inf; parameters and optimizer state "
            "are unchanged"
        )

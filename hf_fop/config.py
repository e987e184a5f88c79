"""Typed, validated settings of the FOP optimizer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["fop", "kfac"]
Method = Literal["eigen", "inverse"]

MODES: tuple[str, ...] = ("fop", "kfac")
METHODS: tuple[str, ...] = ("eigen", "inverse")


@dataclass(frozen=True)
class FOPConfig:
    """Every knob of :class:`hf_fop.FOP`, checked once when it is built.

    Preconditioned layers use ``lr``, ``momentum``, ``weight_decay``, ``damping`` and ``kl_clip``;
    the AdamW fallback (embeddings, norms, heads, everything not preconditioned) uses the
    ``adamw_*`` fields.
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    # Tikhonov damping added to every Kronecker eigenvalue lambda_G * lambda_A (method "eigen"),
    # or split between the factors by their mean eigenvalues (method "inverse").
    damping: float = 0.01
    # Trust region on the preconditioned step (K-FAC practice); None turns it off.
    kl_clip: float | None = 0.001
    mode: Mode = "fop"
    method: Method = "eigen"
    # Collect A and G every `curvature_interval` steps; refresh their decomposition every
    # `inverse_interval` steps. Step 0 always does both.
    curvature_interval: int = 5
    inverse_interval: int = 5
    factor_decay: float = 0.95
    # Which layers are preconditioned: "auto" (Linear/Conv layers inside repeated blocks, or every
    # supported layer when the model has no blocks), "all-linear", a regular expression over
    # module names, or an explicit list of module names.
    targets: str | Sequence[str] = "auto"
    skip: Sequence[str] = ()
    # Layers with a Kronecker factor larger than this (vocabulary-sized heads) go to AdamW.
    max_factor_dim: int = 8192
    # Micro-batches per optimizer step; g1 is the gradient of the first half of the step's
    # examples. None learns it from the micro-batches of the previous step.
    gradient_accumulation_steps: int | None = None
    adamw_lr: float = 1e-3
    adamw_betas: tuple[float, float] = (0.9, 0.999)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.01
    # With E <= fop_zero_tol * <g_diff, F^-1 g_diff>, g_perp is round-off and beta is set to 0.
    fop_zero_tol: float = 1e-10

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        _check(self.adamw_lr >= 0, f"adamw_lr must be >= 0, got {self.adamw_lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.adamw_weight_decay >= 0,
            f"adamw_weight_decay must be >= 0, got {self.adamw_weight_decay}",
        )
        _check(
            math.isfinite(self.damping) and self.damping > 0,
            f"damping must be a finite number > 0 (try 1e-3 to 1e-1), got {self.damping}",
        )
        _check(
            self.kl_clip is None or self.kl_clip > 0,
            f"kl_clip must be > 0, or None to turn the clip off, got {self.kl_clip}",
        )
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("curvature_interval", "inverse_interval", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value is None and name == "gradient_accumulation_steps":
                continue
            _check(
                isinstance(value, int) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        _check(
            0 <= self.factor_decay < 1,
            f"factor_decay must be in [0, 1), got {self.factor_decay}",
        )
        _check(self.max_factor_dim >= 1, f"max_factor_dim must be >= 1, got {self.max_factor_dim}")
        betas = self.adamw_betas
        _check(
            len(betas) == 2 and all(0 <= b < 1 for b in betas),
            f"adamw_betas must be two numbers in [0, 1), got {betas}",
        )
        _check(self.adamw_eps > 0, f"adamw_eps must be > 0, got {self.adamw_eps}")
        _check(self.fop_zero_tol >= 0, f"fop_zero_tol must be >= 0, got {self.fop_zero_tol}")
        _check(
            isinstance(self.targets, str) or all(isinstance(t, str) for t in self.targets),
            "targets must be 'auto', 'all-linear', a regular expression or a list of module names",
        )

    def replace(self, **changes: object) -> FOPConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"unknown FOP setting(s) {sorted(unknown)}; valid ones are "
                f"{sorted(f.name for f in dataclasses.fields(self))}"
            )
        return dataclasses.replace(self, **changes)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)

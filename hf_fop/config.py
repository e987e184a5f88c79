"""Typed, validated settings of the FOP optimizer."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hf_fop.blocks import Blocking

Mode = Literal["fop", "kfac"]
DampingMode = Literal["relative", "absolute"]
Graft = Literal["adamw", "output", "none"]
Curvature = Literal["kronecker", "eigen_corrected"]
BasisRefresh = Literal["eigh", "qr"]
FactorSource = Literal["activations", "gradient"]

MODES: tuple[str, ...] = ("fop", "kfac")
DAMPING_MODES: tuple[str, ...] = ("relative", "absolute")
GRAFTS: tuple[str, ...] = ("adamw", "output", "none")
CURVATURES: tuple[str, ...] = ("kronecker", "eigen_corrected")
BASIS_REFRESHES: tuple[str, ...] = ("eigh", "qr")
FACTOR_SOURCES: tuple[str, ...] = ("activations", "gradient")


# Release 0.2's metric, kept as a named set: K-FAC's l_G l_A with damping relative to its mean,
# each layer's direction grafted onto AdamW's step, factors from the hooks every 5 steps
# (eigh), the blocks' layers only (release 0.2 took the momentum after the preconditioner).
# It stays beside the default metric because its steps keep round-off at round-off: two ranks
# against one process differ by 1.7e-5 of the movement after 4 steps, the eigen-corrected
# metric by up to 2.2x (docs/design.md, "Why the Kronecker metric stays").
KRONECKER_SETTINGS: dict[str, object] = {
    "curvature": "kronecker",
    "exponent": 1.0,
    "graft": "adamw",
    "damping": 1.0,
    "damping_mode": "relative",
    "factor_source": "activations",
    "basis_refresh": "eigh",
    "curvature_interval": 5,
    "inverse_interval": 5,
    "targets": "auto",
    "precondition_embeddings": False,
    "block_size": None,
    "diagonal_above": None,
}


@dataclass(frozen=True)
class FOPConfig:
    """Every knob of :class:`hf_fop.FOP`, checked once when it is built.

    The defaults make FOP a drop-in for AdamW (``lr`` is an AdamW learning rate) and are the
    winners of the curvature ablation (docs/benchmarks.md): in the eigenbasis of each layer's
    Kronecker factors (refreshed every 2 steps by a warm-started power step and a QR), the
    metric is the rotated gradient's own running second moment (that of its two halves) to
    the power 1/2 with Adam's eps, and the preconditioner acts on the moving average of the
    gradient: Adam run in that basis; FOP's correction comes on top. Each layer's step is then
    grafted so that it changes the layer's outputs as much as AdamW's step would
    (``graft="output"``): the user's AdamW rate keeps its meaning, fine-tuning included
    (benchmarks/results/rate_curves*). Every Linear/Conv layer and embedding is
    preconditioned, long sides in blocks of 1024. ``graft="none"`` (the previous default)
    takes the rotated step as it is: smaller than AdamW's at one rate, best at 3-10x AdamW's
    rate when training from scratch.
    ``FOPConfig.kronecker()`` is release 0.2's metric (K-FAC's, grafted onto AdamW's step).

    Preconditioned layers use ``lr``, ``momentum``, ``weight_decay``, ``damping`` and ``kl_clip``;
    the AdamW fallback (embeddings, norms, heads, everything not preconditioned) uses the
    ``adamw_*`` fields (``adamw_lr`` defaults to ``lr``).
    """

    lr: float = 1e-3
    # The first-moment decay (Trainer: adam_beta1), taken before the preconditioner as Adam and
    # SOAP take it: the preconditioner acts on the bias-corrected moving average of the
    # gradient, and the result is the step (grafted, or with graft="none" as it is, times lr).
    momentum: float = 0.9
    # Decoupled, as AdamW's.
    weight_decay: float = 0.01
    # Added to the metric in the eigenbasis. "absolute": as is (the default 1e-8 is Adam's eps
    # for the exponent 1/2). "relative": damping times the metric's mean per layer, an eps that
    # scales with the layer's gradients: at 1e-2 rotated coordinates whose second moment is
    # round-off take a damped step instead of a unit one, and a one-ulp change of the inputs
    # moves the weights 45% less, at 0.5% of perplexity on the decoders (docs/design.md,
    # Round-off). For the Kronecker metric, F = A (x) G + damping * mean(eig A) * mean(eig G) I,
    # unchanged when A or G is multiplied by a constant.
    damping: float = 1e-8
    damping_mode: DampingMode = "absolute"
    # "none": the direction is the step, times lr (it has Adam's size with the default metric);
    # "adamw": each layer's direction takes the norm of the AdamW step for that layer
    # (Distributed Shampoo's grafting; what the Kronecker metric needs to take AdamW's lr);
    # "output": each layer's direction changes the layer's outputs as much as AdamW's step
    # would, tr(U A U^T) with the factor A (hf_fop/grafting.py). Layers whose factors come from
    # the gradient (embeddings, factor_source="gradient") have no A and keep their direction.
    graft: Graft = "output"
    # How far the output graft may enlarge a layer's step: while the grafted step lr ||u||
    # stays under graft_trust times the layer's weight norm, the graft acts in full; beyond,
    # the step shrinks to that bound, though never below the rotated step's own size. Fine-
    # tuning moves a pretrained layer by 1e-4 to 1e-3 of its norm a step, so the graft keeps
    # AdamW's rate there; from scratch at a tuned rate steps reach 1e-2 and beyond, where the
    # rotated step taken as it is (graft="none") trains better (docs/benchmarks.md). A layer
    # whose weights are all zero when FOP is built (a LoRA B) has no size to compare with and
    # is grafted in full. None: no bound.
    graft_trust: float | None = 0.02
    # Trust region on the preconditioned step (K-FAC practice; 1e-3 with graft="none"). None
    # turns it off: a clip that binds at every step makes the learning rate meaningless.
    kl_clip: float | None = None
    mode: Mode = "fop"
    # The metric in the Kronecker eigenbasis (hf_fop/eigen_corrected.py): "kronecker" is
    # K-FAC's product of the factors' eigenvalues; "eigen_corrected" the running second moment
    # of the rotated gradient (decay ``second_moment_decay``) to the power ``exponent``: 1 is
    # EK-FAC's natural gradient, 0.5 SOAP-style.
    curvature: Curvature = "eigen_corrected"
    exponent: float = 0.5
    second_moment_decay: float = 0.95
    # Eigenvalues of a factor closer than ``cluster_gap`` times the largest of their block form
    # one cluster, whose eigenvectors fp32 rounding picks at random: the eigen-corrected metric
    # then takes one value over each cluster (the mean of the rotated second moment there), so
    # the step does not depend on that pick. 1e-5 halves the movement a one-ulp change of the
    # inputs causes (against ``null_space_floor`` alone), at 1.2 points of accuracy when
    # fine-tuning MiniLM at 2e-5 (docs/design.md, "Round-off"). 0: a metric per coordinate
    # above the null space.
    cluster_gap: float = 0.0
    # Eigenvalues of a factor below ``null_space_floor`` times the largest of their block (its
    # numerical null space: blank pixels, repeated patches, a batch with fewer rows than the
    # side) form one cluster as above. Per coordinate there, fp32 rounding's pick of
    # eigenvectors became most of the movement a one-ulp change of the inputs causes
    # (docs/design.md, "Round-off"); the coordinates above the floor keep their own metric.
    null_space_floor: float = 1e-6
    # How the eigenbasis is refreshed after the first (always full) decomposition: "eigh", or
    # "qr": one power-iteration step and a QR, warm-started from the previous basis.
    basis_refresh: BasisRefresh = "qr"
    # What the Kronecker factors estimate: "activations" is K-FAC's, A = E[a a^T] over the layer
    # inputs and G = E[d d^T] over the output gradients (from the hooks); "gradient" is
    # Shampoo's and SOAP's, E[g^T g] and E[g g^T] of the layer's averaged gradient matrix.
    factor_source: FactorSource = "activations"
    # Collect A and G every `curvature_interval` steps; refresh their decomposition every
    # `inverse_interval` steps. Step 0 always does both.
    curvature_interval: int = 1
    inverse_interval: int = 2
    factor_decay: float = 0.95
    # At most about this many rows (positions) of each layer call enter A and G, every k-th
    # with an offset that moves each curvature step (None: every row). The factors are
    # running averages over steps, so a step's share needs a few hundred rows per side, not
    # every position of the batch, and their products cost 2 N side^2 flops: the largest of
    # FOP's costs on the decoders. 1,024 rows (release 0.11; 2,048 before) take 9-13% off the
    # decoders' step and 7-8% off LoRA's and the MLP's, still ahead of AdamW at every rate;
    # where behind release 0.10, by under 1% (the fine-tuned decoder at 1e-4: 1.9%;
    # docs/benchmarks.md).
    factor_rows: int | None = 1024
    # The same for G alone (None: every row). G only orients the output side's eigenbasis;
    # A also measures the output graft. Both from 512 rows take a further 1-4% off the step
    # (docs/benchmarks.md).
    output_factor_rows: int | None = 1024
    # Which layers are preconditioned: "all-linear" (every Linear, Conv1D and Conv2d), "auto"
    # (those inside repeated blocks, or every one when the model has no blocks), a regular
    # expression over module names, or an explicit list of module names. Embeddings join each
    # selection as candidates when precondition_embeddings is on.
    targets: str | Sequence[str] = "all-linear"
    skip: Sequence[str] = ()
    # Precondition every nn.Embedding as well (and so a tied output layer): the vocabulary side
    # diagonal, the width side a Kronecker factor, both from the gradient matrix (no hooks, no
    # g1: their FOP direction is K-FAC's). SOAP's lead over block-only preconditioners on
    # language models comes from there (the eigen-corrected probe, docs/benchmarks.md).
    precondition_embeddings: bool = True
    # A factor side longer than this is split into equal diagonal blocks no larger than it
    # (hf_fop/blocks.py): memory and refresh cost grow linearly with the side instead of as its
    # square and cube (Llama-3.2-1B's state: 1.6x AdamW's instead of 4.1x). None: whole
    # factors.
    block_size: int | None = 1024
    # Factor sides longer than this keep their diagonal alone: the layer is preconditioned by
    # its other factor (an untied vocabulary head, as SOAP leaves long sides unrotated). None:
    # such layers are blocked, or follow max_factor_dim.
    diagonal_above: int | None = 16384
    # Layers with a Kronecker factor (or, blocked, a factor block) larger than this go to AdamW.
    max_factor_dim: int = 8192
    # Micro-batches per optimizer step; g1 is the gradient of the first half of the step's
    # examples. None learns it from the micro-batches of the previous step.
    gradient_accumulation_steps: int | None = None
    # None: the same rate as the preconditioned layers (``lr``).
    adamw_lr: float | None = None
    adamw_betas: tuple[float, float] = (0.9, 0.999)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.01
    # With E <= fop_zero_tol * <g_diff, F^-1 g_diff> or E <= fop_zero_tol * <g_avg, F^-1 g_avg>,
    # g_perp is round-off and beta is set to 0 (the K-FAC step).
    fop_zero_tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_number_types(self)
        _check(self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        _check(
            self.adamw_lr is None or self.adamw_lr >= 0,
            f"adamw_lr must be >= 0 (or None: the same as lr), got {self.adamw_lr}",
        )
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.adamw_weight_decay >= 0,
            f"adamw_weight_decay must be >= 0, got {self.adamw_weight_decay}",
        )
        _check(
            math.isfinite(self.damping) and self.damping > 0,
            f"damping must be a finite number > 0 (relative: 1e-2 for the default metric, 0.1 to 1 "
            f"for the Kronecker one; absolute: Adam's 1e-8), got {self.damping}",
        )
        _check(
            self.kl_clip is None or self.kl_clip > 0,
            f"kl_clip must be > 0, or None to turn the clip off, got {self.kl_clip}",
        )
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _check(
            self.damping_mode in DAMPING_MODES,
            f"damping_mode must be one of {DAMPING_MODES}, got {self.damping_mode!r}",
        )
        _check(self.graft in GRAFTS, f"graft must be one of {GRAFTS}, got {self.graft!r}")
        _check(
            self.graft_trust is None or (math.isfinite(self.graft_trust) and self.graft_trust > 0),
            "graft_trust must be > 0 (a step's largest size relative to its layer's weights), "
            f"or None for no bound, got {self.graft_trust}",
        )
        _check(
            self.curvature in CURVATURES,
            f"curvature must be one of {CURVATURES}, got {self.curvature!r}",
        )
        _check(
            self.basis_refresh in BASIS_REFRESHES,
            f"basis_refresh must be one of {BASIS_REFRESHES}, got {self.basis_refresh!r}",
        )
        _check(
            self.factor_source in FACTOR_SOURCES,
            f"factor_source must be one of {FACTOR_SOURCES}, got {self.factor_source!r}",
        )
        _check(
            math.isfinite(self.exponent) and 0 < self.exponent <= 1,
            f"exponent must be in (0, 1] (1: EK-FAC, 0.5: SOAP-style), got {self.exponent}",
        )
        _check(
            math.isfinite(self.cluster_gap) and 0 <= self.cluster_gap < 1,
            f"cluster_gap must be in [0, 1) (0: a metric per coordinate), got {self.cluster_gap}",
        )
        _check(
            math.isfinite(self.null_space_floor) and 0 <= self.null_space_floor < 1,
            "null_space_floor must be in [0, 1) (0: a metric per coordinate in the null space "
            f"too), got {self.null_space_floor}",
        )
        _check(
            0 <= self.second_moment_decay < 1,
            f"second_moment_decay must be in [0, 1), got {self.second_moment_decay}",
        )
        for name in ("curvature_interval", "inverse_interval", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value is None and name == "gradient_accumulation_steps":
                continue
            _check(
                value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        _check(
            0 <= self.factor_decay < 1,
            f"factor_decay must be in [0, 1), got {self.factor_decay}",
        )
        for name in ("factor_rows", "output_factor_rows"):
            value = getattr(self, name)
            _check(
                value is None or value >= 1,
                f"{name} must be an integer >= 1, or None for every row, got {value!r}",
            )
        _check(self.max_factor_dim >= 1, f"max_factor_dim must be >= 1, got {self.max_factor_dim}")
        _check(
            self.diagonal_above is None or self.diagonal_above >= 1,
            f"diagonal_above must be an integer >= 1, or None, got {self.diagonal_above!r}",
        )
        _check(
            self.block_size is None or self.block_size >= 2,
            f"block_size must be an integer >= 2, or None for whole factors, got {self.block_size!r}",
        )
        betas = self.adamw_betas
        _check(
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas),
            f"adamw_betas must be two numbers in [0, 1), got {betas}",
        )
        _check(self.adamw_eps > 0, f"adamw_eps must be > 0, got {self.adamw_eps}")
        _check(self.fop_zero_tol >= 0, f"fop_zero_tol must be >= 0, got {self.fop_zero_tol}")
        _check(
            isinstance(self.targets, str) or all(isinstance(t, str) for t in self.targets),
            "targets must be 'auto', 'all-linear', a regular expression or a list of module names",
        )

    @classmethod
    def kronecker(cls, **changes: object) -> FOPConfig:
        """Release 0.2's defaults (``KRONECKER_SETTINGS``) with ``changes``: the Kronecker
        metric, grafted, as K-FAC papers have it."""
        return cls(**{**KRONECKER_SETTINGS, **changes})

    @property
    def blocking(self) -> Blocking:
        """How every factor side is laid out (blocks.py)."""
        return Blocking(self.block_size, self.diagonal_above)

    @property
    def wants_halves(self) -> bool:
        """Whether a step needs g1, the gradient of the first half of its examples: FOP's
        correction does, and so does the eigen-corrected metric in either mode (its second
        moment is that of the two halves, eigen_corrected.py)."""
        return self.mode == "fop" or self.curvature == "eigen_corrected"

    @property
    def fallback_lr(self) -> float:
        """The AdamW side's learning rate."""
        return self.lr if self.adamw_lr is None else self.adamw_lr

    def replace(self, **changes: object) -> FOPConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        for name in sorted(unknown & set(RETIRED)):
            raise TypeError(f"{name}: {RETIRED[name]}")
        if unknown:
            raise TypeError(
                f"unknown FOP setting(s) {sorted(unknown)}; valid ones are "
                f"{sorted(f.name for f in dataclasses.fields(self))}"
            )
        return dataclasses.replace(self, **changes)


# Settings of earlier releases that left the code (git tag v0.5.0, commit 631596d, keeps them),
# and what to do.
RETIRED: dict[str, str] = {
    "method": "FOP works in the Kronecker eigenbasis only since release 0.6 (method='inverse' "
    "retired): leave the setting out",
    "momentum_placement": "the momentum is taken before the preconditioner since release 0.6 "
    "(momentum_placement='after' retired): leave the setting out",
}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_number_types(config: FOPConfig) -> None:
    """A setting annotated ``float`` or ``int`` holds a number of that kind (a string from a
    command line, or a bool, would otherwise fail inside a comparison or train with 1.0)."""
    for field in dataclasses.fields(config):
        kind, _, optional = str(field.type).partition(" | ")
        value = getattr(config, field.name)
        if kind not in ("float", "int") or (optional == "None" and value is None):
            continue
        if not _is_number(value, integer=kind == "int"):
            what = "a number" if kind == "float" else "an integer"
            raise TypeError(
                f"{field.name} must be {what}{' or None' if optional else ''}, got {value!r} "
                f"({type(value).__name__})"
            )


def _is_number(value: object, integer: bool = False) -> bool:
    """A real number (an integer where ``integer``), Python's or NumPy's; not a bool."""
    wanted = numbers.Integral if integer else numbers.Real
    return isinstance(value, wanted) and not isinstance(value, bool)

"""``FOPTrainingArguments``: TrainingArguments whose ``optim`` accepts "fop" and "kfac"."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from hf_fop.integration.settings import FOP_OPTIMIZERS, validate_fop_args


def register_optimizer_names() -> None:
    """Add "fop" and "kfac" to transformers' closed OptimizerNames enum (idempotent).

    The enum is how TrainingArguments validates ``optim`` and how HfArgumentParser lists its
    choices; adding members makes both accept FOP while any other unknown name still fails with
    the stock message.
    """
    for value in FOP_OPTIMIZERS:
        if value in OptimizerNames._value2member_map_:
            continue
        member = str.__new__(OptimizerNames, value)
        member._name_ = value.upper()
        member._value_ = value
        member.__objclass__ = OptimizerNames
        OptimizerNames._member_map_[member._name_] = member
        OptimizerNames._value2member_map_[value] = member
        OptimizerNames._member_names_.append(member._name_)


@dataclass
class FOPTrainingArguments(TrainingArguments):
    """TrainingArguments plus FOP's settings (``--optim fop`` or ``--optim kfac``).

    A drop-in for AdamW: ``learning_rate``, warmup, schedule, ``weight_decay`` and
    ``adam_beta1`` mean what they mean for AdamW; ``adam_beta2`` and ``adam_epsilon`` set the
    AdamW side (the default step is Adam's in the Kronecker eigenbasis, with its own
    ``second_moment_decay`` and ``damping``, grafted so that each layer's outputs change as
    much as under AdamW's step; ``fop_graft="adamw"`` imposes the norm of AdamW's step per
    layer, ``"none"`` takes the rotated step as it is). Every ``fop_*`` field left at None
    takes :class:`hf_fop.FOPConfig`'s default; ``optim_args`` ("block_size=512,inverse_interval=4") overrides any of them.
    """

    optim: str = field(
        default="adamw_torch",
        metadata={"help": "The optimizer: 'fop', 'kfac' (the K-FAC baseline) or any stock name."},
    )
    fop_damping: float | None = field(
        default=None,
        metadata={
            "help": "Damping added to the metric in the eigenbasis (default 1e-8, absolute: "
            "Adam's eps)."
        },
    )
    fop_damping_mode: str | None = field(
        default=None,
        metadata={
            "help": "'absolute' (default) or 'relative' (times the metric's mean per layer; "
            "1e-2 halves round-off's effect)."
        },
    )
    fop_graft: str | None = field(
        default=None,
        metadata={
            "help": "'output' (default: each layer's step changes its outputs as much as "
            "AdamW's would), 'adamw' (the norm of AdamW's step; for curvature=kronecker) or "
            "'none' (the rotated step as it is; best at 3-10x AdamW's rate from scratch)."
        },
    )
    fop_graft_trust: float | None = field(
        default=None,
        metadata={
            "help": "The output graft enlarges a layer's step only up to this fraction of the "
            "layer's weight norm (default 0.02: fine-tuning grafts in full, from scratch at a "
            "tuned rate the rotated step is taken as it is); optim_args 'graft_trust=none' "
            "lifts the bound."
        },
    )
    fop_momentum: float | None = field(
        default=None, metadata={"help": "Momentum of the FOP update (default: adam_beta1)."}
    )
    fop_weight_decay: float | None = field(
        default=None,
        metadata={"help": "Weight decay of the preconditioned layers (default: weight_decay)."},
    )
    fop_kl_clip: float | None = field(
        default=None, metadata={"help": "KL-norm clip of the preconditioned step (default: off)."}
    )
    fop_curvature_interval: int | None = field(
        default=None, metadata={"help": "Collect Kronecker factors every N steps (default 1)."}
    )
    fop_inverse_interval: int | None = field(
        default=None, metadata={"help": "Refresh the eigenbases every N steps (default 2)."}
    )
    fop_factor_rows: int | None = field(
        default=None,
        metadata={
            "help": "At most about this many positions of each layer call enter the Kronecker "
            "factors (default 1024)."
        },
    )
    fop_output_factor_rows: int | None = field(
        default=None,
        metadata={
            "help": "At most about this many positions of each layer call enter the output-"
            "gradient factor G (default 1024)."
        },
    )
    fop_factor_decay: float | None = field(
        default=None, metadata={"help": "Running-average decay of the factors (default 0.95)."}
    )
    fop_targets: str | None = field(
        default=None,
        metadata={
            "help": "Layers to precondition: 'all-linear' (default: every Linear/Conv), 'auto' "
            "(those of the transformer blocks), a regex, or comma-separated module names."
        },
    )
    fop_skip: str | None = field(
        default=None, metadata={"help": "Comma-separated regexes of modules to leave to AdamW."}
    )
    fop_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Split factor sides longer than this into diagonal blocks (default 1024)."
        },
    )
    fop_precondition_embeddings: bool | None = field(
        default=None,
        metadata={
            "help": "Precondition nn.Embedding weights too (and a tied output layer), from "
            "their gradient (default: True)."
        },
    )
    fop_diagonal_above: int | None = field(
        default=None,
        metadata={
            "help": "Factor sides longer than this keep only their diagonal (vocabulary heads "
            "are preconditioned on their other side; default 16384)."
        },
    )
    fop_max_factor_dim: int | None = field(
        default=None,
        metadata={"help": "Layers with a larger factor (vocab heads) use AdamW (default 8192)."},
    )
    fop_adamw_lr: float | None = field(
        default=None, metadata={"help": "AdamW fallback learning rate (default: learning_rate)."}
    )

    def __post_init__(self) -> None:
        register_optimizer_names()
        super().__post_init__()
        validate_fop_args(self)

"""``FOPTrainingArguments``: TrainingArguments whose ``optim`` accepts "fop" and "kfac"."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from hf_fop.integration.settings import FOP_OPTIMIZERS


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

    ``learning_rate`` is the rate of the preconditioned layers (FOP and K-FAC want ~1e-3 to 1e-2
    from scratch); ``fop_adamw_lr`` sets the AdamW fallback's (default: ``learning_rate``).
    ``optim_args`` ("damping=0.02,curvature_interval=10") overrides any ``fop_*`` field.
    """

    optim: str = field(
        default="adamw_torch",
        metadata={"help": "The optimizer: 'fop', 'kfac' (the K-FAC baseline) or any stock name."},
    )
    fop_damping: float = field(
        default=0.01, metadata={"help": "Damping added to the Kronecker eigenvalues."}
    )
    fop_momentum: float = field(default=0.9, metadata={"help": "Momentum of the FOP update."})
    fop_weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay of the preconditioned layers."}
    )
    fop_kl_clip: float | None = field(
        default=0.001, metadata={"help": "KL-norm clip of the preconditioned step (None: off)."}
    )
    fop_curvature_interval: int = field(
        default=5, metadata={"help": "Collect Kronecker factors every N steps."}
    )
    fop_inverse_interval: int = field(
        default=5, metadata={"help": "Refresh the eigendecompositions every N steps."}
    )
    fop_factor_decay: float = field(
        default=0.95, metadata={"help": "Running-average decay of the Kronecker factors."}
    )
    fop_method: str = field(default="eigen", metadata={"help": "'eigen' or 'inverse'."})
    fop_targets: str = field(
        default="auto",
        metadata={
            "help": "Layers to precondition: 'auto' (Linear layers of transformer blocks), "
            "'all-linear', a regex, or comma-separated module names."
        },
    )
    fop_skip: str | None = field(
        default=None, metadata={"help": "Comma-separated regexes of modules to leave to AdamW."}
    )
    fop_max_factor_dim: int = field(
        default=8192, metadata={"help": "Layers with a larger factor (vocab heads) use AdamW."}
    )
    fop_adamw_lr: float | None = field(
        default=None, metadata={"help": "AdamW fallback learning rate (default: learning_rate)."}
    )

    def __post_init__(self) -> None:
        register_optimizer_names()
        super().__post_init__()

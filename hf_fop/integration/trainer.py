"""``FOPTrainer``: the Trainer with FOP as a first-class optimizer, its statistics in the logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from hf_fop.integration.factory import FOPFactory
from hf_fop.integration.settings import fop_settings_from_args, is_fop_optim
from hf_fop.optimizer import FOP
from hf_fop.partition import UnsupportedWrapperError

logger = logging.getLogger("hf_fop")
STOCK_LEARNING_RATE = 5e-5

try:  # transformers >= 5.2 builds non-Optimizer "factories" with the model
    from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401

    HAS_FACTORY_BRANCH = True
except ImportError:
    HAS_FACTORY_BRANCH = False


def unwrap_optimizer(optimizer: Any) -> Any:
    """The FOP inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    while (
        optimizer is not None and not isinstance(optimizer, FOP) and hasattr(optimizer, "optimizer")
    ):
        optimizer = optimizer.optimizer
    return optimizer


def check_supported_setup(args: Any) -> None:
    """Fail before training for parallel setups that break per-layer curvature."""
    if not is_fop_optim(args):
        return
    if getattr(args, "deepspeed", None):
        raise UnsupportedWrapperError(
            "FOP does not support DeepSpeed ZeRO (it partitions the weights and gradients FOP "
            "preconditions). Drop --deepspeed and launch with `accelerate launch` (DDP)."
        )
    if getattr(args, "fsdp", None) and _fsdp_version(args) != 2:
        raise UnsupportedWrapperError(
            "FOP supports FSDP2 only (FSDP1 flattens the weights FOP preconditions as whole "
            'matrices): add "fsdp_version": 2 to --fsdp_config (accelerate: fsdp_version: 2), '
            "or drop --fsdp and launch with `accelerate launch` (DDP)."
        )
    if (
        getattr(args, "fsdp", None)
        and str(getattr(args, "save_strategy", "no")).lower() not in ("no", "savestrategy.no")
        and (args.fsdp_config or {}).get("state_dict_type", "FULL_STATE_DICT")
        != "SHARDED_STATE_DICT"
    ):
        raise UnsupportedWrapperError(
            "under FSDP2 each rank holds the curvature of its own layers, and a FULL_STATE_DICT "
            "checkpoint (the Trainer's default) keeps rank 0's optimizer state only, so FOP "
            'could not resume from it: add "state_dict_type": "SHARDED_STATE_DICT" to '
            "--fsdp_config (torch.distributed.checkpoint), or --save_strategy no."
        )
    if str(getattr(args.parallel_mode, "value", "")) == "not_distributed":
        raise UnsupportedWrapperError(
            "with several GPUs and no distributed launch, the Trainer wraps the model in "
            "nn.DataParallel, which FOP does not support. Launch with `accelerate launch` or "
            "`torchrun` (DDP), or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
        )


def _fsdp_version(args: Any) -> int:
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("fsdp_version", config.get("version", 1)))


def sync_with_trainer(trainer: Trainer) -> None:
    """Tell FOP what the Trainer knows before each micro-batch: the micro-batches of this step
    (fewer at an epoch's end) and accelerate's loss scaler (fp16), which FOP needs to unscale
    the statistics its hooks gather. A no-op for other optimizers."""
    fop = unwrap_optimizer(trainer.optimizer)
    if not isinstance(fop, FOP):
        return
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    if steps:
        fop.gradient_accumulation_steps = int(steps)
    # accelerate's scaler when it has one; a scaler the user gave FOP is kept otherwise.
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None:
        fop.grad_scaler = scaler


def with_fop_statistics(trainer: Trainer, logs: dict[str, float]) -> dict[str, float]:
    """A training log entry plus FOP's last statistics (``fop/eta_mean``, ``fop/rho_mean``...),
    so they reach the progress bar, TensorBoard or any ``report_to``."""
    fop = unwrap_optimizer(trainer.optimizer)
    if isinstance(fop, FOP) and "loss" in logs:
        return {**logs, **{f"fop/{k}": round(v, 6) for k, v in fop.statistics().items()}}
    return logs


def needs_direct_build(trainer: Trainer) -> bool:
    """transformers < 5.2 would pass the Trainer's param groups to an Optimizer class, so FOP is
    built here instead of through the factory branch."""
    return trainer.optimizer is None and is_fop_optim(trainer.args) and not HAS_FACTORY_BRANCH


def create_fop_optimizer(trainer: Trainer, model: nn.Module | None = None) -> FOP:
    """Build FOP for a Trainer on any transformers release (used where no factory branch exists)."""
    check_supported_setup(trainer.args)
    optimizer = FOPFactory()(
        model if model is not None else trainer.model, **fop_settings_from_args(trainer.args)
    )
    trainer.optimizer = optimizer
    return optimizer


def reload_renamed_weights(model: nn.Module, checkpoint: str) -> bool:
    """Reload a checkpoint whose weight names differ from the model's (ViT in transformers 5.x
    saves legacy names that the Trainer's resume path does not map back, and silently keeps the
    fresh weights). ``from_pretrained`` knows the mapping. Returns whether weights were reloaded.
    """
    weights = Path(checkpoint) / "model.safetensors"
    if (
        not weights.is_file()
        or not hasattr(type(model), "from_pretrained")
        or hasattr(model, "peft_config")
    ):
        return False
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    if saved <= set(model.state_dict()):
        return False
    reloaded = type(model).from_pretrained(checkpoint, config=model.config)
    model.load_state_dict(reloaded.state_dict())
    return True


class FOPTrainer(Trainer):
    """A Trainer that accepts ``optim="fop"`` / ``"kfac"`` (see FOPTrainingArguments).

    - the optimizer comes from :class:`FOPFactory` through ``get_optimizer_cls_and_kwargs``
      (transformers >= 5.2) or ``create_optimizer`` (older releases);
    - gradient accumulation: the hooks gather curvature and g1 over every micro-batch and the
      optimizer steps once; the number of micro-batches of each step (fewer at an epoch's end)
      is passed on, so g1 is always the gradient of the first half of the step's examples;
    - gradient clipping (``max_grad_norm``) runs before ``step()`` as usual: it scales g_avg,
      and FOP's step is then exactly the clip factor times the unclipped FOP step (only the
      part of g1 that is F-orthogonal to g_avg matters);
    - the last step's FOP statistics (``fop/eta_mean``, ``fop/rho_mean``, ...) join every
      training log, so they reach the progress bar, TensorBoard or any ``report_to``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_supported_setup(self.args)
        settings = fop_settings_from_args(self.args) if is_fop_optim(self.args) else {}
        if settings.get("graft") == "none" and self.args.learning_rate == STOCK_LEARNING_RATE:
            logger.warning(
                "learning_rate is the stock AdamW default (5e-05), but with fop_graft='none' "
                "the preconditioned layers take the rotated step as it is, which usually wants "
                "3-10x AdamW's rate (set --learning_rate, and --fop_adamw_lr for embeddings and "
                "norms), or leave fop_graft at its default 'output'"
            )

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, Any]:
        if is_fop_optim(args):
            return FOPFactory, fop_settings_from_args(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if needs_direct_build(self):
            return create_fop_optimizer(self, *args)
        return super().create_optimizer(*args, **kwargs)

    def training_step(
        self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        sync_with_trainer(self)
        return super().training_step(model, inputs, *args, **kwargs)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_renamed_weights(model if model is not None else self.model, resume_from_checkpoint)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        super().log(with_fop_statistics(self, logs), *args, **kwargs)

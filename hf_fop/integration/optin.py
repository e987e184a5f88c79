"""``hf_fop.enable()``: let unmodified Hugging Face scripts take ``--optim fop``.

An explicit opt-in, process-wide: "fop" and "kfac" join transformers' OptimizerNames, and the
stock Trainer builds FOP for them (through its optimizer-handler table on transformers >= 5.2,
through ``get_optimizer_cls_and_kwargs`` / ``create_optimizer`` on older releases). FOP's
settings come from ``--optim_args "damping=0.02,curvature_interval=10"``.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainingArguments

from hf_fop.integration.arguments import register_optimizer_names
from hf_fop.integration.factory import FOPFactory
from hf_fop.integration.settings import (
    FOP_OPTIMIZERS,
    fop_settings_from_args,
    is_fop_optim,
    validate_fop_args,
)
from hf_fop.integration.trainer import (
    HAS_FACTORY_BRANCH,
    check_supported_setup,
    create_fop_optimizer,
    needs_direct_build,
    sync_with_trainer,
    with_fop_statistics,
)

_ENABLED = False


def enable() -> None:
    """Make the stock TrainingArguments, HfArgumentParser and Trainer accept "fop" and "kfac"."""
    global _ENABLED
    if _ENABLED:
        return
    register_optimizer_names()
    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    except ImportError:
        _OPTIMIZER_HANDLERS = None

    if _OPTIMIZER_HANDLERS is not None:
        for name in FOP_OPTIMIZERS:
            _OPTIMIZER_HANDLERS[name] = _handler
    else:
        stock_get = Trainer.get_optimizer_cls_and_kwargs

        def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
            if is_fop_optim(args):
                return FOPFactory, fop_settings_from_args(args)
            return stock_get(args, model)

        Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)

    stock_training_step = Trainer.training_step

    def training_step(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        sync_with_trainer(self)
        return stock_training_step(self, *args, **kwargs)

    Trainer.training_step = training_step

    stock_log = Trainer.log

    def log(self: Trainer, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        stock_log(self, with_fop_statistics(self, logs), *args, **kwargs)

    Trainer.log = log

    stock_post_init = TrainingArguments.__post_init__

    def post_init_with_fop_check(self: TrainingArguments) -> None:
        stock_post_init(self)
        validate_fop_args(self)

    TrainingArguments.__post_init__ = post_init_with_fop_check

    if not HAS_FACTORY_BRANCH:
        stock_create = Trainer.create_optimizer

        def create_optimizer(self: Trainer, *args: Any, **kwargs: Any) -> Any:
            if needs_direct_build(self):
                return create_fop_optimizer(self, *args)
            return stock_create(self, *args, **kwargs)

        Trainer.create_optimizer = create_optimizer
    _ENABLED = True


def _handler(context: Any) -> tuple[Any, dict[str, Any]]:
    check_supported_setup(context.args)
    return FOPFactory, fop_settings_from_args(context.args)

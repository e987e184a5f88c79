"""The optimizer factory the Trainer (and accelerate users) call with the model."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hf_fop.optimizer import FOP

logger = logging.getLogger("hf_fop")


def unwrap_for_fop(model: nn.Module) -> nn.Module:
    """The model accelerate prepared, without its DDP / compile / autocast wrappers."""
    try:
        from accelerate.utils import extract_model_from_parallel
    except ImportError:  # accelerate is optional; FOP unwraps DDP itself
        return model
    if type(model).__name__ in ("DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel"):
        return model  # FOP raises the clear error for these
    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


class FOPFactory:
    """Builds :class:`hf_fop.FOP` from a model, the way each transformers release asks for it.

    - transformers >= 5.2 instantiates a non-Optimizer class given in ``optimizer_cls_and_kwargs``
      (or returned by ``get_optimizer_cls_and_kwargs``) and calls it: ``FOPFactory()(model, **kw)``.
    - older releases call the class itself, ``FOPFactory(params, **kw)``, and hand over the
      model only when the kwargs hold ``"model": model`` (their LOMO path); then the class call
      returns the FOP optimizer directly.

    Passing ``{"model": model, ...}`` therefore works on every release. Nothing is cached: every
    call reads the model as it is now, so parameters that accelerate moved or replaced are the
    ones optimized.
    """

    def __new__(cls, *args: Any, **settings: Any) -> Any:
        if not args and not settings:
            return super().__new__(cls)
        return cls.build(*args, **settings)

    def __call__(self, *args: Any, **settings: Any) -> FOP:
        return self.build(*args, **settings)

    @staticmethod
    def build(*args: Any, **settings: Any) -> FOP:
        settings.pop("params", None)  # the Trainer's param groups: FOP makes its own
        model = settings.pop("model", None)
        if model is None and args and isinstance(args[0], nn.Module):
            model = args[0]
        if model is None:
            raise TypeError(
                "FOPFactory needs the model, not parameter groups: with transformers < 5.2 pass "
                "optimizer_cls_and_kwargs=(FOPFactory, {'model': model, ...})"
            )
        optimizer = FOP(unwrap_for_fop(model), **settings)
        # Stock scripts hide INFO logs: say at WARNING level that FOP is on and what it takes.
        logger.warning("hf-fop: %s\n  %s", optimizer.partition.summary(), optimizer.plan.totals())
        return optimizer

"""The optimizer factory the Trainer (and accelerate users) call with the model."""

from __future__ import annotations

from typing import Any

from torch import nn

from hf_fop.optimizer import FOP


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
    """Builds :class:`hf_fop.FOP` from a model: ``FOPFactory()(model, **settings)``.

    transformers (>= 5.2) instantiates a non-Optimizer class from ``optimizer_cls_and_kwargs`` or
    ``get_optimizer_cls_and_kwargs`` and calls it with the model, which FOP needs for its hooks.
    Nothing is cached: every call reads the model as it is now, so parameters that accelerate
    moved or replaced are the ones optimized.
    """

    def __call__(self, model: nn.Module, **settings: Any) -> FOP:
        settings.pop("params", None)  # the Trainer's param groups: FOP makes its own
        return FOP(unwrap_for_fop(model), **settings)

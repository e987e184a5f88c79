"""hf-fop: Fisher-Orthogonal Projection (K-FAC natural gradient plus a Fisher-orthogonal
correction) for PyTorch and the Hugging Face stack."""

from hf_fop.config import FOPConfig
from hf_fop.optimizer import FOP
from hf_fop.partition import Partition, UnsupportedWrapperError, partition_model
from hf_fop.plan import Plan, plan

__all__ = [
    "FOP",
    "FOPConfig",
    "FOPFactory",
    "FOPTrainer",
    "FOPTrainingArguments",
    "Partition",
    "Plan",
    "UnsupportedWrapperError",
    "enable",
    "partition_model",
    "plan",
]

_INTEGRATION = ("FOPFactory", "FOPTrainer", "FOPTrainingArguments", "enable")


def __getattr__(name: str) -> object:
    # The Hugging Face side imports transformers: loaded on first use only.
    if name in _INTEGRATION:
        from hf_fop import integration

        return getattr(integration, name)
    raise AttributeError(f"module 'hf_fop' has no attribute {name!r}")


__version__ = "0.12.3"

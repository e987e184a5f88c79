"""The Hugging Face integration: the only part of hf-fop that imports transformers."""

from hf_fop.integration.arguments import FOPTrainingArguments, register_optimizer_names
from hf_fop.integration.factory import FOPFactory
from hf_fop.integration.optin import enable
from hf_fop.integration.settings import fop_settings_from_args, parse_optim_args
from hf_fop.integration.trainer import FOPTrainer

__all__ = [
    "FOPFactory",
    "FOPTrainer",
    "FOPTrainingArguments",
    "enable",
    "fop_settings_from_args",
    "parse_optim_args",
    "register_optimizer_names",
]

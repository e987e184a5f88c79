"""From Hugging Face training arguments to FOP settings: typed fields and ``optim_args``."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from hf_fop.config import FOPConfig

FOP_OPTIMIZERS = ("fop", "kfac")
FIELD_PREFIX = "fop_"


def optim_name(args: Any) -> str:
    optim = getattr(args, "optim", "")
    return str(getattr(optim, "value", optim))


def is_fop_optim(args: Any) -> bool:
    return optim_name(args) in FOP_OPTIMIZERS


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"damping=0.02,curvature_interval=10,targets=all-linear"`` -> typed FOP settings.

    Each value is converted to the type of the FOPConfig field it names, so a typo or a bad value
    fails here with the list of valid names rather than deep inside the optimizer.
    """
    if not text:
        return {}
    hints = typing.get_type_hints(FOPConfig)
    settings: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(
                f"optim_args item {item!r} is not NAME=VALUE with NAME one of "
                f"{sorted(hints)}; separate items with commas"
            )
        settings[key] = _convert(raw, hints[key], key)
    return settings


def _convert(raw: str, hint: Any, key: str) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if raw.lower() == "none" and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option)
        try:
            if option is bool:
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                continue
            if option in (int, float):
                return option(raw)
            if origin is tuple:
                return tuple(float(v) for v in raw.split(":"))
            if origin is typing.Literal or option is str:
                return raw
            if origin is not None:  # Sequence[str]: module names separated by ':'
                return tuple(raw.split(":"))
        except ValueError:
            continue
    raise ValueError(f"optim_args: {key}={raw!r} is not a valid {hint}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)


def fop_settings_from_args(args: Any) -> dict[str, Any]:
    """The FOP keyword arguments a Trainer run asks for.

    The AdamW settings a user already has carry over to both sides: ``learning_rate``,
    ``weight_decay``, ``adam_beta1`` (FOP's momentum), ``adam_beta2`` and ``adam_epsilon`` (the
    grafting norm and the fallback). ``fop_*`` fields (FOPTrainingArguments) set the rest, and
    ``optim_args`` overrides everything.
    """
    settings: dict[str, Any] = {
        "mode": optim_name(args),
        "lr": args.learning_rate,
        "momentum": args.adam_beta1,
        "weight_decay": args.weight_decay,
        "adamw_betas": (args.adam_beta1, args.adam_beta2),
        "adamw_eps": args.adam_epsilon,
        "adamw_weight_decay": args.weight_decay,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }
    names = {f.name for f in dataclasses.fields(FOPConfig)}
    for field in dataclasses.fields(args):
        if field.name.startswith(FIELD_PREFIX):
            name = field.name[len(FIELD_PREFIX) :]
            value = getattr(args, field.name)
            if name in names and value is not None:
                if name == "skip":
                    value = [v for v in value.split(",") if v]
                elif name == "targets":
                    value = _split_list(value)
                settings[name] = value
    settings.update(parse_optim_args(getattr(args, "optim_args", None)))
    return settings


def _split_list(value: Any) -> Any:
    """``"query,value"`` names a list of modules; a single string stays a keyword or a regex."""
    if isinstance(value, str) and "," in value:
        return [v for v in value.split(",") if v]
    return value


def validate_fop_args(args: Any) -> None:
    """Fail while the arguments are parsed, not when training starts, for bad FOP settings."""
    if is_fop_optim(args):
        FOPConfig(**fop_settings_from_args(args))

"""FOP's torch param groups: one ``kind="fop"`` group for the preconditioned layers, and AdamW
groups (decay / no decay) for every other trainable parameter. Every group has ``lr``, so any LR
scheduler drives all of them."""

from __future__ import annotations

from typing import Any

from hf_fop.config import FOPConfig
from hf_fop.partition import Partition


def param_indices(groups: list[dict[str, Any]]) -> dict[int, int]:
    """Parameter id -> its index in a state_dict (torch numbers parameters across groups)."""
    params = [p for group in groups for p in group["params"]]
    return {id(p): index for index, p in enumerate(params)}


def adamw_defaults(config: FOPConfig) -> dict[str, Any]:
    """The settings of an AdamW group (torch's defaults for groups added later)."""
    return {
        "lr": config.fallback_lr,
        "betas": tuple(config.adamw_betas),
        "eps": config.adamw_eps,
        "weight_decay": config.adamw_weight_decay,
    }


def param_groups(partition: Partition, config: FOPConfig) -> list[dict[str, Any]]:
    """The groups of ``partition``; an error that says what to do when nothing is trainable."""
    groups: list[dict[str, Any]] = []
    if partition.layers:
        groups.append(
            {
                "params": [p for _, layer in partition.layers for p in layer.params],
                "kind": "fop",
                # Saved with the group, so a checkpoint of other layers fails at load by name.
                "layers": [name for name, _ in partition.layers],
                "lr": config.lr,
                # (momentum, second-moment decay of the grafting norm), under the name torch's
                # cyclic schedulers drive (OneCycleLR, CyclicLR with cycle_momentum).
                "betas": (config.momentum, config.adamw_betas[1]),
                "weight_decay": config.weight_decay,
                "damping": config.damping,
                "kl_clip": config.kl_clip,
                "step": 0,
            }
        )
    for params, decay in (
        (partition.adamw_decay, config.adamw_weight_decay),
        (partition.adamw_no_decay, 0.0),
    ):
        if params:
            groups.append(
                {
                    **adamw_defaults(config),
                    "params": [p for _, p in params],
                    "kind": "adamw",
                    "weight_decay": decay,
                }
            )
    if not groups:
        raise ValueError(
            "the model has no trainable parameters, so there is nothing to optimize: set "
            "requires_grad=True on the parameters to train (or check the PEFT config)"
        )
    return groups

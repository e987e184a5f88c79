"""FOP's checkpoint layout: torch's optimizer state_dict, complete, with each layer's curvature
nested in its weight's state (``state[weight]["curvature"]``), as Distributed Shampoo nests its
preconditioners. FOP's ``state_dict`` and ``load_state_dict`` are torch's; its state-dict hooks
call the functions here.

Why the curvature is nested at save time instead of living in ``optimizer.state``: a bucket
keeps its layers' curvature stacked (one allocation, for batched decompositions), so per-layer
entries of ``optimizer.state`` would be views of the whole stack; a checkpoint holds copies,
each layer once.

Why this layout: torch.distributed.checkpoint (DCP, and so accelerate's and the Trainer's FSDP2
checkpoints) keeps only ``state`` and ``param_groups``, keyed by parameter name, and loads in
place into the state_dict of a fresh optimizer (after a step at lr 0 on zero gradients, which
makes FOP create its per-parameter state, as torch's optimizers do). So each layer's curvature
is there from the start (zeros and counters at 0), the moments of sharded parameters are
DTensors, and a layer's curvature appears only on the rank that holds it (DCP saves each key
once and any rank can read it back). The FOP param group carries the layer
names, so a checkpoint of other layers fails at load naming the layer.

Two older layouts still load: curvature by layer name under a top-level ``"curvature"`` key,
and release 0.1's flat keys in each weight's state.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_fop.curvature import EigenPreconditioner

CURVATURE = "curvature"
# The FOP group's settings that a checkpoint does not override (the optimizer's own win).
OWN_SETTINGS = ("damping", "kl_clip")

# Release 0.1's per-layer curvature keys, kept flat in each layer weight's optimizer state.
LEGACY_KEYS = frozenset(
    (
        "A",
        "G",
        "factor_updates",
        "graft_exp_avg_sq",
        *EigenPreconditioner.STATE_KEYS,
        *("A_damped", "G_damped", "A_inv", "G_inv"),  # method="inverse", retired in 0.6
    )
)


def saved_keys(
    saved_groups: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]]
) -> dict[int, Hashable]:
    """Parameter id -> its key in a saved ``state`` (an index, or a name under DCP), matched by
    position in the param groups as torch's ``load_state_dict`` matches them."""
    return {
        id(param): key
        for saved, group in zip(saved_groups, groups)
        for key, param in zip(saved["params"], group["params"])
    }


def nest_curvature(
    state: dict[Hashable, dict[str, Any]],
    weight_keys: dict[str, Hashable],
    curvature: dict[str, dict[str, Any]],
) -> None:
    """Put each layer's curvature into its weight's entry of ``state`` (new dicts: the entries
    of torch's state_dict are the optimizer's own)."""
    for name, layer_state in curvature.items():
        key = weight_keys[name]
        state[key] = {**state.get(key, {}), CURVATURE: layer_state}


def take_curvature(
    state_dict: dict[str, Any], weight_keys: dict[str, Hashable]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a saved optimizer state_dict of any layout into (torch's part, curvature by layer
    name). ``state_dict`` is left as it was."""
    state_dict = dict(state_dict)
    state = dict(state_dict["state"])
    state_dict["state"] = state
    if CURVATURE in state_dict:  # by layer name, top level
        return state_dict, state_dict.pop(CURVATURE)
    nested = any(CURVATURE in state.get(key, {}) for key in weight_keys.values())
    names = {CURVATURE} if nested else LEGACY_KEYS
    # Release 0.1 saved nothing for a layer before its first curvature step: it starts fresh.
    curvature: dict[str, dict[str, Any]] = {} if nested else {name: {} for name in weight_keys}
    for name, key in weight_keys.items():
        entry = state.pop(key, None)
        if entry is None:
            continue
        taken = {k: v for k, v in entry.items() if k in names}
        if taken:
            curvature[name] = taken[CURVATURE] if nested else taken
        rest = {k: v for k, v in entry.items() if k not in names}
        if rest:  # (an entry of curvature alone: torch's loader would create empty state)
            state[key] = rest
    return state_dict, curvature


def saved_layer_names(state_dict: dict[str, Any]) -> list[str] | None:
    """The layers the checkpoint's optimizer preconditioned, where its FOP group says."""
    group = next((g for g in state_dict["param_groups"] if g.get("kind") == "fop"), {})
    return group.get("layers")


@dataclass
class PendingLoad:
    """What FOP's load pre-hook took from a checkpoint, for its post-hook once torch has
    loaded the rest: the curvature by layer name, the saved per-parameter state, the saved keys
    by parameter id, and the FOP group's own settings as they were before the load."""

    curvature: dict[str, dict[str, Any]]
    saved_state: dict[Hashable, dict[str, Any]]
    keys: dict[int, Hashable]
    settings: dict[str, Any]


def keep_own_settings(
    group: dict[str, Any], state: dict[Tensor, dict[str, Any]], loading: PendingLoad
) -> None:
    """After torch's load into the FOP group: the damping and KL clip the group had win over
    the checkpoint's (with a warning), and the preconditioned layers' moving average is fp32
    again (torch casts floating state to the parameter's dtype)."""
    for key, own in loading.settings.items():
        if group[key] != own:
            warnings.warn(
                f"the checkpoint's {key}={group[key]} is replaced by this optimizer's {key}={own}",
                # here <- FOP._load_curvature <- torch's load_state_dict <- its dynamo
                # wrapper <- the caller
                stacklevel=6,
            )
            group[key] = own
    for param in group["params"]:
        saved = loading.saved_state.get(loading.keys[id(param)], {})
        if "exp_avg" in saved:
            state[param]["exp_avg"] = saved["exp_avg"].to(param.device, torch.float32)

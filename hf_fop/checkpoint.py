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

The two older layouts (curvature by layer name under a top-level ``"curvature"`` key, and
release 0.1's flat keys in each weight's state) were written while the momentum came after the
preconditioner, a state release 0.6 no longer has: loading one fails saying so.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

CURVATURE = "curvature"
# The FOP group's settings that a checkpoint does not override (the optimizer's own win).
OWN_SETTINGS = ("damping", "kl_clip")

# Release 0.1's per-layer curvature keys, kept flat in each layer weight's optimizer state.
LEGACY_KEYS = frozenset(("A", "G", "factor_updates", "A_damped", "eigvecs_A"))
OLDER_LAYOUT = (
    "this checkpoint is in an older layout (curvature by layer name, or flat in each weight's "
    "state), written while FOP's momentum came after the preconditioner; release 0.6 keeps it "
    "before, so the run cannot continue exactly. Resume it with hf-fop 0.5 (git tag v0.5.0, "
    "commit 631596d), or load the model's weights alone and start FOP fresh."
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


def mark_stateless(state: dict[Hashable, dict[str, Any]], keys: Sequence[Hashable]) -> None:
    """An empty entry for each of ``keys`` without one: a preconditioned layer's bias keeps no
    state of its own (its momentum and curvature are nested with its weight), yet
    torch.distributed.checkpoint's strict load wants an entry for every trained parameter."""
    for key in keys:
        state.setdefault(key, {})


def take_curvature(
    state_dict: dict[str, Any], weight_keys: dict[str, Hashable]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a saved optimizer state_dict of any layout into (torch's part, curvature by layer
    name). ``state_dict`` is left as it was."""
    state_dict = dict(state_dict)
    # Empty entries (mark_stateless) are not torch's to load: they would key state by the
    # parameters of a load made before sharding.
    state = {key: entry for key, entry in state_dict["state"].items() if entry}
    state_dict["state"] = state
    entries = [state.get(key, {}) for key in weight_keys.values()]
    if CURVATURE in state_dict or any(LEGACY_KEYS & entry.keys() for entry in entries):
        raise ValueError(OLDER_LAYOUT)
    curvature: dict[str, dict[str, Any]] = {}
    for name, key in weight_keys.items():
        entry = state.pop(key, None)
        if entry is None:
            continue
        if CURVATURE in entry:
            curvature[name] = entry[CURVATURE]
        rest = {k: v for k, v in entry.items() if k != CURVATURE}
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
    loaded the rest: the curvature by layer name and the FOP group's own settings as they were
    before the load."""

    curvature: dict[str, dict[str, Any]]
    settings: dict[str, Any]


def keep_own_settings(group: dict[str, Any], loading: PendingLoad) -> None:
    """After torch's load into the FOP group: the damping and KL clip the group had win over
    the checkpoint's (with a warning)."""
    for key, own in loading.settings.items():
        if group[key] != own:
            warnings.warn(
                f"the checkpoint's {key}={group[key]} is replaced by this optimizer's {key}={own}",
                # here <- FOP._load_curvature <- torch's load_state_dict <- its dynamo
                # wrapper <- the caller
                stacklevel=6,
            )
            group[key] = own

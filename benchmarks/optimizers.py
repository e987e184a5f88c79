"""Every optimizer the benchmarks compare, built one way, from its own library.

Peers are taken as their users run them, never re-implemented:

- ``muon``: ``torch.optim.Muon`` (Nesterov, ``adjust_lr_fn="match_rms_adamw"`` so AdamW's
  learning rate applies, weight decay as AdamW's) on the 2-D weights of the layers FOP
  preconditions (the Linear layers inside the blocks; in a model without blocks, every Linear
  but the output layer), AdamW on everything else, as torch's documentation prescribes.
- ``soap``: heavyball's ``SOAP`` on every parameter (it runs Adam on 1-D tensors and leaves
  sides longer than ``max_precond_dim`` unrotated), with torch.compile off: on a CPU its
  compiled kernels cost more than they save. heavyball reads every key of a param group as a
  setting, so nothing here adds keys to its groups; learning rates move through ``lr`` only.

K-FAC and FOP are this project's optimizer: ``kfac`` / ``fop`` with its defaults, and the
variants of ``VARIANTS`` (release 0.2's settings, then the metric, where the momentum enters,
grafting, the factors' source), each once without (``kfac...``) and once with (``fop...``) FOP's
correction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_fop import FOP, partition_model
from hf_fop.config import KRONECKER_SETTINGS

PEER_NAMES = {"sgd": "SGD", "adamw": "AdamW", "muon": "Muon", "soap": "SOAP"}

# The preconditioned variants: (label, FOP settings). ``kfac`` / ``fop`` run the defaults; the
# ladder's variants are steps from release 0.2's metric toward them, so the ablation reads as a
# ladder (its rungs with the momentum after the preconditioner left the code in release 0.6;
# tag v0.5.0 keeps them). "_mb": the Kronecker metric, grafted onto AdamW, the blocks' layers
# only, with the momentum before the preconditioner (Adam's and SOAP's order); the
# eigen-corrected ones (``curvature="eigen_corrected"``) replace K-FAC's product of eigenvalues by
# the rotated gradient's second moment to the power 1 (EK-FAC) or 1/2 (SOAP-style), damped by
# 0.01 of its mean. ``_eigenadam`` is Adam in the K-FAC eigenbasis, run SOAP's way on every
# layer: K-FAC's factors every step, the basis refreshed every 2 steps by power iteration and
# QR, the exponent 1/2 with Adam's eps as absolute damping, beta2 0.95, no grafting (the
# direction is the step), and every Linear/Conv layer and embedding preconditioned (heads and a
# tied vocabulary included); it differs from the defaults in AdamW's beta2 only (and in blocking,
# which none of the benchmark models reaches). ``_soap`` is the same in SOAP's own basis:
# Kronecker factors of the gradient (g g^T, g^T g).
_EIGEN_CORRECTED = {"curvature": "eigen_corrected", "damping": 0.01}
_EIGEN_ADAM = {
    **_EIGEN_CORRECTED,
    "exponent": 0.5,
    "damping": 1e-8,
    "damping_mode": "absolute",
    "graft": "none",
    "curvature_interval": 1,
    "inverse_interval": 2,
    "basis_refresh": "qr",
    "adamw_betas": (0.9, 0.95),
    "targets": "all-linear",
    "precondition_embeddings": True,
}
_STEPS: dict[str, tuple[str, dict[str, Any]]] = {
    "_mb": (", momentum before", {}),
    "_ekfac_mb": (", eigen-corrected ^1, momentum before", _EIGEN_CORRECTED),
    "_sqrt_mb": (
        ", eigen-corrected ^1/2, momentum before",
        {**_EIGEN_CORRECTED, "exponent": 0.5},
    ),
    "_eigenadam": (", Adam in its eigenbasis, every layer", _EIGEN_ADAM),
    "_soap": (
        ", Adam in SOAP's basis, every layer",
        {**_EIGEN_ADAM, "factor_source": "gradient"},
    ),
}
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "": (", defaults", {}),
    # The previous defaults: the rotated step as it is, not grafted by output change.
    "_ungrafted": (", defaults, not grafted", {"graft": "none"}),
    # Release 0.8's defaults: the output graft unbounded, however large the step grows against
    # the layer's weights.
    "_graft_unbounded": (", release 0.8 (graft unbounded)", {"graft_trust": None}),
    # The defaults with a relative eps of 1e-2 in the eigenbasis instead of Adam's absolute one:
    # less movement from round-off (benchmarks.roundoff), 0.5% of perplexity on the decoders.
    "_relative": (", defaults, relative damping", {"damping": 1e-2, "damping_mode": "relative"}),
    # The eigen-corrected metric shared over clusters of nearly equal eigenvalues instead of one
    # per rotated coordinate: fp32 eigh's pick inside a cluster no longer becomes movement.
    # (A gap of 1e-5 merges the null space below 1e-6 of the largest anyway.)
    "_clustered": (
        ", defaults, metric shared over eigenvalue clusters",
        {"cluster_gap": 1e-5, "null_space_floor": 0.0},
    ),
    # Release 0.7's defaults: the metric per coordinate in the factors' null space too.
    "_per_coordinate": (", release 0.7 (metric per coordinate)", {"null_space_floor": 0.0}),
    # The defaults with the embeddings (and a tied head) left to AdamW: what preconditioning a
    # large vocabulary costs and buys.
    "_embeddings_adamw": (
        ", defaults, embeddings on AdamW",
        {"precondition_embeddings": False},
    ),
    # The defaults with G from at most 512 rows of a layer call (A keeps 1,024).
    "_g512": (", defaults, G from 512 rows", {"output_factor_rows": 512}),
    # The defaults with A and G each from at most 512 rows of a layer call.
    "_rows512": (
        ", defaults, A and G from 512 rows",
        {"factor_rows": 512, "output_factor_rows": 512},
    ),
    # Release 0.10's defaults: A and G each from at most 2,048 rows of a layer call.
    "_rows2048": (
        ", release 0.10 (A and G from 2,048 rows)",
        {"factor_rows": 2048, "output_factor_rows": 2048},
    ),
    # The defaults with every activation row in the factors (release 0.4), not 2,048 per call.
    "_allrows": (
        ", defaults, every row in the factors",
        {"factor_rows": None, "output_factor_rows": None},
    ),
    # The defaults with every basis refresh a full eigh instead of the power step and QR.
    "_eigh": (", defaults, eigh refresh", {"basis_refresh": "eigh"}),
    # The defaults with SOAP's factors (g g^T, g^T g of the layer's gradient) instead of K-FAC's.
    "_gradient": (", defaults, gradient factors", {"factor_source": "gradient"}),
    # The defaults with the activation factors gathered every 2nd / 4th step (the basis refreshed
    # every 2nd / 4th): the factor products, the defaults' main cost, on fewer steps.
    "_factors2": (", defaults, factors every 2 steps", {"curvature_interval": 2}),
    # The defaults with the basis refreshed every 4th step (factors still every step).
    "_basis4": (", defaults, basis every 4 steps", {"inverse_interval": 4}),
    "_factors4": (
        ", defaults, factors every 4 steps",
        {"curvature_interval": 4, "inverse_interval": 4},
    ),
    **{
        suffix: (label, {**KRONECKER_SETTINGS, **settings})
        for suffix, (label, settings) in _STEPS.items()
    },
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    f"{mode}{suffix}": (f"{mode_label}{label}", {"mode": mode, **settings})
    for suffix, (label, settings) in _VARIANTS.items()
    for mode, mode_label in (("kfac", "K-FAC"), ("fop", "FOP"))
}
NAMES = {**PEER_NAMES, **{name: label for name, (label, _) in VARIANTS.items()}}

WEIGHT_DECAY = 0.01


class OptimizerPair(torch.optim.Optimizer):
    """Two optimizers stepped as one, so one LR scheduler and one training loop drive both.

    ``param_groups`` are the inner optimizers' own group dicts, so a scheduler that sets
    ``group["lr"]`` sets theirs.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [group for o in optimizers for group in o.param_groups]
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}


def muon_weights(model: nn.Module) -> list[nn.Parameter]:
    """The hidden matrices Muon is meant for: the 2-D weights of the layers FOP takes."""
    layers = [(name, adapter) for name, adapter in partition_model(model).layers]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    output_layer = linear[-1] if linear else None
    return [
        p
        for name, adapter in layers
        if name != output_layer
        for p in adapter.params
        if p.dim() == 2
    ]


def make_muon(model: nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY) -> OptimizerPair:
    hidden = muon_weights(model)
    taken = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    muon = torch.optim.Muon(
        hidden, lr=lr, weight_decay=weight_decay, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    return OptimizerPair(muon, torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay))


def make_soap(
    model: nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY
) -> torch.optim.Optimizer:
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # eager on the CPU
    return heavyball.SOAP(model.parameters(), lr=lr, weight_decay=weight_decay)


def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    damping: float | None = None,
    weight_decay: float = WEIGHT_DECAY,
    **fop_settings: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` at ``lr`` (K-FAC/FOP: ``damping`` and other settings too).

    ``weight_decay`` is the decoupled decay of AdamW, Muon and SOAP, and that of FOP's
    preconditioned layers (FOP's AdamW side keeps its default, which is the same 0.01)."""
    settings = {**fop_settings, "weight_decay": weight_decay}
    if damping is not None:
        settings["damping"] = damping
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "muon":
        return make_muon(model, lr, weight_decay)
    if name == "soap":
        return make_soap(model, lr, weight_decay)
    if name in VARIANTS:
        return FOP(model, lr=lr, **{**VARIANTS[name][1], **settings})
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(NAMES)}")

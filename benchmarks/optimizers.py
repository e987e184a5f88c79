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

K-FAC and FOP are this project's optimizer with its defaults (``mode="kfac"`` / ``"fop"``); the
``CORRECTED`` names are the same with ``curvature="eigen_corrected"`` (not yet measured).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_fop import FOP, partition_model

NAMES = {
    "sgd": "SGD",
    "adamw": "AdamW",
    "muon": "Muon",
    "soap": "SOAP",
    "kfac": "K-FAC",
    "fop": "FOP",
    "fop_nograft": "FOP, no graft",
    # The eigenvalue-corrected metric (FOP's curvature="eigen_corrected"): exponent 1 (EK-FAC)
    # and 1/2 (SOAP-style), each without and with FOP's correction.
    "ekfac": "K-FAC, eigen-corrected",
    "fop_ekfac": "FOP, eigen-corrected",
    "kfac_sqrt": "K-FAC, eigen-corrected ^1/2",
    "fop_sqrt": "FOP, eigen-corrected ^1/2",
}
CORRECTED = {
    "ekfac": ("kfac", 1.0),
    "fop_ekfac": ("fop", 1.0),
    "kfac_sqrt": ("kfac", 0.5),
    "fop_sqrt": ("fop", 0.5),
}
SECOND_ORDER = ("kfac", "fop", "fop_nograft", *CORRECTED)
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
    if name == "fop_nograft":
        return FOP(model, lr=lr, graft="none", adamw_lr=1e-3, **settings)
    if name in ("kfac", "fop"):
        return FOP(model, mode=name, lr=lr, **settings)
    if name in CORRECTED:
        mode, exponent = CORRECTED[name]
        return FOP(
            model, mode=mode, lr=lr, curvature="eigen_corrected", exponent=exponent, **settings
        )
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(NAMES)}")

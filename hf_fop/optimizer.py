"""``hf_fop.FOP``: K-FAC natural gradient plus the Fisher-orthogonal correction, in one optimizer.

``step()`` is a short pipeline (the update of a preconditioned layer is fop_update.py's, the
curvature model_curvature.py's, one layer shape's state bucket.py's, what each rank holds and
shares the distributors', the parameter updates update_rules.py's):
1. gather what the hooks saw (factor estimates on curvature steps, g1 in FOP mode), averaged
   across ranks in one all-reduce, and undo a loss scale;
2. a device flag: is every gradient and statistic finite? What the step computes is kept only
   where it holds, so a bad step changes nothing, and the host reads it later
   (pending_verdict.py);
3. refresh the curvature: fold the estimates in, decompose where due (batched per layer shape);
4. the directions: eta * M^-1 (m + beta g_perp) per layer (M^-1 m in K-FAC mode), m the
   moving average of the gradient, M the metric in the Kronecker eigenbasis; grafted where
   asked (fop_update); a KL-norm clip;
5. the updates: decoupled weight decay and the step on the preconditioned layers, AdamW on
   the rest.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import hf_fop.checkpoint as checkpoint
from hf_fop.bucket_data import BucketStatistics
from hf_fop.config import FOPConfig
from hf_fop.distributed import Communicator
from hf_fop.distributors.sharded import follow_sharded_parameters, local_gradients, local_tensor
from hf_fop.fop_math import kl_clip_scale
from hf_fop.layers import LayerAdapter
from hf_fop.mixed_precision import (
    loss_scale,
    report_skipped_step,
    step_verdict,
    unscale_and_check,
    unscale_statistics,
    unscaled_ratio,
)
from hf_fop.model_curvature import ModelCurvature, float_statistics
from hf_fop.param_groups import adamw_defaults, param_groups, param_indices
from hf_fop.partition import configured_partition, unwrap_model
from hf_fop.pending_verdict import DecidedAtFirstUse, PendingVerdict
from hf_fop.plan import plan_partition
from hf_fop.update_rules import adamw_step, preconditioned_step, take_empty_step

logger = logging.getLogger("hf_fop")

# An unannounced loss scale is looked for during the first steps only.
UNSCALED_CHECK_STEPS = 10


class FOP(torch.optim.Optimizer):
    """Fisher-Orthogonal Projection (Lu & Armour, AAAI-26) for the layers of ``model``.

    Args:
        model: the model to train (plain, or wrapped by DDP / accelerate). Hooks are put on its
            preconditioned layers, so build the optimizer before training starts.
        config: an :class:`FOPConfig`; keyword arguments override its fields.

    Param groups: one ``kind="fop"`` group with the preconditioned layers and one or two
    ``kind="adamw"`` groups (decay / no decay). Every group has ``lr``, so any LR scheduler
    drives all of them. The FOP group's ``damping`` and ``kl_clip`` are the step's settings.

    Checkpoints: torch's ``state_dict`` / ``load_state_dict``, with each layer's curvature
    (complete from the start) nested in its weight's state, the layout
    torch.distributed.checkpoint needs (checkpoint.py). Loading keeps torch's semantics (the
    checkpoint's lr, betas and weight decay win, so schedules resume) except for the FOP
    group's damping and KL clip: this optimizer's win, with a warning when they differ. A
    checkpoint of another model fails at load, naming the layer, before anything is loaded.
    """

    # GradScaler.step then calls step() itself, with grad_scale and found_inf set, so that FOP
    # can unscale what its hooks gathered (mixed_precision.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        config: FOPConfig | None = None,
        *,
        communicator: Communicator | None = None,
        grad_scaler: Any | None = None,
        **settings: Any,
    ) -> None:
        config = (config or FOPConfig()).replace(**settings)
        model = unwrap_model(model)
        partition = configured_partition(model, config)
        super().__init__(param_groups(partition, config), adamw_defaults(config))
        self.config = config
        self.partition = partition
        self.communicator = communicator or Communicator()
        # The torch.amp.GradScaler scaling the loss, if any (see mixed_precision.py).
        self.grad_scaler = grad_scaler
        # To find the parameters again if the model is sharded (FSDP2) after this point.
        self._model = weakref.ref(model)
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self.curvature = ModelCurvature(
            model, partition.layers, config, self.communicator, partition.uncovered
        )
        self.capture.accumulation_steps = config.gradient_accumulation_steps
        self._last_stats: dict[str, Tensor | float] = {}
        self._verdict = PendingVerdict()
        self._loading: checkpoint.PendingLoad | None = None
        self.register_state_dict_pre_hook(FOP._prepare_checkpoint)
        self.register_state_dict_post_hook(FOP._nest_curvature)
        self.register_load_state_dict_pre_hook(FOP._take_curvature)
        self.register_load_state_dict_post_hook(FOP._load_curvature)
        self._arm_capture()
        logger.info(partition.summary())
        # What this optimizer holds and costs (hf_fop.plan), for logs and for the user.
        self.plan = plan_partition(model, partition, config)
        logger.info(self.plan.totals())

    # ----------------------------------------------------------------------------------- public

    @property
    def layers(self) -> list[LayerAdapter]:
        return self.curvature.layers

    @property
    def layer_names(self) -> list[str]:
        """The preconditioned layers' names, in the order of ``layers``."""
        return self.curvature.names

    @property
    def capture(self) -> Any:
        """The hooks' per-step statistics (``CurvatureCapture``)."""
        return self.curvature.capture

    @property
    def gradient_accumulation_steps(self) -> int | None:
        """Micro-batches per step (None: learned from the previous step)."""
        return self.capture.accumulation_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int | None) -> None:
        self.capture.accumulation_steps = steps

    @property
    def fop_group(self) -> dict[str, Any] | None:
        return next((g for g in self.param_groups if g["kind"] == "fop"), None)

    def statistics(self) -> dict[str, float]:
        """The last step's FOP statistics as plain floats, for logging (reading them syncs)."""
        self._verdict.settle()
        return float_statistics(self._last_stats)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The hooks' statistics belong to the gradients in p.grad: cleared together.
        super().zero_grad(set_to_none=set_to_none)
        self.capture.reset()

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (for example before reusing the model)."""
        self.capture.remove()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._verdict.settle()  # the last step's flag: waits, if at all, for that step only
        self._follow_sharding()
        if self.curvature.is_empty_step(local_gradients(self.param_groups)):
            take_empty_step(self.param_groups, self.state)
        else:
            self._step()
        self.curvature.reset()
        if self._verdict.known():
            self._verdict.settle()
        self._arm_capture()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Parameters added after construction join the AdamW side (torch's defaults apply)."""
        if "kind" not in param_group:
            param_group = {**param_group, "kind": "adamw"}
        elif param_group["kind"] == "fop" and any(g["kind"] == "fop" for g in self.param_groups):
            raise ValueError(
                "FOP preconditions the layers it found when it was built; parameters added later "
                "join the AdamW side (leave out 'kind'). Build a new FOP to precondition more layers."
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------ checkpoint
    # state_dict() and load_state_dict() are torch's own; these hooks, registered in __init__,
    # nest each layer's curvature in its weight's state and take it out again (checkpoint.py).

    def _prepare_checkpoint(self) -> None:
        """Before torch saves or loads: the last step's verdict is in, the sharding followed."""
        self._verdict.settle()
        self._follow_sharding()

    def _nest_curvature(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        indices = param_indices(self.param_groups)
        weights = self._weight_keys(indices)
        checkpoint.nest_curvature(state_dict["state"], weights, self.curvature.state_dict())
        group = self.fop_group
        if group is not None:  # an entry for each: DCP's strict load asks for one
            own = [indices[id(p)] for p in group["params"] if p.requires_grad]
            checkpoint.mark_stateless(state_dict["state"], own)
        return state_dict

    def _take_curvature(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """torch's part of ``state_dict`` for torch to load; the curvature (checked against
        these layers first, so a mismatch loads nothing) waits for ``_load_curvature``."""
        self._prepare_checkpoint()
        keys = checkpoint.saved_keys(state_dict["param_groups"], self.param_groups)
        torch_state, curvature = checkpoint.take_curvature(state_dict, self._weight_keys(keys))
        self.curvature.check_state_dict(curvature, checkpoint.saved_layer_names(state_dict))
        group = self.fop_group
        settings = {key: group[key] for key in checkpoint.OWN_SETTINGS} if group else {}
        self._loading = checkpoint.PendingLoad(curvature, settings)
        return torch_state

    def _weight_keys(self, keys: dict[int, Hashable]) -> dict[str, Hashable | None]:
        """Each preconditioned layer's name -> its weight's key in a state_dict (``keys``: by
        parameter id; None where the checkpoint lacks the weight)."""
        return {n: keys.get(id(x.weight)) for n, x in zip(self.layer_names, self.layers)}

    def _load_curvature(self) -> None:
        loading, self._loading = self._loading, None
        assert loading is not None, "torch runs _take_curvature first"
        self.curvature.load_state_dict(loading.curvature)
        if self.fop_group is not None:
            checkpoint.keep_own_settings(self.fop_group, loading)
        self._arm_capture()

    # --------------------------------------------------------------------------------- internal

    def _arm_capture(self) -> None:
        """Tell the hooks what the coming backward passes must gather."""
        group = self.fop_group
        step = group["step"] if group is not None else 0
        interval = self.config.curvature_interval
        due: bool | DecidedAtFirstUse = step % interval == 0
        if self._verdict.pending:  # the last step may yet be found skipped, and repeated
            due = DecidedAtFirstUse(self._verdict, bool(due), (step - 1) % interval == 0)
        # factor_source="gradient": the factors come from the gradients, not from the hooks.
        self.capture.collect_factors = due if self.config.factor_source == "activations" else False
        self.capture.collect_first_half = self.config.wants_halves
        self.capture.factor_rows = self.config.factor_rows
        self.capture.output_factor_rows = self.config.output_factor_rows
        self.capture.row_offset = step // interval

    def _step(self) -> None:
        """Steps 1-5 of the module docstring, on a batch that reached the model."""
        group = self.fop_group
        # GradScaler.step sets these: S while p.grad is still scaled, and its overflow flag.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grads = local_gradients(self.param_groups)
        overflow = unscale_and_check(grads, grad_scale)
        if overflow is not None:
            self.curvature.distributor.agree_overflow(overflow)
        statistics, gradients, unscaled = self._gather(group, grad_scale)
        tensors = [t for s in statistics for t in s.tensors()]
        verdict = step_verdict(tensors, overflow, found_inf, grads[0].device, unscaled)
        ok = verdict[0].bool()
        undo = partial(self._undo, self.curvature.host_counters(group), self._last_stats)
        if group is not None:
            self._precondition(group, statistics, gradients, ok)
        for adamw_group in self.param_groups:
            if adamw_group["kind"] == "adamw":
                adamw_step(adamw_group, self.state, ok, local_tensor)
        self._verdict.record(verdict, undo)

    def _gather(
        self, group: dict[str, Any] | None, grad_scale: Tensor | None
    ) -> tuple[list[BucketStatistics], list[Tensor | None], Tensor | None]:
        """Step 1: the buckets' statistics (factor estimates on curvature steps, g1 in FOP
        mode) averaged across ranks, every layer's full gradient matrix, both free of any loss
        scale, and during the first steps without a known scale the ``unscaled_ratio`` that
        tells an unannounced one."""
        if group is None:
            return [], [], None
        refresh = group["step"] % self.config.curvature_interval == 0
        statistics = self.curvature.gather(refresh, self.config.wants_halves)
        gradients = self.curvature.full_gradients()
        scale = loss_scale(grad_scale, self.grad_scaler)
        if isinstance(scale, Tensor) or scale != 1.0:
            unscale_statistics(statistics, scale)
        elif group["step"] < UNSCALED_CHECK_STEPS:
            pairs = self.curvature.scaled_pairs(statistics, gradients)
            return statistics, gradients, unscaled_ratio(*pairs)
        return statistics, gradients, None

    def _precondition(
        self,
        group: dict[str, Any],
        statistics: list[BucketStatistics],
        gradients: list[Tensor | None],
        ok: Tensor,
    ) -> None:
        """Steps 3-5 for the FOP group: refresh, each bucket's directions, shared across
        ranks, the KL clip, the updates. Where the device flag ``ok`` is false nothing on the
        device changes (the host's counts are put back once the flag is read)."""
        lr, damping = group["lr"], group["damping"]
        self.curvature.begin_step(ok)
        refreshed = self.curvature.refresh(statistics, group["step"], damping, gradients)
        step = group["step"] + 1  # 1-based, for the bias corrections
        steps = self.curvature.directions(statistics, group, step, gradients)
        pairs, layer_statistics, vg = self.curvature.distributor.share_directions(steps, gradients)
        scale = None
        if pairs and group["kl_clip"] is not None:
            scale = kl_clip_scale(torch.where(ok, vg, 0.0), lr, group["kl_clip"])
        targets, directions = self.curvature.distributor.parameter_updates(pairs, scale)
        preconditioned_step(targets, directions, group, ok)
        group["step"] = step
        folded = any(any(s.has_factors) for s in statistics if s.A is not None)
        report: dict[str, Tensor | float] = {}
        if pairs:
            report = {**layer_statistics, "kl_scale": torch.ones(()) if scale is None else scale}
        report.update(
            damping=damping, curvature_refreshed=float(folded), inverse_refreshed=float(refreshed)
        )
        self._last_stats = {**self._last_stats, **report}

    def _undo(self, restore: Callable[[], None], stats: dict[str, Any], flags: list[float]) -> None:
        """Put the host's bookkeeping back as it was before a step the device skipped."""
        restore()
        self._last_stats = stats
        report_skipped_step(flags)

    def _follow_sharding(self) -> None:
        """The model was sharded with fully_shard after this optimizer was built: shard the
        curvature and point the param groups at the new (DTensor) parameters."""
        model = self._model()
        if self.curvature.follow_sharding() and model is not None:
            follow_sharded_parameters(self.param_groups, model, self._param_names, self.state)

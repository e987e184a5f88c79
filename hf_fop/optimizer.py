"""``hf_fop.FOP``: K-FAC natural gradient plus the Fisher-orthogonal correction, in one optimizer.

One step, top to bottom (the equations are in fop_math.py and the README):
1. gather what the hooks saw during the backward passes (factor estimates on curvature steps,
   g1 every step in FOP mode) and average it across ranks in one bucketed all-reduce;
2. skip the step, touching nothing, if any gradient or statistic is not finite;
3. fold the estimates into the running factors; refresh the decompositions on inverse steps
   (each rank decomposes the layers it owns and shares them);
4. per layer: eta * F^-1 (g_avg + beta g_perp) (or F^-1 g_avg in K-FAC mode), a KL-norm clip over
   the group, weight decay and momentum, then the parameter update;
5. AdamW for every parameter that is not preconditioned.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hf_fop.adamw import adamw_update
from hf_fop.capture import CurvatureCapture
from hf_fop.config import FOPConfig
from hf_fop.curvature import PRECONDITIONERS, update_running_factor
from hf_fop.distributed import Communicator, assign_layers, decomposition_cost
from hf_fop.fop_math import FOPDirection, inner
from hf_fop.grafting import adam_direction, adam_step_norm, graft
from hf_fop.layers import LayerAdapter
from hf_fop.mixed_precision import check_not_scaled, loss_scale
from hf_fop.partition import Partition, partition_model, unwrap_model

logger = logging.getLogger("hf_fop")

FACTOR_KEYS = ("A", "G")
# An unannounced loss scale is looked for during the first steps only (reading it syncs).
UNSCALED_CHECK_STEPS = 10
# State kept in fp32 whatever the parameters' precision.
FP32_KEYS = (
    *FACTOR_KEYS,
    *(key for cls in PRECONDITIONERS.values() for key in cls.STATE_KEYS),
    "graft_exp_avg_sq",
    "exp_avg",
)


@dataclass
class _Gathered:
    """One layer's statistics for this step, already averaged across ranks."""

    A: Tensor | None = None
    G: Tensor | None = None
    g1: Tensor | None = None


class FOP(torch.optim.Optimizer):
    """Fisher-Orthogonal Projection (Lu & Armour, AAAI-26) for the layers of ``model``.

    Args:
        model: the model to train (plain, or wrapped by DDP / accelerate). Hooks are put on its
            preconditioned layers, so build the optimizer before training starts.
        config: an :class:`FOPConfig`; keyword arguments override its fields.

    Param groups: one ``kind="fop"`` group with the preconditioned layers and one or two
    ``kind="adamw"`` groups (decay / no decay). Every group has ``lr``, so any LR scheduler
    drives all of them.
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
        config = config or FOPConfig()
        if settings:
            config = config.replace(**settings)
        if not isinstance(model, nn.Module):
            raise TypeError(
                "FOP needs the model (an nn.Module), not its parameters, because it hooks the "
                f"model's layers: use FOP(model, ...), got {type(model).__name__}"
            )
        model = unwrap_model(model)
        partition = partition_model(model, config.targets, config.skip, config.max_factor_dim)
        groups = _param_groups(partition, config)
        if not groups:
            raise ValueError(
                "the model has no trainable parameters, so there is nothing to optimize: set "
                "requires_grad=True on the parameters to train (or check the PEFT config)"
            )
        defaults = {
            "lr": config.fallback_lr,
            "betas": tuple(config.adamw_betas),
            "eps": config.adamw_eps,
            "weight_decay": config.adamw_weight_decay,
        }
        super().__init__(groups, defaults)
        self.config = config
        self.partition = partition
        self.layer_names = [name for name, _ in partition.layers]
        self.layers: list[LayerAdapter] = [layer for _, layer in partition.layers]
        self.communicator = communicator or Communicator()
        # The torch.amp.GradScaler scaling the loss, if any (see mixed_precision.py).
        self.grad_scaler = grad_scaler
        self.capture = CurvatureCapture(model, self.layers)
        self.capture.accumulation_steps = config.gradient_accumulation_steps
        self._last_stats: dict[str, Tensor | float] = {}
        self._warned: set[str] = set()
        # Indices of the layers this rank decomposed at the last refresh (for inspection).
        self._decomposed_by_rank: list[int] = []
        self._arm_capture()
        logger.info(partition.summary())

    # ----------------------------------------------------------------------------------- public

    @property
    def gradient_accumulation_steps(self) -> int | None:
        """Micro-batches per step (None: learned from the previous step)."""
        return self.capture.accumulation_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int | None) -> None:
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(
                f"gradient_accumulation_steps must be an integer >= 1 or None, got {steps!r}"
            )
        self.capture.accumulation_steps = steps

    @property
    def fop_group(self) -> dict[str, Any] | None:
        return next((g for g in self.param_groups if g["kind"] == "fop"), None)

    def statistics(self) -> dict[str, float]:
        """The last step's FOP statistics as plain floats, for logging (reading them syncs)."""
        out: dict[str, float] = {}
        for key, value in self._last_stats.items():
            if isinstance(value, Tensor) and value.numel() > 1:
                out[f"{key}_mean"] = value.mean().item()
                out[f"{key}_min"] = value.min().item()
                out[f"{key}_max"] = value.max().item()
            else:
                out[key] = float(value)
        return out

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
        if self._empty_step():
            logger.warning("FOP skipped a step: its batch was empty (nothing changed)")
            self.capture.reset()
            return loss
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is not None and bool(found_inf.sum() > 0):
            # The scaler skips this step: nothing of its backward may stay behind.
            self.capture.reset()
            return loss
        grad_scale = getattr(self, "grad_scale", None)  # set while p.grad is still scaled
        if grad_scale is not None:
            self._unscale_gradients(1.0 / float(grad_scale))
        group = self.fop_group
        gathered = self._gather(group) if group is not None else []
        if group is not None:
            self._unscale_statistics(group, gathered, loss_scale(grad_scale, self.grad_scaler))
        statistics = [t for g in gathered for t in (g.A, g.G, g.g1) if t is not None]
        if not self._all_finite(statistics):
            logger.warning(
                "FOP skipped a step: the gradients hold NaN or Inf; parameters and optimizer "
                "state are unchanged"
            )
            self.capture.reset()
            return loss
        if group is not None:
            self._fop_update(group, gathered)
        for adamw_group in self.param_groups:
            if adamw_group["kind"] == "adamw":
                self._adamw_update(adamw_group)
        self.capture.reset()
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's semantics (the checkpoint's lr, betas and weight decay win, so schedules
        resume), except FOP's own settings: the damping and the KL clip given to this optimizer
        win over the checkpoint's, with a warning when they differ."""
        super().load_state_dict(state_dict)
        group = self.fop_group
        if group is not None:
            for key in ("damping", "kl_clip"):
                configured = getattr(self.config, key)
                if group[key] != configured:
                    warnings.warn(
                        f"the checkpoint's {key}={group[key]} is replaced by this optimizer's "
                        f"{key}={configured}",
                        stacklevel=2,
                    )
                    group[key] = configured
        # torch casts floating state to the parameter's dtype; curvature stays fp32 whatever
        # the model's precision.
        params = [p for g in self.param_groups for p in g["params"]]
        preconditioned = {id(p) for p in (self.fop_group or {"params": []})["params"]}
        for index, saved in state_dict["state"].items():
            if not isinstance(index, int) or index >= len(params):
                continue
            param = params[index]
            if id(param) not in preconditioned:
                continue
            for key in FP32_KEYS:
                if key in saved:
                    self.state[param][key] = saved[key].to(device=param.device, dtype=torch.float32)
        self._arm_capture()

    # --------------------------------------------------------------------------------- internal

    def _arm_capture(self) -> None:
        """Tell the hooks what the coming backward passes must gather."""
        group = self.fop_group
        step = group["step"] if group is not None else 0
        self.capture.collect_factors = step % self.config.curvature_interval == 0
        self.capture.collect_first_half = self.config.mode == "fop"

    def _empty_step(self) -> bool:
        """No example reached the preconditioned layers and every gradient is zero."""
        if not self.layers or any(stats.examples for stats in self.capture.stats):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return all(not bool(grad.any()) for grad in grads)

    def _unscale_gradients(self, inverse_scale: float) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(inverse_scale)

    def _unscale_statistics(
        self, group: dict[str, Any], gathered: list[_Gathered], scale: float
    ) -> None:
        """Undo a loss scale S in the hooks' statistics: G carries S^2, g1 carries S."""
        if scale != 1.0:
            for item in gathered:
                if item.G is not None:
                    item.G /= scale * scale
                if item.g1 is not None:
                    item.g1 /= scale
        elif group["step"] < UNSCALED_CHECK_STEPS:
            pairs = [
                (item.g1, layer.grad_matrix())
                for layer, item in zip(self.layers, gathered)
                if item.g1 is not None and layer.weight.grad is not None
            ]
            check_not_scaled([g1 for g1, _ in pairs], [g.float() for _, g in pairs])

    def _all_finite(self, extra: Iterable[Tensor]) -> bool:
        tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        tensors += list(extra)
        if not tensors:
            return True
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    def _gather(self, group: dict[str, Any]) -> list[_Gathered]:
        """This step's factor estimates and g1 per layer, averaged across ranks in one bucket."""
        refresh = group["step"] % self.config.curvature_interval == 0
        want_g1 = self.config.mode == "fop"
        pad = self.communicator.active  # every rank must send the same tensors
        gathered, flags = [], []
        for layer, stats in zip(self.layers, self.capture.stats):
            item = _Gathered()
            has_factors = refresh and stats.has_factors
            has_split = want_g1 and stats.has_split
            if has_factors:
                item.A, item.G = stats.A(), stats.G()
            elif refresh and pad:
                item.A = layer.weight.new_zeros(layer.in_dim, layer.in_dim, dtype=torch.float32)
                item.G = layer.weight.new_zeros(layer.out_dim, layer.out_dim, dtype=torch.float32)
            if has_split:
                item.g1 = stats.g1()
            elif want_g1 and pad:
                item.g1 = layer.weight.new_zeros(layer.out_dim, layer.in_dim, dtype=torch.float32)
            if want_g1 and not has_split and stats.examples > 0:
                self._warn_once(
                    "no-split",
                    "FOP could not split a step's examples into two halves (a batch of one "
                    "example, or fewer micro-batches than gradient_accumulation_steps); such "
                    "steps use the K-FAC direction",
                )
            gathered.append(item)
            flags.append([float(has_factors), float(has_split)])
        if not self.communicator.active:
            return gathered
        device = self.layers[0].weight.device
        share = torch.tensor(flags, device=device).reshape(-1, 2)
        self.communicator.all_reduce_mean(
            [share] + [t for g in gathered for t in (g.A, g.G, g.g1) if t is not None]
        )
        # A layer that ran on only some ranks is averaged over those ranks.
        for item, (factor_share, split_share) in zip(gathered, share.tolist()):
            if factor_share == 0:
                item.A = item.G = None
            elif factor_share < 1 and item.A is not None:
                item.A /= factor_share
                item.G /= factor_share
            if split_share == 0:
                item.g1 = None
            elif split_share < 1 and item.g1 is not None:
                item.g1 /= split_share
        return gathered

    def _refresh_curvature(self, group: dict[str, Any], gathered: list[_Gathered]) -> bool:
        """Fold the estimates into the running factors; decompose where due. Returns whether
        any decomposition was refreshed."""
        config = self.config
        for layer, item in zip(self.layers, gathered):
            if item.A is None:
                continue
            state = self.state[layer.weight]
            updates = state.get("factor_updates", 0)
            for key, estimate in (("A", item.A), ("G", item.G)):
                state[key] = update_running_factor(
                    state.get(key), estimate, config.factor_decay, updates
                )
            state["factor_updates"] = updates + 1

        preconditioner = PRECONDITIONERS[config.method]
        inverse_step = group["step"] % config.inverse_interval == 0
        due = [
            i
            for i, layer in enumerate(self.layers)
            if "A" in self.state[layer.weight]
            and (inverse_step or preconditioner.STATE_KEYS[0] not in self.state[layer.weight])
        ]
        if not due:
            return False
        costs = [decomposition_cost(self.layers[i].in_dim, self.layers[i].out_dim) for i in due]
        owners = assign_layers(costs, self.communicator.world_size)
        rank = self.communicator.rank
        results, owned = [], []
        for index, owner in zip(due, owners):
            layer = self.layers[index]
            state = self.state[layer.weight]
            if owner == rank:
                computed = preconditioner.from_factors(
                    state["A"], state["G"], group["damping"], config.damping_mode
                )
                values = computed.state()
            else:
                values = {
                    key: state["A"].new_zeros(shape)
                    for key, shape in preconditioner.state_shapes(
                        layer.in_dim, layer.out_dim
                    ).items()
                }
            state.update(values)
            for key in preconditioner.STATE_KEYS:
                results.append(state[key])
                owned.append(owner == rank)
        self.communicator.share_owned(results, owned)
        self._decomposed_by_rank = [due[i] for i, owner in enumerate(owners) if owner == rank]
        return True

    def _fop_update(self, group: dict[str, Any], gathered: list[_Gathered]) -> None:
        config = self.config
        refreshed = self._refresh_curvature(group, gathered)
        preconditioner = PRECONDITIONERS[config.method]
        lr, damping = group["lr"], group["damping"]
        step = group["step"] + 1  # 1-based, for the bias corrections of grafting

        updates: list[tuple[LayerAdapter, Tensor, Tensor]] = []
        results: list[FOPDirection] = []
        _, beta2 = group["betas"]
        for index, (layer, item) in enumerate(zip(self.layers, gathered)):
            g_avg = layer.grad_matrix()
            if g_avg is None:
                continue
            g_avg = g_avg.float()
            state = self.state[layer.weight]
            needs_adam = config.graft == "adamw" or preconditioner.STATE_KEYS[0] not in state
            if needs_adam and "graft_exp_avg_sq" not in state:
                state["graft_exp_avg_sq"] = torch.zeros_like(g_avg)
            if preconditioner.STATE_KEYS[0] not in state:
                # No curvature yet (its hooks never saw a backward on a curvature step): the
                # layer is updated as by AdamW meanwhile.
                self._report_uncovered(index)
                direction = adam_direction(
                    g_avg, state["graft_exp_avg_sq"], beta2, config.adamw_eps, step
                )
                zero = g_avg.new_zeros(())
                results.append(FOPDirection(direction, zero, zero + 1, zero, zero + 1))
                updates.append((layer, direction, g_avg))
                continue
            metric = preconditioner.from_state(state, damping, config.damping_mode)
            if item.g1 is not None:
                g_diff = 2 * (item.g1 - g_avg)  # g1 - g2 with g2 = 2 g_avg - g1
                result = metric.fop(g_avg, g_diff, config.fop_zero_tol)
            else:
                result = metric.kfac(g_avg)
            direction = result.direction
            if config.graft == "adamw":
                norm = adam_step_norm(
                    g_avg, state["graft_exp_avg_sq"], beta2, config.adamw_eps, step
                )
                direction = graft(direction, norm)
            results.append(result)
            updates.append((layer, direction, g_avg))

        scale = torch.ones(())
        if updates and group["kl_clip"] is not None:
            # K-FAC's trust region: nu = min(1, sqrt(kl_clip / (lr^2 sum_l <n_l, g_l>))).
            vg = sum(inner(direction, g) for _, direction, g in updates) * lr**2
            tiny = torch.finfo(torch.float32).tiny
            scale = torch.clamp(torch.sqrt(group["kl_clip"] / vg.abs().clamp(min=tiny)), max=1.0)

        for layer, direction, _ in updates:
            for param, update in zip(layer.params, layer.split_matrix(direction * scale)):
                self._apply(param, update, group, step)

        if results:
            rho = torch.stack([r.rho for r in results])
            self._last_stats = {
                "beta": torch.stack([r.beta for r in results]),
                "eta": torch.stack([r.eta for r in results]),
                "rho": rho,
                "rho_abs": rho.abs(),
                "kfac_cosine": torch.stack([r.kfac_cosine for r in results]),
                "kl_scale": scale,
            }
        self._last_stats.update(
            damping=damping,
            curvature_refreshed=float(any(item.A is not None for item in gathered)),
            inverse_refreshed=float(refreshed),
        )
        group["step"] += 1

    def _apply(self, param: Tensor, update: Tensor, group: dict[str, Any], step: int) -> None:
        """Momentum, weight decay and the parameter update of a preconditioned direction.

        Grafted (AdamW-sized) directions take AdamW's rules: a bias-corrected moving average and
        decoupled weight decay. Raw natural-gradient directions take SGD's: heavy-ball momentum
        and weight decay added to the direction (K-FAC practice).
        """
        momentum, weight_decay = group["betas"][0], group["weight_decay"]
        state = self.state[param]
        if self.config.graft == "adamw":
            if momentum:
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(update)
                state["exp_avg"].lerp_(update, 1 - momentum)
                update = state["exp_avg"] / (1 - momentum**step)
            if weight_decay:
                param.mul_(1 - group["lr"] * weight_decay)
            param.add_(update.to(param.dtype), alpha=-group["lr"])
            return
        update = update.to(param.dtype)
        if weight_decay:
            update = update.add(param, alpha=weight_decay)
        if momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = update.clone()
            else:
                buffer.mul_(momentum).add_(update)
            update = buffer
        param.add_(update, alpha=-group["lr"])

    def _adamw_update(self, group: dict[str, Any]) -> None:
        for param in group["params"]:
            if param.grad is None:
                continue
            adamw_update(
                param,
                param.grad,
                self.state[param],
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def _report_uncovered(self, index: int) -> None:
        """Say why a targeted layer gets gradients but has no curvature (once)."""
        name = self.layer_names[index]
        if self.capture.stats[index].examples > 0:
            self._warn_once(
                "no-curvature",
                "a preconditioned layer has no curvature yet (its hooks saw no backward pass "
                "on a curvature step); it is updated as by AdamW until they do",
            )
            return
        if name in self.partition.uncovered:
            return
        reason = "its hooks never fire: its parent uses the weight without calling the layer"
        self.partition.uncovered[name] = reason
        message = (
            f"FOP: layer {name!r} gets gradients but no curvature ({reason}); it is updated as "
            f"by AdamW. Leave it to AdamW explicitly: skip=[{name!r}]"
        )
        warnings.warn(message, stacklevel=4)
        logger.warning(message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def _param_groups(partition: Partition, config: FOPConfig) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    if partition.layers:
        groups.append(
            {
                "params": [p for _, layer in partition.layers for p in layer.params],
                "kind": "fop",
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
                    "params": [p for _, p in params],
                    "kind": "adamw",
                    "lr": config.fallback_lr,
                    "betas": tuple(config.adamw_betas),
                    "eps": config.adamw_eps,
                    "weight_decay": decay,
                }
            )
    return groups

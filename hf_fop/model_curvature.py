"""The curvature of one model: FOP's hooks, running Kronecker factors, cached preconditioners.

Layers of one shape form a bucket whose factors live stacked, (layers, d, d): a refresh
decomposes a bucket in one batched call and every step rotates it with a few batched matmuls,
so a transformer (a handful of shapes repeated in every block) costs a handful of kernel
launches per step instead of a Python loop of small ones. A bucket's preconditioner is built on
inverse steps and cached until the next one; steps in between only read it.

State is saved by layer name: a checkpoint of a model whose layers differ fails at load,
naming the layer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hf_fop.bucket import ShapeBucket
from hf_fop.bucket_data import BucketStatistics, BucketStep
from hf_fop.capture import CurvatureCapture
from hf_fop.config import FOPConfig
from hf_fop.distributed import Communicator
from hf_fop.distributors import Distributor, make_distributor, sharded_since
from hf_fop.fop_update import UpdateRule
from hf_fop.layers import LayerAdapter

logger = logging.getLogger("hf_fop")


class ModelCurvature:
    """Owns the hooks on ``layers`` of ``model``, their factors and preconditioners."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[tuple[str, LayerAdapter]],
        config: FOPConfig,
        communicator: Communicator,
        uncovered: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        # Targeted layers whose hooks never fire, with the reason (the partition's record).
        self.uncovered = uncovered if uncovered is not None else {}
        self.communicator = communicator
        self.names = [name for name, _ in layers]
        self.layers = [layer for _, layer in layers]
        self.capture = CurvatureCapture(model, self.layers, config.blocking)
        self._build_buckets()
        self._warned: set[str] = set()

    def _build_buckets(self) -> None:
        self.distributor: Distributor = make_distributor(
            self.layers, self.communicator, self.config.blocking
        )
        groups: dict[tuple[int, int, torch.device, bool], list[int]] = {}
        for index, layer in enumerate(self.layers):
            if self.distributor.holds(index):
                key = (layer.in_dim, layer.out_dim, layer.weight.device, layer.hooked)
                groups.setdefault(key, []).append(index)
        self.buckets = [
            ShapeBucket(
                indices,
                [self.names[i] for i in indices],
                self.layers[indices[0]],
                self.config,
            )
            for indices in groups.values()
        ]
        self._mark_zero_weights()

    def _mark_zero_weights(self) -> None:
        """Flag the layers whose weights are all zero now (a LoRA B): the output graft's bound
        compares a step with the weights, and these have no size of their own to compare with,
        so their steps stay grafted in full (``fop_update``). Kept in the layers' state, so a
        resumed run, whose weights are no longer zero, keeps the flags of its first start."""
        if not self._graft_bounded:
            return
        if any(layer.weight.is_meta for layer in self.layers):
            return  # no values yet (initialised later): no layer counts as starting from zero
        norms = self.distributor.weight_norms()
        for bucket in self.buckets:
            if "starts_from_zero" in bucket.state:
                flags = norms[bucket.indices] == 0
                bucket.state["starts_from_zero"].copy_(flags.to(bucket.state["A"].device))

    @property
    def _graft_bounded(self) -> bool:
        """Whether steps read the weight norms: decided by the settings and the layers (the
        same on every rank), never by the buckets this rank holds, since under FSDP2
        ``weight_norms`` is a collective that every rank must call."""
        bounded = self.config.graft == "output" and self.config.graft_trust is not None
        return bounded and bool(self.layers)

    @property
    def sharded(self) -> bool:
        return self.distributor.sharded

    @property
    def decomposed_by_rank(self) -> list[int]:
        """Layer indices this rank decomposed at the last refresh (for inspection and tests)."""
        return self.distributor.decomposed_by_rank

    def follow_sharding(self) -> bool:
        """Shard the curvature if the model was sharded after the optimizer was built
        (accelerate applies fully_shard in ``prepare``); only before any curvature exists.
        Returns whether it did (the distributor is chosen again, once)."""
        if not sharded_since(self.distributor, self.layers):
            return False
        if any(any(bucket.factor_updates) for bucket in self.buckets):
            raise RuntimeError(
                "the model was sharded with FSDP2 after FOP had gathered curvature; build the "
                "optimizer after fully_shard, or before the first step"
            )
        self._build_buckets()
        return True

    # ---------------------------------------------------------------------------- statistics

    def gather(self, refresh: bool, want_g1: bool) -> list[BucketStatistics]:
        """This step's factor estimates (``refresh``) and g1 with the gradient's probes
        (``want_g1``), averaged across ranks, stacked per bucket; only what is asked for is
        sent."""
        wanted = {"A": refresh, "G": refresh, "g1": want_g1, "probe": want_g1}
        kinds = [kind for kind, want in wanted.items() if want]
        if not kinds:
            return [BucketStatistics.empty(bucket) for bucket in self.buckets]
        per_layer = []
        for stats in self.capture.stats:
            if want_g1 and not stats.has_split and stats.examples > 0:
                self._warn_once(
                    "no-split",
                    "FOP could not split a step's examples into two halves (a batch of one "
                    "example, or fewer micro-batches than gradient_accumulation_steps); such "
                    "steps use the K-FAC direction, and the whole batch's gradient for the "
                    "second moment",
                )
            present = {
                "A": stats.has_factors,
                "G": stats.has_factors,
                "g1": stats.has_split,
                "probe": stats.has_split,
            }
            per_layer.append({k: getattr(stats, k)() if present[k] else None for k in kinds})
        return self.distributor.average(per_layer, kinds, self.buckets)

    # ----------------------------------------------------------------------------- refresh

    def refresh(
        self,
        statistics: list[BucketStatistics],
        step: int,
        damping: float,
        gradients: list[Tensor | None] | None = None,
    ) -> bool:
        """Fold the estimates into the running factors and decompose what is due. Returns
        whether any decomposition was refreshed. Buckets whose factors come from the gradient
        (``factor_source="gradient"``, or layers without hooks) take their estimates from
        ``gradients`` (every layer's full gradient matrix) on curvature steps."""
        config = self.config
        if gradients is not None and step % config.curvature_interval == 0:
            statistics = [
                bucket.gradient_statistics([gradients[i] for i in bucket.indices], stats)
                if bucket.factors_from_gradient
                else stats
                for bucket, stats in zip(self.buckets, statistics)
            ]
        for bucket, stats in zip(self.buckets, statistics):
            if stats.A is not None and any(stats.has_factors):
                bucket.fold(stats.A, stats.G, stats.has_factors, config.factor_decay)
        inverse_step = step % config.inverse_interval == 0
        due = sorted(
            (
                (bucket, row)
                for bucket in self.buckets
                for row in range(len(bucket))
                if bucket.factor_updates[row] and (inverse_step or not bucket.ready[row])
            ),
            key=lambda item: item[0].indices[item[1]],  # layer order: the same owners everywhere
        )
        if due:
            rows = {id(b): (b, [r for c, r in due if c is b]) for b, _ in due}.values()
            old_bases = [(b, r, b.moment_bases(r)) for b, r in rows]
            self.distributor.decompose(due, damping, config.damping_mode)
            for bucket, bucket_rows, bases in old_bases:
                if bases is not None:
                    bucket.carry_moment(bucket_rows, bases)
        return bool(due)

    def begin_step(self, keep: Tensor) -> None:
        """The step's finiteness flag (a device scalar): the buckets keep what the step
        computes only where it holds (``ShapeBucket.begin_step``)."""
        for bucket in self.buckets:
            bucket.begin_step(keep)

    def host_counters(self, group: dict[str, Any] | None) -> Callable[[], None]:
        """What puts the host's counts (the FOP group's step, each layer's estimates folded in
        and decomposition present) back as they are now: a step found skipped afterwards has
        to (the device's side of a skipped step never changes)."""
        step = group["step"] if group is not None else 0
        saved = [
            (list(b.factor_updates), list(b.ready), list(b.moment_updates)) for b in self.buckets
        ]

        def restore() -> None:
            if group is not None:
                group["step"] = step
            for bucket, (factor_updates, ready, moment_updates) in zip(self.buckets, saved):
                bucket.factor_updates, bucket.ready = factor_updates, ready
                bucket.moment_updates = moment_updates

        return restore

    def is_empty_step(self, grads: Sequence[Tensor]) -> bool:
        """No example reached these layers since the last step and every gradient in
        ``grads`` is zero."""
        if not self.layers or any(stats.examples for stats in self.capture.stats):
            return False
        return all(not bool(grad.any()) for grad in grads)

    # -------------------------------------------------------------------------- directions

    def directions(
        self,
        statistics: list[BucketStatistics],
        group: dict[str, Any],
        step: int,
        gradients: list[Tensor | None],
    ) -> list[BucketStep]:
        """Every held bucket's step (``ShapeBucket.step``) under the FOP ``group``'s settings;
        ``gradients`` are the layers' full gradient matrices (``full_gradients``)."""
        out = []
        norms = self.distributor.weight_norms() if self._graft_bounded else None
        for bucket, stats in zip(self.buckets, statistics):
            grads = [gradients[i] for i in bucket.indices]
            rule = UpdateRule.of(self.config, group, bucket.graft)
            stacked = None if norms is None else norms[bucket.indices][:, None, None]
            bucket_step = bucket.step(stats, grads, rule, step, stacked)
            if bucket_step is not None:
                for row in bucket_step.waiting:
                    self._report_waiting(bucket.indices[row])
                out.append(bucket_step)
        return out

    def scaled_pairs(
        self, statistics: list[BucketStatistics], gradients: list[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(g1, g_avg) of every layer split this step: a loss scale FOP was not told about
        shows as g1 >> g_avg (mixed_precision.check_not_scaled)."""
        g1, g_avg = [], []
        for bucket, stats in zip(self.buckets, statistics):
            for row, index in enumerate(bucket.indices):
                grad = gradients[index]
                if stats.g1 is not None and stats.has_split[row] and grad is not None:
                    g1.append(stats.g1[row])
                    g_avg.append(grad.float())
        return g1, g_avg

    def full_gradients(self) -> list[Tensor | None]:
        """Every preconditioned layer's gradient matrix, whole (gathered under FSDP2)."""
        return self.distributor.gradient_matrices()

    def _report_waiting(self, index: int) -> None:
        """Say why a targeted layer gets gradients but has no curvature (once)."""
        name = self.names[index]
        if not self.layers[index].hooked or self.capture.stats[index].examples > 0:
            self._warn_once(
                "no-curvature",
                "a preconditioned layer has no curvature yet (its hooks saw no backward pass "
                "on a curvature step); it is updated as by AdamW until they do",
            )
            return
        if name in self.uncovered:
            return
        reason = "its hooks never fire: its parent uses the weight without calling the layer"
        self.uncovered[name] = reason
        message = (
            f"FOP: layer {name!r} gets gradients but no curvature ({reason}); it is updated as "
            f"by AdamW. Leave it to AdamW explicitly: skip=[{name!r}]"
        )
        warnings.warn(message, stacklevel=5)
        logger.warning(message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=5)

    # --------------------------------------------------------------------------------- state

    @property
    def held_names(self) -> list[str]:
        """The layers whose curvature this rank holds (all, unless sharded), in layer order."""
        held = {name for bucket in self.buckets for name in bucket.names}
        return [name for name in self.names if name in held]

    def layer_state(self, name: str) -> dict[str, Tensor]:
        """One layer's curvature (views into its bucket), complete from the start: zeros and
        counters at 0 before its first curvature step, so a checkpoint loader (DCP) finds every
        tensor a trained optimizer has."""
        for bucket in self.buckets:
            if name in bucket.names:
                row = bucket.names.index(name)
                state = {key: value[row] for key, value in bucket.state.items()}
                state["factor_updates"] = torch.tensor(bucket.factor_updates[row])
                state["decomposed"] = torch.tensor(int(bucket.ready[row]))
                if "rotated_second_moment" in bucket.state:
                    state["moment_updates"] = torch.tensor(bucket.moment_updates[row])
                return state
        raise KeyError(f"no preconditioned layer named {name!r}")

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Per layer name this rank holds: plain tensors (copies, so a checkpoint holds no
        whole buckets)."""
        return {
            name: {key: value.clone() for key, value in self.layer_state(name).items()}
            for name in self.held_names
        }

    def load_state_dict(self, saved: dict[str, dict[str, Any]]) -> None:
        """Load the curvature of the layers this rank holds (others are ignored: under FSDP2
        another rank holds them); every layer is checked before any is written, so a
        mismatching checkpoint leaves the curvature as it was."""
        self.check_state_dict(saved)
        for bucket in self.buckets:
            for row, name in enumerate(bucket.names):
                _load_layer(bucket, row, saved[name])

    def check_state_dict(
        self, saved: dict[str, dict[str, Any]], saved_names: Sequence[str] | None = None
    ) -> None:
        """Raise, naming the layer, when ``saved`` does not belong to these layers.

        ``saved_names``: every layer the checkpoint's optimizer preconditioned, where it says
        (the curvature itself holds only the layers of the rank that saved it under FSDP2)."""
        expected_names = self.names if saved_names is not None else self.held_names
        saved_names = list(saved) if saved_names is None else saved_names
        missing = [name for name in expected_names if name not in saved_names]
        unexpected = [name for name in saved_names if name not in self.names]
        if missing or unexpected:
            detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise ValueError(
                f"the checkpoint's FOP curvature does not match this model's layers ({detail}; "
                f"{len(missing)} missing, {len(unexpected)} unexpected): it was saved from "
                "another model or another FOP selection (targets/skip). Load it into the same "
                "model, or start the optimizer fresh."
            )
        absent = [name for name in self.held_names if name not in saved]
        if absent:
            raise ValueError(
                f"the checkpoint holds no FOP curvature for layer {absent[0]!r} ({len(absent)} "
                "layers lack it): under FSDP2 each rank saves the curvature of its own layers, "
                "so save with torch.distributed.checkpoint (accelerate's SHARDED_STATE_DICT, "
                "the default) or one file per rank, not a full state dict gathered on rank 0."
            )
        for bucket in self.buckets:
            # (AdamW's second moment may exist without grafting: a layer that waited for curvature)
            shaped_as_momentum = bucket.shapes["gradient_exp_avg"]
            expected = {"graft_exp_avg_sq": shaped_as_momentum, **bucket.shapes}
            for name in bucket.names:
                for key, value in saved[name].items():
                    if key in expected and tuple(value.shape) != expected[key]:
                        raise ValueError(
                            f"the checkpoint's FOP curvature for layer {name!r} has {key} of "
                            f"shape {tuple(value.shape)}, but this model's layer needs "
                            f"{expected[key]}: it was saved from another model."
                        )

    def reset(self) -> None:
        self.capture.reset()


def _load_layer(bucket: ShapeBucket, row: int, state: dict[str, Any]) -> None:
    if "graft_exp_avg_sq" in state:
        bucket.adam_second_moment()
    targets = bucket.state
    bucket.moment_updates[row] = int(state.get("moment_updates", 0))
    for key, value in state.items():
        if key in targets:
            targets[key][row] = value.to(device=bucket.A.device, dtype=torch.float32)
    bucket.factor_updates[row] = int(state.get("factor_updates", 0))
    bucket.ready[row] = bool(state.get("decomposed", 0))


def float_statistics(statistics: dict[str, Tensor | float]) -> dict[str, float]:
    """Step statistics as plain floats for logging: per-layer tensors as mean / min / max."""
    out: dict[str, float] = {}
    for key, value in statistics.items():
        if isinstance(value, Tensor) and value.numel() > 1:
            out[f"{key}_mean"] = value.mean().item()
            out[f"{key}_min"] = value.min().item()
            out[f"{key}_max"] = value.max().item()
        else:
            out[key] = float(value)
    return out

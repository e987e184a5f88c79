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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hf_fop.capture import CurvatureCapture
from hf_fop.config import FOPConfig
from hf_fop.distributed import Communicator, assign_layers, decomposition_cost
from hf_fop.fop_math import FOPDirection, inner
from hf_fop.grafting import adam_direction, adam_step_norm, graft
from hf_fop.layers import LayerAdapter
from hf_fop.shape_bucket import ShapeBucket
from hf_fop.sharding import is_sharded

logger = logging.getLogger("hf_fop")


@dataclass
class BucketStatistics:
    """One step's averaged statistics of a bucket (zeros in the rows a layer lacks)."""

    A: Tensor | None
    G: Tensor | None
    has_factors: list[bool]
    g1: Tensor | None
    has_split: list[bool]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.A, self.G, self.g1) if t is not None]


@dataclass
class BucketStep:
    """The directions a bucket's layers take this step (before the learning rate)."""

    bucket: ShapeBucket
    rows: list[int]  # rows of the bucket that have gradients, in order
    direction: Tensor  # (len(rows), out, in)
    g_avg: Tensor
    scalars: FOPDirection  # direction unused; beta, eta, rho, kfac_cosine per row


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
        self.capture = CurvatureCapture(model, self.layers)
        self._build_buckets()
        # Layer indices this rank decomposed at the last refresh (for inspection and tests).
        self.decomposed_by_rank: list[int] = []
        self._warned: set[str] = set()

    def _build_buckets(self) -> None:
        # Under FSDP2 each layer's curvature lives on one rank only (fixed owners, balanced by
        # decomposition cost), so optimizer memory falls as 1 / world size; under DDP every rank
        # holds all of it and decompositions are shared instead.
        communicator, config = self.communicator, self.config
        self.sharded = any(is_sharded(layer.weight) for layer in self.layers)
        costs = [decomposition_cost(layer.in_dim, layer.out_dim) for layer in self.layers]
        self.owners = (
            assign_layers(costs, communicator.world_size)
            if self.sharded
            else [communicator.rank] * len(self.layers)
        )
        groups: dict[tuple[int, int, torch.device], list[int]] = {}
        for index, layer in enumerate(self.layers):
            if self.owners[index] != communicator.rank:
                continue
            key = (layer.in_dim, layer.out_dim, layer.weight.device)
            groups.setdefault(key, []).append(index)
        self.buckets = [
            ShapeBucket(
                indices, [self.names[i] for i in indices], self.layers[indices[0]], config.method
            )
            for indices in groups.values()
        ]

    def follow_sharding(self) -> None:
        """Shard the curvature if the model was sharded after the optimizer was built
        (accelerate applies fully_shard in ``prepare``); only before any curvature exists."""
        if self.sharded or not any(is_sharded(layer.weight) for layer in self.layers):
            return
        if any(any(bucket.factor_updates) for bucket in self.buckets):
            raise RuntimeError(
                "the model was sharded with FSDP2 after FOP had gathered curvature; build the "
                "optimizer after fully_shard, or before the first step"
            )
        self._build_buckets()

    # ---------------------------------------------------------------------------- statistics

    def gather(self, refresh: bool, want_g1: bool) -> list[BucketStatistics]:
        """This step's factor estimates (``refresh``) and g1 (``want_g1``), averaged across
        ranks, stacked per bucket; only what is asked for is sent."""
        kinds = [
            kind for kind, wanted in (("A", refresh), ("G", refresh), ("g1", want_g1)) if wanted
        ]
        if not kinds:
            return [
                BucketStatistics(None, None, [False] * len(b), None, [False] * len(b))
                for b in self.buckets
            ]
        tensors: list[Tensor | None] = []
        shapes: list[tuple[int, ...]] = []
        for layer, stats in zip(self.layers, self.capture.stats):
            if want_g1 and not stats.has_split and stats.examples > 0:
                self._warn_once(
                    "no-split",
                    "FOP could not split a step's examples into two halves (a batch of one "
                    "example, or fewer micro-batches than gradient_accumulation_steps); such "
                    "steps use the K-FAC direction",
                )
            for kind in kinds:
                present = stats.has_split if kind == "g1" else stats.has_factors
                tensors.append(getattr(stats, kind)() if present else None)
                shapes.append(_statistic_shape(kind, layer.in_dim, layer.out_dim))
        like = torch.zeros((), device=self.layers[0].weight.device)
        averaged = self.communicator.average_partial(tensors, shapes, like)
        per_kind = {kind: averaged[k :: len(kinds)] for k, kind in enumerate(kinds)}
        out = []
        for bucket in self.buckets:
            gathered = {
                kind: [values[i] for i in bucket.indices] for kind, values in per_kind.items()
            }
            stacked = {
                kind: _stack(values, _statistic_shape(kind, bucket.in_dim, bucket.out_dim), like)
                for kind, values in gathered.items()
            }
            absent = [False] * len(bucket)
            present = {kind: [t is not None for t in values] for kind, values in gathered.items()}
            out.append(
                BucketStatistics(
                    stacked.get("A"),
                    stacked.get("G"),
                    present.get("A", absent),
                    stacked.get("g1"),
                    present.get("g1", absent),
                )
            )
        return out

    # ----------------------------------------------------------------------------- refresh

    def refresh(
        self, statistics: list[BucketStatistics], step: int, damping: float, ok: Tensor
    ) -> bool:
        """Fold the estimates into the running factors and decompose what is due, on the
        device only where ``ok`` (the step's finiteness flag) is true. Returns whether any
        decomposition was refreshed."""
        config = self.config
        for bucket, stats in zip(self.buckets, statistics):
            if stats.A is not None and any(stats.has_factors):
                bucket.fold(stats.A, stats.G, stats.has_factors, config.factor_decay, ok)
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
        if not due:
            return False
        if self.sharded:  # the owner decomposes its own layers; nothing is shared
            self.decomposed_by_rank = sorted(b.indices[r] for b, r in due)
            for bucket in self.buckets:
                rows = [r for b, r in due if b is bucket]
                if rows:
                    bucket.decompose(rows, damping, config.damping_mode, ok)
            return True
        costs = [decomposition_cost(b.in_dim, b.out_dim) for b, _ in due]
        owners = assign_layers(costs, self.communicator.world_size)
        rank = self.communicator.rank
        self.decomposed_by_rank = [b.indices[r] for (b, r), o in zip(due, owners) if o == rank]
        shared, owned = [], []
        for bucket in self.buckets:
            rows = [r for (b, r), o in zip(due, owners) if b is bucket]
            mine = [r for (b, r), o in zip(due, owners) if b is bucket and o == rank]
            if mine:
                bucket.decompose(mine, damping, config.damping_mode, ok)
            bucket.mark_ready(rows)
            if self.communicator.active:
                mine_set = set(mine)
                for key in bucket.method.STATE_KEYS:
                    for row in rows:
                        shared.append(bucket.decomposition[key][row])
                        owned.append(row in mine_set)
        # Each rank decomposed its share; one collective gives every rank all of them.
        self.communicator.share_owned(shared, owned)
        return True

    def host_counters(self, group: dict[str, Any] | None) -> Callable[[], None]:
        """What puts the host's counts (the FOP group's step, each layer's estimates folded in
        and decomposition present) back as they are now: a step found skipped afterwards has
        to (the device's side of a skipped step never changes)."""
        step = group["step"] if group is not None else 0
        saved = [(list(b.factor_updates), list(b.ready)) for b in self.buckets]

        def restore() -> None:
            if group is not None:
                group["step"] = step
            for bucket, (factor_updates, ready) in zip(self.buckets, saved):
                bucket.factor_updates, bucket.ready = factor_updates, ready
                bucket._cache = None

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
        damping: float,
        beta2: float,
        step: int,
        gradients: list[Tensor | None],
        ok: Tensor,
    ) -> list[BucketStep]:
        """The preconditioned (and, with grafting, AdamW-sized) direction of every layer this
        rank holds the curvature of (all of them unless sharded).

        ``step`` is 1-based (the bias corrections of the grafting norm); ``gradients`` are the
        layers' full gradient matrices (``full_gradients``). Where ``ok`` (the step's
        finiteness flag) is false the grafting moments stay as they were and the directions
        are zeros, so nothing downstream sees a NaN.
        """
        config = self.config
        out = []
        for bucket, stats in zip(self.buckets, statistics):
            grads = [gradients[i] for i in bucket.indices]
            rows = [row for row, grad in enumerate(grads) if grad is not None]
            if not rows:
                continue
            g_avg = torch.stack([grads[row] for row in rows]).float()
            ready = [j for j, row in enumerate(rows) if bucket.ready[row]]
            waiting = [j for j, row in enumerate(rows) if not bucket.ready[row]]
            direction = torch.empty_like(g_avg)
            zeros = g_avg.new_zeros(len(rows))
            scalars = FOPDirection(direction, zeros, zeros + 1, zeros.clone(), zeros + 1)
            needs_adam = config.graft == "adamw" or bool(waiting)
            exp_avg_sq = bucket.second_moment() if needs_adam else None
            if ready:
                every = len(ready) == len(bucket)
                picked = [rows[j] for j in ready]
                preconditioner = bucket.preconditioner(
                    None if every else picked, damping, config.damping_mode
                )
                g = g_avg if every else g_avg[ready]
                if stats.g1 is not None:
                    # A layer without two halves this step has g_diff = 0: its FOP direction
                    # is exactly K-FAC's.
                    g1 = stats.g1 if every else stats.g1[picked]
                    if not all(stats.has_split[row] for row in picked):
                        split = [stats.has_split[row] for row in picked]
                        mask = torch.tensor(split, device=g.device)[:, None, None]
                        g1 = torch.where(mask, g1, g)
                    result = preconditioner.fop(g, 2 * (g1 - g), config.fop_zero_tol)
                else:
                    result = preconditioner.kfac(g)
                chosen = result.direction
                if config.graft == "adamw":
                    v = exp_avg_sq if every else exp_avg_sq[picked]
                    chosen = graft(chosen, adam_step_norm(g, v, beta2, config.adamw_eps, step, ok))
                    if not every:
                        exp_avg_sq[picked] = v
                if every:
                    direction = chosen
                    scalars = result._replace(direction=direction)
                else:
                    direction[ready] = chosen
                    for name in SCALARS:
                        getattr(scalars, name)[ready] = getattr(result, name)
            if waiting:
                picked = [rows[j] for j in waiting]
                for row in picked:
                    self._report_waiting(bucket.indices[row])
                v = exp_avg_sq[picked]
                direction[waiting] = adam_direction(
                    g_avg[waiting], v, beta2, config.adamw_eps, step, ok
                )
                exp_avg_sq[picked] = v
            direction = torch.where(ok, direction, 0.0)
            out.append(
                BucketStep(bucket, rows, direction, g_avg, scalars._replace(direction=direction))
            )
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
        return [layer.grad_matrix() for layer in self.layers]

    def layer_directions(
        self, steps: list[BucketStep], gradients: list[Tensor | None]
    ) -> tuple[list[tuple[int, Tensor]], dict[str, Tensor], Tensor]:
        """(layer index, direction) for every layer with a gradient, the per-layer FOP
        statistics, and sum_l <n_l, g_l> (the KL clip's quadratic term).

        Under FSDP2 each owner computed only its layers: one summing all-reduce gives every
        rank every direction (zeros elsewhere), the statistics and the sum.
        """
        vg = sum((inner(s.direction, s.g_avg).sum() for s in steps), torch.zeros(()))
        if not self.sharded:
            pairs = [
                (s.bucket.indices[row], matrix)
                for s in steps
                for row, matrix in zip(s.rows, s.direction)
            ]
            return pairs, step_statistics(steps) if steps else {}, vg
        computed = {
            s.bucket.indices[row]: (matrix, [getattr(s.scalars, k)[j] for k in SCALARS])
            for s in steps
            for j, (row, matrix) in enumerate(zip(s.rows, s.direction))
        }
        like = self.layers[0].weight
        tensors, owned, present = [], [], []
        for index, grad in enumerate(gradients):
            if grad is None:
                continue
            present.append(index)
            matrix, scalars = computed.get(index, (None, None))
            mine = matrix is not None
            tensors.append(matrix if mine else grad.new_zeros(grad.shape, dtype=torch.float32))
            tensors.append(torch.stack(scalars) if mine else grad.new_zeros(len(SCALARS)))
            owned += [mine, mine]
        vg = vg.reshape(1).to(like.device, torch.float32)
        self.communicator.share_owned([*tensors, vg], [*owned, True])  # vg: summed over ranks
        pairs = list(zip(present, tensors[0::2]))
        scalars = torch.stack(tensors[1::2]) if present else torch.zeros(0, len(SCALARS))
        statistics = {k: scalars[:, i] for i, k in enumerate(SCALARS)}
        if present:
            statistics["rho_abs"] = statistics["rho"].abs()
        return pairs, statistics, vg.reshape(())

    def _report_waiting(self, index: int) -> None:
        """Say why a targeted layer gets gradients but has no curvature (once)."""
        name = self.names[index]
        if self.capture.stats[index].examples > 0:
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
                state = {
                    "factor_updates": torch.tensor(bucket.factor_updates[row]),
                    "decomposed": torch.tensor(int(bucket.ready[row])),
                    "A": bucket.A[row],
                    "G": bucket.G[row],
                    **{key: value[row] for key, value in bucket.decomposition.items()},
                }
                if self.config.graft == "adamw" or bucket.graft_exp_avg_sq is not None:
                    state["graft_exp_avg_sq"] = bucket.second_moment()[row]
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
            bucket._cache = None

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
            expected = {
                "A": (bucket.in_dim,) * 2,
                "G": (bucket.out_dim,) * 2,
                "graft_exp_avg_sq": (bucket.out_dim, bucket.in_dim),
                **bucket.method.state_shapes(bucket.in_dim, bucket.out_dim),
            }
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

    def remove(self) -> None:
        self.capture.remove()


def _load_layer(bucket: ShapeBucket, row: int, state: dict[str, Any]) -> None:
    targets = {"A": bucket.A, "G": bucket.G, **bucket.decomposition}
    if "graft_exp_avg_sq" in state:
        targets["graft_exp_avg_sq"] = bucket.second_moment()
    for key, value in state.items():
        if key in targets:
            targets[key][row] = value.to(device=bucket.A.device, dtype=torch.float32)
    bucket.factor_updates[row] = int(state.get("factor_updates", int("A" in state)))
    # Layouts before "decomposed" saved the decomposition only once it existed.
    bucket.ready[row] = bool(state.get("decomposed", bucket.method.STATE_KEYS[0] in state))


SCALARS = ("beta", "eta", "rho", "kfac_cosine")


def step_statistics(steps: list[BucketStep]) -> dict[str, Tensor]:
    """Per-layer FOP scalars of a step, one tensor each (kept on the device until read)."""
    stacked = {name: torch.cat([getattr(s.scalars, name) for s in steps]) for name in SCALARS}
    return {**stacked, "rho_abs": stacked["rho"].abs()}


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


def _statistic_shape(kind: str, in_dim: int, out_dim: int) -> tuple[int, int]:
    return {"A": (in_dim, in_dim), "G": (out_dim, out_dim), "g1": (out_dim, in_dim)}[kind]


def _stack(tensors: list[Tensor | None], shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.stack([t if t is not None else like.new_zeros(shape) for t in tensors])

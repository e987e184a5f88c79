"""``hf_fop.plan``: what FOP would precondition in a model, and what that costs, before training.

It reads only the model's module structure and parameter shapes, so it works on a model built
on the meta device (``with torch.device("meta"): model = AutoModelForCausalLM.from_config(c)``)
and allocates nothing. The byte counts are those of the tensors FOP allocates once it has taken
a step (tests/test_plan.py holds them against a real optimizer): per preconditioned layer its
two factors, their decomposition, the grafting second moment (layers that graft), the rotated
second moment (``curvature="eigen_corrected"``) and the update's moment; AdamW's two moments
and step count for every other parameter.

Refresh work is counted as 9 d^3 flops per decomposed d x d block (the symmetric QR algorithm
with eigenvectors; Golub & Van Loan). An eigendecomposition runs far below a GPU's matmul
rate, so seconds estimated from it are a lower bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hf_fop.blocks import BlockLayout
from hf_fop.bucket_data import factor_layouts, factors_from_gradient, layer_state_shapes
from hf_fop.config import FOPConfig
from hf_fop.distributed import assign_layers, layouts_cost
from hf_fop.grafting import layer_graft
from hf_fop.partition import Partition, configured_partition, unwrap_model

FP32 = 4
# Flops of one symmetric eigendecomposition with eigenvectors, per d^3.
EIGH_FLOPS_PER_CUBE = 9


@dataclass
class LayerPlan:
    """One preconditioned layer: its gradient matrix (out x in, bias folded in) and costs."""

    name: str
    out_dim: int
    in_dim: int
    layout_A: BlockLayout
    layout_G: BlockLayout
    # Everything the layer keeps (bucket_data.layer_state_shapes): factors, decomposition,
    # moments; all with its owner under FSDP2.
    state_bytes: int
    refresh_flops: float


@dataclass
class Plan:
    """The report ``plan()`` returns; ``str(plan)`` prints it."""

    layers: list[LayerPlan]
    # Why each supported layer that is not preconditioned is not.
    excluded: dict[str, str]
    adamw_params: int
    adamw_side_bytes: int  # AdamW's state for the parameters FOP leaves to it
    adamw_state_bytes: int  # AdamW's state for the whole model, for comparison
    world_size: int = 1
    sharded: bool = False
    owners: list[int] = field(default_factory=list)

    @property
    def fop_params(self) -> int:
        return sum(layer.out_dim * layer.in_dim for layer in self.layers)

    @property
    def state_bytes(self) -> int:
        """FOP's whole optimizer state (preconditioned layers and AdamW side), all ranks."""
        return sum(layer.state_bytes for layer in self.layers) + self.adamw_side_bytes

    @property
    def refresh_flops(self) -> float:
        """Flops of one refresh of every layer's decomposition (all ranks together)."""
        return sum(layer.refresh_flops for layer in self.layers)

    @property
    def state_bytes_per_rank(self) -> int:
        """The most any rank holds: under FSDP2 (``sharded``) each layer's curvature on its
        owner and AdamW's moments split across the ranks; otherwise (one process, DDP) all."""
        if not self.sharded or self.world_size == 1:
            return self.state_bytes
        owned = [0] * self.world_size
        for layer, owner in zip(self.layers, self.owners):
            owned[owner] += layer.state_bytes
        return max(owned) + math.ceil(self.adamw_side_bytes / self.world_size)

    @property
    def refresh_flops_per_rank(self) -> float:
        """The most refresh work one rank does (decompositions are split across ranks under
        DDP by cost at each refresh, and done by each layer's owner under FSDP2)."""
        if self.world_size == 1:
            return self.refresh_flops
        work = [0.0] * self.world_size
        for layer, owner in zip(self.layers, self.owners):
            work[owner] += layer.refresh_flops
        return max(work)

    def totals(self) -> str:
        """One line: the optimizer state against AdamW's, and the work of one refresh."""
        ratio = self.state_bytes / max(self.adamw_state_bytes, 1)
        return (
            f"optimizer state: {_bytes(self.state_bytes)} (AdamW: "
            f"{_bytes(self.adamw_state_bytes)}, {ratio:.2f}x); one refresh: "
            f"{_flops(self.refresh_flops)}"
        )

    def __str__(self) -> str:
        lines = [
            f"FOP plan: {len(self.layers)} preconditioned layers ({self.fop_params:,} "
            f"parameters), AdamW for {self.adamw_params:,} parameters",
            f"{'layers':<44} {'count':>5} {'out x in':>13} {'A blocks':>11} {'G blocks':>11} "
            f"{'state/layer':>12} {'refresh':>10}",
        ]
        for (pattern, shape, blocks_A, blocks_G), group in _grouped(self.layers).items():
            layer = group[0]
            lines.append(
                f"{pattern:<44} {len(group):>5} {shape:>13} {blocks_A:>11} {blocks_G:>11} "
                f"{_bytes(layer.state_bytes):>12} {_flops(layer.refresh_flops):>10}"
            )
        for reason in sorted(set(self.excluded.values())):
            names = [name for name, why in self.excluded.items() if why == reason]
            lines.append(f"not preconditioned ({reason}): {len(names)} layers, e.g. {names[0]}")
        lines.append(self.totals())
        if self.world_size > 1:
            kind = "FSDP2" if self.sharded else "DDP"
            lines.append(
                f"per rank ({kind}, {self.world_size} ranks): {_bytes(self.state_bytes_per_rank)}"
                f" of state, {_flops(self.refresh_flops_per_rank)} per refresh"
            )
        return "\n".join(lines)


def plan(
    model: nn.Module,
    config: FOPConfig | None = None,
    *,
    world_size: int = 1,
    sharded: bool = False,
    **settings: Any,
) -> Plan:
    """What ``FOP(model, config, **settings)`` would precondition and hold (module docstring).

    ``world_size`` and ``sharded`` (FSDP2) size the per-rank figures; ``sharded=False`` with
    several ranks is DDP, where every rank holds the whole state."""
    config = (config or FOPConfig()).replace(**settings)
    model = unwrap_model(model)
    partition = configured_partition(model, config)
    return plan_partition(model, partition, config, world_size=world_size, sharded=sharded)


def plan_partition(
    model: nn.Module,
    partition: Partition,
    config: FOPConfig,
    world_size: int = 1,
    sharded: bool = False,
) -> Plan:
    """``plan`` for a partition already made (FOP logs its own)."""
    layers, costs = [], []
    for name, adapter in partition.layers:
        # The cost the distributors balance ranks by: d^3 summed over the decomposed blocks.
        layouts = factor_layouts(adapter, config.blocking)
        costs.append(layouts_cost(*layouts))
        graft = layer_graft(config.graft, factors_from_gradient(adapter, config.factor_source))
        layers.append(_layer_plan(name, *layouts, config, graft, costs[-1]))
    adamw_side = [p for _, p in partition.adamw_decay + partition.adamw_no_decay]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Plan(
        layers=layers,
        excluded=dict(partition.excluded),
        adamw_params=sum(p.numel() for p in adamw_side),
        adamw_side_bytes=sum(adamw_state_bytes(p) for p in adamw_side),
        adamw_state_bytes=sum(adamw_state_bytes(p) for p in trainable),
        world_size=world_size,
        sharded=sharded,
        owners=assign_layers(costs, world_size) if layers else [],
    )


def adamw_state_bytes(param: nn.Parameter) -> int:
    """torch.optim.AdamW's state of one parameter: two moments like it, an fp32 step count."""
    return 2 * param.numel() * param.element_size() + FP32


def _layer_plan(
    name: str,
    layout_A: BlockLayout,
    layout_G: BlockLayout,
    config: FOPConfig,
    graft: str,
    decomposition_cost: float,
) -> LayerPlan:
    shapes = layer_state_shapes(layout_A, layout_G, graft, config.curvature)
    numel = sum(math.prod(shape) for shape in shapes.values())
    flops = EIGH_FLOPS_PER_CUBE * decomposition_cost
    return LayerPlan(name, layout_G.dim, layout_A.dim, layout_A, layout_G, numel * FP32, flops)


def _grouped(layers: list[LayerPlan]) -> dict[tuple[str, str, str, str], list[LayerPlan]]:
    """Layers of one role in every block (``model.layers.*.mlp.up_proj``), one row each."""
    groups: dict[tuple[str, str, str, str], list[LayerPlan]] = {}
    for layer in layers:
        key = (
            re.sub(r"\.\d+(?=\.|$)", ".*", layer.name),
            f"{layer.out_dim} x {layer.in_dim}",
            _blocks(layer.layout_A),
            _blocks(layer.layout_G),
        )
        groups.setdefault(key, []).append(layer)
    return groups


def _blocks(layout: BlockLayout) -> str:
    return f"{layout.count} x {layout.size}" if layout.blocked else "whole"


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def _flops(count: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if count < 1000:
            return f"{count:.3g} {unit}flop"
        count /= 1000
    return f"{count:.3g} Pflop"

"""Which parameters FOP preconditions and which go to AdamW, and a readable report of the split.

Layers are chosen by type and position, never by model-specific names (they change between
transformers releases): by default the Linear/Conv layers inside repeated blocks (the
``nn.ModuleList`` of transformer layers), or every supported layer when a model has no blocks.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from hf_fop.blocks import Blocking
from hf_fop.bucket_data import factor_layouts
from hf_fop.config import FOPConfig
from hf_fop.layers import EmbeddingAdapter, LayerAdapter, UnsupportedLayerError, make_adapter


class UnsupportedWrapperError(TypeError):
    """The model is wrapped in a way that breaks per-layer curvature."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP or torch.compile; a clear error for wrappers FOP cannot serve."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            "FOP needs the model (an nn.Module), not its parameters, because it hooks the "
            f"model's layers: use FOP(model, ...), got {type(model).__name__}"
        )
    name = type(model).__name__
    if isinstance(model, nn.DataParallel) and not isinstance(
        model, nn.parallel.DistributedDataParallel
    ):
        raise UnsupportedWrapperError(
            "nn.DataParallel replicates the model on every forward, so FOP's per-layer hooks see "
            "copies. Use DistributedDataParallel instead: `accelerate launch` or `torchrun`."
        )
    if _is_fsdp2(model):
        return model  # fully_shard keeps the module (its parameters become DTensors)
    if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
        raise UnsupportedWrapperError(
            "FSDP1 (FullyShardedDataParallel) flattens the weights that FOP preconditions as "
            "whole matrices. Use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: "
            "fsdp_version: 2) or DistributedDataParallel."
        )
    if name in ("DeepSpeedEngine", "PipelineEngine"):
        raise UnsupportedWrapperError(
            "DeepSpeed partitions parameters and gradients (ZeRO), which breaks per-layer "
            "curvature. Use DistributedDataParallel (accelerate without a DeepSpeed config)."
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return unwrap_model(model.module)
    if hasattr(model, "_orig_mod") and name == "OptimizedModule":  # torch.compile
        return unwrap_model(model._orig_mod)
    return model


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


@dataclass
class Partition:
    """The split of a model's trainable parameters between FOP and AdamW."""

    layers: list[tuple[str, LayerAdapter]] = field(default_factory=list)
    adamw_decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    adamw_no_decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    # Supported-type modules that went to AdamW anyway, with the reason.
    excluded: dict[str, str] = field(default_factory=dict)
    # Preconditioned layers found at run time to get gradients without curvature (their hooks
    # never fire), updated as by AdamW, with the reason.
    uncovered: dict[str, str] = field(default_factory=dict)

    @property
    def fop_params(self) -> int:
        return sum(p.numel() for _, layer in self.layers for p in layer.params)

    @property
    def adamw_params(self) -> int:
        return sum(p.numel() for _, p in self.adamw_decay + self.adamw_no_decay)

    def summary(self) -> str:
        lines = [
            f"FOP preconditions {len(self.layers)} layers ({self.fop_params:,} parameters); "
            f"AdamW updates {len(self.adamw_decay) + len(self.adamw_no_decay)} tensors "
            f"({self.adamw_params:,} parameters)."
        ]
        if self.layers:
            lines.append("  preconditioned: " + _abbreviate([name for name, _ in self.layers]))
        adamw_names = [name for name, _ in self.adamw_decay + self.adamw_no_decay]
        if adamw_names:
            lines.append("  AdamW: " + _abbreviate(adamw_names))
        for reason, count in Counter(self.excluded.values()).items():
            names = [n for n, r in self.excluded.items() if r == reason]
            lines.append(f"  not preconditioned ({reason}): {_abbreviate(names)} [{count}]")
        for name, reason in self.uncovered.items():
            lines.append(f"  updated as by AdamW at run time ({reason}): {name}")
        return "\n".join(lines)


def partition_model(
    model: nn.Module,
    targets: str | Sequence[str] = "auto",
    skip: Sequence[str] = (),
    max_factor_dim: int = 8192,
    block_size: int | None = None,
    embeddings: bool = False,
    diagonal_above: int | None = 16384,
) -> Partition:
    """Split ``model``'s trainable parameters: chosen layers to FOP, everything else to AdamW.

    With ``block_size``, ``max_factor_dim`` bounds the factor blocks, not the whole sides;
    sides longer than ``diagonal_above`` are kept diagonal, so they never exceed it.
    ``embeddings``: nn.Embedding modules are candidates too (with a tied output layer, which
    shares their weight); ``"auto"`` and ``"all-linear"`` take every one, a regex or a list
    those it names."""
    # Each module is adapted once: (adapter, None), or (None, why) for a supported type in a
    # configuration that is not (reported, not dropped); other module types are no candidates.
    sequence_first, uncalled = _layouts(model)
    adapted = {
        name: (module, *_adapt(module, name in sequence_first, uncalled.get(name), embeddings))
        for name, module in model.named_modules()
    }
    candidates = [(name, m) for name, (m, adapter, why) in adapted.items() if adapter or why]
    chosen = _select_targets(model, candidates, targets)
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    blocking = Blocking(block_size, diagonal_above)
    partition = Partition()
    taken: set[int] = set()
    for name, module in candidates:
        if name not in chosen:
            continue
        _, adapter, unsupported = adapted[name]
        reason = _exclusion_reason(name, module, adapter, skip, max_factor_dim, blocking, owners)
        if reason is None and adapter is not None and any(id(p) in taken for p in adapter.params):
            reason = "tied weight"
        if reason is not None or adapter is None:
            partition.excluded[name] = reason or unsupported
            continue
        partition.layers.append((name, adapter))
        taken.update(id(p) for p in adapter.params)
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in taken:
            continue
        # Usual Hugging Face split: no weight decay on biases and norm weights (1-D tensors).
        group = partition.adamw_decay if param.dim() >= 2 else partition.adamw_no_decay
        group.append((name, param))
    _check_selection(partition, targets)
    return partition


def configured_partition(model: nn.Module, config: FOPConfig) -> Partition:
    """``partition_model`` with the settings of ``config``."""
    blocking = config.blocking
    return partition_model(
        model,
        config.targets,
        config.skip,
        config.max_factor_dim,
        blocking.block_size,
        config.precondition_embeddings,
        blocking.diagonal_above,
    )


def _check_selection(partition: Partition, targets: str | Sequence[str]) -> None:
    """A selection that takes nothing, or drops a layer the user named, must not pass silently."""
    if not isinstance(targets, str):
        dropped = {
            n: r
            for n, r in partition.excluded.items()
            if any(n == t or n.endswith("." + t) for t in targets)
        }
        if dropped:
            raise ValueError(
                "targets names layers that cannot be preconditioned: "
                + "; ".join(f"{n} ({r})" for n, r in dropped.items())
                + ". Remove them from targets (they are then updated by AdamW)."
            )
        return
    if not partition.layers:
        reasons = f" (excluded: {dict(partition.excluded)})" if partition.excluded else ""
        warnings.warn(
            f"targets={targets!r} selects no layer to precondition{reasons}: FOP updates every "
            "parameter with AdamW. Use targets='all-linear', a regex or a list of module names.",
            stacklevel=3,
        )


def _layouts(model: nn.Module) -> tuple[set[str], dict[str, str]]:
    """Layers that see sequence-first inputs, and layers whose parent never calls them.

    PyTorch's transformer layers with batch_first=False feed their Linear layers (L, N, d);
    nn.MultiheadAttention applies out_proj's weight directly, so hooks on out_proj never fire.
    """
    sequence_first: set[str] = set()
    uncalled: dict[str, str] = {}
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, layers) and not module.self_attn.batch_first:
            sequence_first.update(prefix + child for child, _ in module.named_modules() if child)
        if isinstance(module, nn.MultiheadAttention):
            for child, _ in module.named_modules():
                if child:
                    uncalled[prefix + child] = (
                        "inside nn.MultiheadAttention, which uses the weight without calling it"
                    )
    return sequence_first, uncalled


def _adapt(
    module: nn.Module, sequence_first: bool, uncalled: str | None, embeddings: bool
) -> tuple[LayerAdapter | None, str | None]:
    try:
        if embeddings and isinstance(module, nn.Embedding):
            return EmbeddingAdapter(module), None
        adapter = make_adapter(module, sequence_first)
    except UnsupportedLayerError as error:
        return None, str(error)
    if adapter is not None and uncalled is not None:
        return None, uncalled
    return adapter, None


def _select_targets(
    model: nn.Module, candidates: list[tuple[str, nn.Module]], targets: str | Sequence[str]
) -> set[str]:
    names = [name for name, _ in candidates]
    if isinstance(targets, str):
        if targets == "auto":
            in_blocks = _modules_in_blocks(model)
            inside = [name for name, module in candidates if id(module) in in_blocks]
            embeddings = [name for name, module in candidates if isinstance(module, nn.Embedding)]
            return set(inside + embeddings if inside else names)
        if targets == "all-linear":
            return set(names)
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(
                f"targets={targets!r} is not 'auto', 'all-linear' or a valid regular expression: "
                f"{error}"
            ) from None
        return {name for name in names if pattern.search(name)}
    wanted = set(targets)
    chosen = {n for n in names if n in wanted or any(n.endswith("." + t) for t in wanted)}
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in chosen)]
    if missing:
        raise ValueError(
            f"targets {sorted(missing)} name no Linear, Conv1D or Conv2d module of the model (nor "
            "an Embedding, with precondition_embeddings); "
            f"supported modules include {_abbreviate(names)}"
        )
    return chosen


def _modules_in_blocks(model: nn.Module) -> set[int]:
    """ids of the modules inside the elements of an nn.ModuleList (the repeated layers)."""
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                inside.update(id(m) for m in block.modules())
    return inside


def _exclusion_reason(
    name: str,
    module: nn.Module,
    adapter: LayerAdapter | None,
    skip: Sequence[str],
    max_factor_dim: int,
    blocking: Blocking,
    owners: Counter,
) -> str | None:
    if any(re.search(pattern, name) for pattern in skip):
        return "skip list"
    weight = module.weight
    bias = getattr(module, "bias", None)
    if not weight.requires_grad:
        return "frozen"
    if bias is not None and not bias.requires_grad:
        return "frozen bias"
    if owners[id(weight)] > 1 and (adapter is None or adapter.hooked):
        # Hooks see one use of a tied weight; a layer without hooks reads its whole gradient.
        return "tied weight"
    if adapter is not None:
        sides = (layout.size for layout in factor_layouts(adapter, blocking))
        if max(sides) > max_factor_dim:
            blocks = " (block)" if blocking.block_size is not None else ""
            return f"factor{blocks} larger than max_factor_dim={max_factor_dim}"
    return None


def _abbreviate(names: Sequence[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"

"""Who holds, decomposes and computes what across ranks: one module per kind of parallelism.

The rest of FOP never asks which parallelism it runs under; it asks its distributor, chosen
once (when the optimizer is built, or when ``fully_shard`` is first seen):

- ``replicated.py``: one process, or DDP. Every rank holds every layer's curvature and gradient.
- ``sharded.py``: FSDP2. Each layer's curvature lives on one owner; whole gradients are
  gathered, directions shared, and each rank updates its own rows. Its tensor helpers (no-ops
  on plain tensors) serve the AdamW side on shards.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_fop.blocks import Blocking
from hf_fop.distributed import Communicator
from hf_fop.distributors.replicated import ReplicatedDistributor
from hf_fop.distributors.sharded import ShardedDistributor, is_sharded
from hf_fop.layers import LayerAdapter

Distributor = ReplicatedDistributor


def make_distributor(
    layers: Sequence[LayerAdapter], communicator: Communicator, blocking: Blocking | None = None
) -> Distributor:
    """The distributor for how ``layers`` are held now (sharded by FSDP2 or not)."""
    if any(is_sharded(layer.weight) for layer in layers):
        return ShardedDistributor(layers, communicator, blocking)
    return ReplicatedDistributor(layers, communicator, blocking)


def sharded_since(distributor: Distributor, layers: Sequence[LayerAdapter]) -> bool:
    """Whether ``layers`` were sharded by FSDP2 after ``distributor`` was chosen."""
    return not distributor.sharded and any(is_sharded(layer.weight) for layer in layers)

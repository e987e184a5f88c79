"""How p.grad relates to the gradient the hooks saw: a few random probes (pure functions).

Between the backward pass and ``step()``, code FOP does not see may rescale ``p.grad``:
gradient clipping (the Trainer's ``max_grad_norm``, ``clip_grad_norm_``), an ``unscale_``, a
user's own scaling. The hooks' g1 is not rescaled with it, so g_diff = 2 (g1 - g_avg) would
mix two scales: once clipping binds, g1 swamps g_avg, and FOP's correction and the second
moment of the halves follow g1. Each hooked layer therefore also sums, over the rows it sees,

    t_k = u_k^T (sum_rows d a^T) w_k   for k = 1..PROBES

with fixed random vectors u_k (out) and w_k (in'). t is linear in the gradient, so it adds up
over micro-batches and averages across ranks exactly as g1 does, and the same probes of the
gradient in p.grad, t'_k = u_k^T g w_k, give the factor p.grad carries by least squares,
c = <t', t> / <t, t>; g1 takes it. Without any rescaling c = 1 to round-off. A Linear
layer's own backward probes the weight gradient it computes anyway (out * in' flops a probe,
elementwise); other hooks probe the rows, (in + out) flops a row and probe.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

PROBES = 2
_SEED = 20_260_101


@functools.cache
def _probe_vectors(out_dim: int, in_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(_SEED)
    u = torch.randn(out_dim, PROBES, generator=generator)
    w = torch.randn(in_dim, PROBES, generator=generator)
    return u.to(device), w.to(device)


def probe_vectors(out_dim: int, in_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(u, w): (out, PROBES) and (in', PROBES), the same for every layer of one shape (so a
    bucket of layers probes its stack in one call), on ``device``."""
    return _probe_vectors(out_dim, in_dim, torch.device(device))


def probe_rows(d_rows: Tensor, x_rows: Tensor, bias: bool) -> Tensor:
    """t of one call, (PROBES,): sum over rows of (u^T d)(w^T a), a = [x, 1] where ``bias``,
    without forming the gradient matrix (for hooks that do not compute it)."""
    in_dim = x_rows.shape[-1] + int(bias)
    u, w = probe_vectors(d_rows.shape[-1], in_dim, d_rows.device)
    projected = x_rows @ w[: x_rows.shape[-1]]
    if bias:
        projected = projected + w[-1]
    return ((d_rows @ u) * projected).sum(0)


def probe_matrices(grads: Tensor) -> Tensor:
    """t of a stack of gradient matrices (..., out, in'): (..., PROBES). Elementwise products
    and sums only, so a backward that probes its gradient does no matmul work beyond
    autograd's."""
    u, w = probe_vectors(grads.shape[-2], grads.shape[-1], grads.device)
    grads = grads.float()
    return torch.stack(
        [((grads * u[:, k, None]).sum(-2) * w[:, k]).sum(-1) for k in range(PROBES)], -1
    )


def gradient_factor(probed: Tensor, seen: Tensor) -> Tensor:
    """c = <t', t> / <t, t> per layer, (...): the factor by which the gradient in p.grad
    (``probed``, t') differs from the one the hooks saw (``seen``, t); 1 where they saw none."""
    norm = (seen * seen).sum(-1)
    valid = norm > 0
    return torch.where(valid, (probed * seen).sum(-1) / torch.where(valid, norm, 1.0), 1.0)

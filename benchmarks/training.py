"""One benchmark run: a task's model trained by one optimizer under the shared schedule (linear
warm-up over the first 10% of the steps, then cosine decay to zero), evaluated along the way,
and the cache of finished runs. Every benchmark that trains (rate_curves, the decoder pretrained
for fine-tuning in real_tasks) trains through ``train_run``."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from benchmarks.optimizers import VARIANTS, make_optimizer
from hf_fop import FOP, FOPConfig

RESULTS = Path(__file__).resolve().parent / "results"


class RealTask(Protocol):
    """What a run needs of a task (real_tasks.RealTask): a protocol, so that the registry, which
    trains its pretrained decoder through ``train_run``, is not imported back."""

    name: str
    make_model: Callable[[], nn.Module]
    sample: Callable[[int, torch.Generator], Callable[[nn.Module], Tensor]]
    evaluate: Callable[[nn.Module], float]
    max_grad_norm: float | None

    @property
    def higher_is_better(self) -> bool: ...


def warmup_cosine(steps: int) -> Any:
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_run(
    task: RealTask,
    name: str,
    lr: float,
    batch: int,
    steps: int,
    seed: int,
    eval_every: int,
    damping: float | None = None,
    **settings: Any,
) -> list[dict[str, float]]:
    """One run: the metric (and FOP's statistics) every ``eval_every`` steps and at the end
    (``settings``: more FOP settings, for exploratory runs)."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = make_optimizer(name, model, lr, damping, **settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    generator = torch.Generator().manual_seed(seed)
    curve: list[dict[str, float]] = []
    seconds, window = 0.0, []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = task.sample(batch, generator)(model)
        if not torch.isfinite(loss):
            curve.append({"step": step, "metric": worst_metric(task), "diverged": 1})
            return curve
        optimizer.zero_grad()
        loss.backward()
        if task.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        if isinstance(optimizer, FOP):
            window.append(optimizer.statistics())
        if step % eval_every == 0 or step == steps:
            # Seconds measured here carry the other worker's load; see the module docstring.
            point = {"step": step, "measured_seconds": seconds, "metric": task.evaluate(model)}
            for key in ("rho_abs_mean", "kfac_cosine_mean", "kl_scale"):
                values = [w[key] for w in window if key in w]
                if values:
                    point[key] = sum(values) / len(values)
            curve.append(point)
            window = []
    return curve


def worst_metric(task: RealTask) -> float:
    """The metric a diverged run reports: the worst there is."""
    return 0.0 if task.higher_is_better else float("inf")


# Settings added after runs were cached, with the value that reproduces the code before them: a
# record without the setting is the run with that value.
SETTINGS_ADDED_SINCE: dict[str, Any] = {
    "cluster_gap": 0.0,
    "null_space_floor": 0.0,
    "graft_trust": None,
}


def cached_run(
    cache: Path | None,
    task: RealTask,
    name: str,
    lr: float,
    batch: int,
    steps: int,
    seed: int,
) -> list[dict[str, float]]:
    """The final point of ``train_run``, or that of the same run in ``cache`` (a JSON-lines
    file of earlier runs): a run is a function of its key, so a ladder grows rate by rate and
    optimizer by optimizer without training anything twice. The key holds the optimizer's
    settings with every default resolved, so a changed default or variant runs again; it does
    not see the code, so a change of the maths needs a fresh cache. A record of one of FOP's
    variants serves any variant with the same settings, and a record older than a setting
    (``SETTINGS_ADDED_SINCE``) counts as run with that setting's earlier behaviour."""
    identity = _identity(task, name, lr, batch, steps, seed)
    final = _cached_final(cache, identity)
    if final is not None:
        return final
    curve = train_run(task, name, lr, batch, steps, seed, steps)
    if cache is not None:
        with cache.open("a") as file:  # one short append per run: whole lines, any worker
            record = {"key": json.dumps(identity, default=str), "curve": curve}
            file.write(json.dumps(record) + "\n")
    return curve[-1:]


def _identity(task: RealTask, name: str, lr: float, batch: int, steps: int, seed: int) -> list:
    """A run's key: everything its result depends on except the code."""
    settings = asdict(FOPConfig().replace(**VARIANTS[name][1])) if name in VARIANTS else {}
    return [task.name, name, settings, lr, None, batch, steps, seed]


def _cached_final(cache: Path | None, identity: list) -> list[dict[str, float]] | None:
    """The final point of the run ``identity`` (``_identity``) in ``cache``, None if it holds
    none (see ``cached_run``)."""
    if cache is None or not cache.exists():
        return None
    name = identity[1]
    wanted = json.dumps(identity, default=str, sort_keys=True)
    for line in cache.read_text().splitlines():
        record = json.loads(line)
        # (older caches appended the evaluation interval to the key)
        earlier = json.loads(record["key"])[: len(identity)]
        if isinstance(earlier[2], dict) and earlier[2]:
            earlier[2] = {**SETTINGS_ADDED_SINCE, **earlier[2]}
            # Before output_factor_rows, G took the rows A took.
            earlier[2].setdefault("output_factor_rows", earlier[2].get("factor_rows"))
            if name in VARIANTS and earlier[1] in VARIANTS:
                earlier[1] = name  # FOP's variants are their settings: same settings, same run
        if json.dumps(earlier, default=str, sort_keys=True) == wanted:
            return record["curve"][-1:]
    return None


def cached_run_only(
    cache: Path | None, task: RealTask, name: str, lr: float, batch: int, steps: int, seed: int
) -> list[dict[str, float]] | None:
    """``cached_run`` without the training: None where the cache holds no such run."""
    return _cached_final(cache, _identity(task, name, lr, batch, steps, seed))


class _Inline(Executor):
    """One worker: every job in this process, in order."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def executor(workers: int) -> Executor:
    """``workers`` processes (spawned: each sets its own thread count), or this one."""
    if workers <= 1:
        return _Inline()
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

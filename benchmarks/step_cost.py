"""Per-step cost and memory of FOP and K-FAC against AdamW, Muon and SOAP on a small ViT, by width.

    python -m benchmarks.step_cost          # writes benchmarks/results/step_cost.json and .md
    git worktree add /tmp/before <rev> && python -m benchmarks.step_cost --before /tmp/before

Every optimizer of one width (AdamW, Muon, SOAP, and K-FAC and FOP at each curvature interval,
all built by ``benchmarks.optimizers``) trains its
own copy of the model in one process (one thread), the steps taken in turn, so the drift of
this machine's speed (10-15% between processes) hits all of them alike and the ratios within a
width are measured side by side. With ``--before``, the same runs on that checkout's ``hf_fop``
in a process of its own, after / before ratios therefore carry that drift.

Besides the measured times, each row carries a floor: the flops FOP (or K-FAC) cannot avoid on
top of AdamW, converted to seconds at this machine's measured matmul rate. Per preconditioned
layer (in' = in + 1 with the bias, N = the rows the layer sees): the rotations into and out of
the Kronecker eigenbasis, each 2 out in' (out + in') (K-FAC 2; FOP's difference of halves one
more; the eigen-corrected metric with the momentum before the preconditioner one more, the
gradient for its second moment), and per curvature interval the factor products
(2 N (in'^2 + out^2)) and the two refreshes of the basis: ~9 d^3 each for ``eigh``, ~9 d^3 for
the power step and QR too (Rayleigh quotients 2 d^3, the product 2 d^3, QR and its Q
~2.7 d^3, the new estimates 2 d^3), plus, for the eigen-corrected metric, carrying the moment
into the new basis (2 d^3 per side and one rotation). The refreshes cost about the same flops;
``eigh`` runs far below the matmul rate, which is what the QR refresh saves. FOP's first-half
gradient is not in it: it is one of the two matmuls the weight gradient is summed from
(hf_fop/layer_backward.py). The overhead over AdamW divided by that floor says how far the
implementation is from the work itself.

The step time is the mean over a window that spans several curvature intervals, so the
periodic factor and eigendecomposition work is amortised as in training. Curvature interval k
means factors collected and decompositions refreshed every k steps; "own" keeps the
optimizer's own schedule (the defaults: factors every step, the basis every 2).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hf_fop import FOPConfig

RESULTS = Path(__file__).resolve().parent / "results"


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in nested containers (this rank's shard of a DTensor)."""
    if isinstance(value, torch.Tensor):
        tensor = value.to_local() if hasattr(value, "to_local") else value
        return tensor.numel() * tensor.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


TOKENS = 65  # 32 x 32 images, patch 4, plus the CLS token
PATCHES = TOKENS - 1
REFRESH_FLOPS_PER_CUBE = {"eigh": 9.0, "qr": 8.7}  # module docstring


def layer_shapes(hidden: int, layers: int, every_linear: bool) -> list[tuple[int, int, int]]:
    """(in', out, rows per image) of the preconditioned layers: q, k, v, attention out and the
    MLP of each block; with ``every_linear`` also the patch embedding and the classifier."""
    block = [(hidden + 1, hidden, TOKENS)] * 4 + [
        (hidden + 1, 4 * hidden, TOKENS),
        (4 * hidden + 1, hidden, TOKENS),
    ]
    shapes = block * layers
    if every_linear:
        shapes += [(3 * 4 * 4 + 1, hidden, PATCHES), (hidden + 1, 10, 1)]
    return shapes


def resolved(config: dict[str, Any]) -> FOPConfig | None:
    """The FOPConfig a row's optimizer runs with (None for AdamW and the peers)."""
    from benchmarks.optimizers import VARIANTS
    from hf_fop import FOPConfig

    if config["optimizer"] not in VARIANTS:
        return None
    return FOPConfig().replace(**VARIANTS[config["optimizer"]][1], **schedule(config))


def schedule(config: dict[str, Any]) -> dict[str, Any]:
    """The FOP settings a row sets on top of its optimizer's own."""
    settings: dict[str, Any] = {}
    if config["interval"] is not None:
        settings["curvature_interval"] = settings["inverse_interval"] = config["interval"]
    if config["refresh"] is not None:
        settings["basis_refresh"] = config["refresh"]
    return settings


def unavoidable_flops(fop: FOPConfig, hidden: int, layers: int, batch: int) -> float:
    """Flops per step that the method of config ``fop`` adds to AdamW's step at the least."""
    corrected = fop.curvature == "eigen_corrected"
    rotations = 2 + (fop.mode == "fop") + corrected
    total = 0.0
    for in_dim, out, rows in layer_shapes(hidden, layers, fop.targets == "all-linear"):
        rotation = 2.0 * out * in_dim * (out + in_dim)
        total += rotation * rotations
        total += 2.0 * batch * rows * (in_dim**2 + out**2) / fop.curvature_interval
        refresh = REFRESH_FLOPS_PER_CUBE[fop.basis_refresh] * (in_dim**3 + out**3)
        if corrected:
            refresh += 2.0 * (in_dim**3 + out**3) + rotation
        total += refresh / fop.inverse_interval
    return total


def matmul_flops_per_second(hidden: int, batch: int) -> float:
    """Single-thread fp32 matmul rate at the size of an MLP layer's products."""
    x = torch.randn(batch * TOKENS, hidden)
    w = torch.randn(hidden, 4 * hidden)
    for _ in range(3):
        x @ w
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        x @ w
    seconds = (time.perf_counter() - start) / repeats
    return 2.0 * x.shape[0] * hidden * 4 * hidden / seconds


def _measure(configs: list[dict[str, Any]], code_path: str | None, queue: Any) -> None:
    """Train one model per configuration (all of one width), a step of each in turn."""
    import sys

    if code_path:
        sys.path.insert(0, code_path)  # the --before checkout's hf_fop
    # Imported only now, so that the hf_fop they import is the one chosen above.
    from benchmarks.distributed_step_time import _model as vit
    from benchmarks.optimizers import make_optimizer

    torch.set_num_threads(1)
    runs = []
    for config in configs:
        torch.manual_seed(0)
        model = vit(config["hidden"], layers=config["layers"])
        settings = schedule(config) if resolved(config) is not None else {}
        optimizer = make_optimizer(config["optimizer"], model, 1e-3, **settings)
        runs.append((config, model, optimizer, []))
    first = configs[0]
    images = torch.randn(first["batch"], 3, 32, 32)
    labels = torch.randint(0, 10, (first["batch"],))
    for step in range(first["warmup"] + first["steps"]):
        for _, model, optimizer, times in runs:
            start = time.perf_counter()
            loss = F.cross_entropy(model(images).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= first["warmup"]:
                times.append(time.perf_counter() - start)
    rate = matmul_flops_per_second(first["hidden"], first["batch"])
    queue.put(
        [
            {
                **config,
                "mean_step_s": sum(times) / len(times),
                "optimizer_state_bytes": tensor_bytes(optimizer.state_dict()),
                "parameters": sum(p.numel() for p in model.parameters()),
                "matmul_flops_per_s": rate,
            }
            for config, model, optimizer, times in runs
        ]
    )


def side_by_side_phase_seconds(
    task: Any, batch: int, picks: dict[str, tuple[float, float | None]], steps: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Mean seconds of each optimizer's training step on ``task`` in its two phases, measured
    side by side: ``backward`` (the forward, the backward with any hooks, the task's clipping)
    and ``step`` (``optimizer.step``).

    ``picks`` maps a name of ``benchmarks.optimizers`` to its (learning rate, damping). Every
    optimizer trains its own copy of the task's model in this process, a step of each in
    turn, on the same batches, so this machine's drift hits all of them alike. The window
    should span a few curvature intervals, so that K-FAC's and FOP's periodic work is in it.
    The split says what a cheaper ``optimizer.step`` alone could win: FOP's hooks (factor sums,
    the weight gradient in two halves) are in its backward.
    """
    from benchmarks.optimizers import make_optimizer

    runs = []
    for name, (lr, damping) in picks.items():
        torch.manual_seed(0)
        model = task.make_model()
        runs.append((name, model, make_optimizer(name, model, lr, damping), [], []))
    generator = torch.Generator().manual_seed(0)
    for step in range(warmup + steps):
        state = generator.get_state()
        for _, model, optimizer, backward_times, step_times in runs:
            generator.set_state(state)
            start = time.perf_counter()
            loss = task.sample(batch, generator)(model)
            optimizer.zero_grad()
            loss.backward()
            if task.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
            middle = time.perf_counter()
            optimizer.step()
            if step >= warmup:
                backward_times.append(middle - start)
                step_times.append(time.perf_counter() - middle)
    return {
        name: {"backward": statistics.fmean(backward), "step": statistics.fmean(stepping)}
        for name, _, _, backward, stepping in runs
    }


def run_configs(configs: list[dict[str, Any]], code_path: str | None) -> list[dict[str, Any]]:
    """The rows of ``configs``, measured together in a fresh process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(configs, code_path, queue))
    process.start()
    rows = queue.get()
    process.join()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    compare = any(r["code"] == "before" for r in rows)
    lines = [
        "| hidden | optimizer | curvature interval | basis refresh | step (ms) | x AdamW | "
        "x SOAP | x K-FAC | floor over AdamW (ms) | overhead / floor | "
        + ("before (ms) | after / before | " if compare else "")
        + "optimizer state (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if compare else "") + "---|",
    ]
    before = {_key(r): r for r in rows if r["code"] == "before"}
    for r in rows:
        if r["code"] != "after":
            continue
        preconditioned = "floor_s" in r
        cells = [
            str(r["hidden"]),
            r["optimizer"],
            "-" if not preconditioned else r["schedule"],
            "-" if not preconditioned else r["basis_refresh"],
            f"{1000 * r['mean_step_s']:.1f}",
            f"{r['ratio_to_adamw']:.2f}",
            "-" if r.get("ratio_to_soap") is None else f"{r['ratio_to_soap']:.2f}",
            "-" if r.get("ratio_to_kfac") is None else f"{r['ratio_to_kfac']:.2f}",
            "-" if not preconditioned else f"{1000 * r['floor_s']:.1f}",
            "-" if not preconditioned else f"{r['overhead_over_floor']:.1f}",
        ]
        if compare:
            old = before.get(_key(r))
            cells += [
                "-" if old is None else f"{1000 * old['mean_step_s']:.1f}",
                "-" if old is None else f"{r['mean_step_s'] / old['mean_step_s']:.2f}",
            ]
        cells.append(f"{r['optimizer_state_bytes'] / 2**20:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(row: dict[str, Any]) -> tuple:
    return (row["hidden"], row["optimizer"], row["interval"], row["refresh"])


def _options(text: str, cast: Any) -> list[Any]:
    """A comma list where "own" means the optimizer's own setting (None)."""
    return [None if item == "own" else cast(item) for item in text.split(",")]


def describe(row: dict[str, Any], fop: FOPConfig) -> None:
    """The resolved schedule and the floor of one preconditioned row, written into it."""
    row["schedule"] = (
        f"{fop.curvature_interval}"
        if fop.curvature_interval == fop.inverse_interval
        else f"{fop.curvature_interval} (basis {fop.inverse_interval})"
    )
    row["basis_refresh"] = fop.basis_refresh
    flops = unavoidable_flops(fop, row["hidden"], row["layers"], row["batch"])
    row["floor_flops"] = flops
    row["floor_s"] = flops / row["matmul_flops_per_s"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", default="64,128,256")
    parser.add_argument("--optimizers", default="kfac,fop", help="preconditioned ones")
    parser.add_argument("--peers", default="adamw,muon,soap", help="AdamW must be one")
    parser.add_argument("--intervals", default="own,10", help='"own": the optimizer\'s own')
    parser.add_argument("--refresh", default="own", help='basis refreshes, "own", "qr", "eigh"')
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--before", type=Path, default=None, help="a checkout whose hf_fop is measured alongside"
    )
    args = parser.parse_args(argv)
    peers = args.peers.split(",")
    if "adamw" not in peers:
        raise SystemExit("--peers must include adamw: every ratio is against it")
    codes = {"after": None}
    if args.before is not None:
        codes["before"] = str(args.before.resolve())
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        base = {
            "hidden": hidden,
            "layers": args.layers,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
        }
        configs = [
            {**base, "optimizer": name, "interval": None, "refresh": None} for name in peers
        ] + [
            {**base, "optimizer": name, "interval": interval, "refresh": refresh}
            for interval in _options(args.intervals, int)
            for refresh in _options(args.refresh, str)
            for name in args.optimizers.split(",")
        ]
        for code, path in codes.items():
            rows += run_configs([{**config, "code": code} for config in configs], path)
        for code in codes:
            measured = {_key(r): r for r in rows if r["code"] == code and r["hidden"] == hidden}
            adamw = measured[(hidden, "adamw", None, None)]
            soap = measured.get((hidden, "soap", None, None))
            for row in measured.values():
                row["ratio_to_adamw"] = row["mean_step_s"] / adamw["mean_step_s"]
                if soap is not None:
                    row["ratio_to_soap"] = row["mean_step_s"] / soap["mean_step_s"]
                fop = resolved(row)
                if fop is None:  # AdamW and the peers
                    continue
                describe(row, fop)
                row["overhead_over_floor"] = (row["mean_step_s"] - adamw["mean_step_s"]) / row[
                    "floor_s"
                ]
                kfac_mode = "kfac" + row["optimizer"].removeprefix("fop")
                kfac = measured.get((hidden, kfac_mode, row["interval"], row["refresh"]))
                if kfac is not None:
                    row["ratio_to_kfac"] = row["mean_step_s"] / kfac["mean_step_s"]
                print(
                    f"[{code}] hidden {hidden} {row['optimizer']} interval {row['schedule']} "
                    f"{row['basis_refresh']}: {row['ratio_to_adamw']:.2f} x AdamW",
                    flush=True,
                )
    command = "python -m benchmarks.step_cost " + " ".join(
        f"--{flag} {getattr(args, flag)}"
        for flag in ("hidden", "optimizers", "peers", "intervals", "refresh", "batch", "steps")
    )
    result = {
        "command": command
        + ("" if args.before is None else " --before <checkout of the previous step>"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 CPU thread, the "
        "optimizers of a width in turn in one process",
        "model": f"ViTForImageClassification, image 32, patch 4 (65 tokens), {args.layers} "
        "layers, MLP 4x hidden",
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "step_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows)
    (args.output_dir / "step_cost.md").write_text(
        f"Command: `{result['command']}` ({result['machine']}).\n\n{table}\n"
    )
    print(table)
    return result


if __name__ == "__main__":
    main()

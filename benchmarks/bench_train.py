"""CLIP training step: throughput (samples/s) and peak memory versus the per-device batch size.

    python benchmarks/bench_train.py [--model ViT-B-16] [--batch-sizes 64,128] [--max-batch 4096]
                                     [--precision bf16] [--grad-checkpointing] [--steps 10] [--budget-s 10]
                                     [--device cuda] [--out DIR]

Competitors, each measured in the same run on the same weights (same seed) and the same inputs:
  fastclip  create_model(name, attn_backend="auto") (fastclip's Triton attention on CUDA) + fastclip.ClipLoss()
            (the fused contrastive loss: no N x N logits).
  baseline  the same model with attn_backend="torch" (F.scaled_dot_product_attention, which picks its own
            kernel) + the naive loss fastclip.ops.reference.contrastive_loss_reference (materialised N x N
            logits, then cross-entropy over rows and columns).
One step = forward, loss, backward and an AdamW step (fastclip's training optimizer and CLIP's
hyper-parameters), under bf16 autocast on CUDA (fp32 on a CPU; --precision). Inputs, made on the device
from a fixed seed (the same for both): random images [B, 3, R, R] and random token ids [B, context] in
[1, 49406] with the end-of-text id 49407 at a random position (argmax pooling finds it); every position holds
a token, so the text tower always runs its full context. Time: median of `common.time_fn`. Memory of one
step after the first: on CUDA the allocator's peak (`peak_bytes`: what decides whether a batch fits) and its
peak beyond the resting state of weights, optimizer state and inputs (`peak_extra_bytes`); on a CPU only the
latter, as the RSS high-water mark in a fresh process (skip with --no-cpu-memory: seconds per point).

On CUDA without --batch-sizes each competitor's sweep doubles from 64 until it runs out of memory or passes
--max-batch, then bisects (--refine steps), to find its largest batch; on a CPU it runs only the listed
sizes (8,16,32 by default). Reports the throughput ratio fastclip / baseline at every batch both ran and
checks the targets: at least 1.3x the baseline's throughput at equal batch (taken at the largest batch both
fit), at least 4x its largest batch, and fastclip at 35% MFU or more there. MFU is model FLOPs per second over
the bf16 (fp32) matmul rate measured in the same run; the model FLOPs of a step are the batch times what
torch's FLOP counter counts per sample in one forward + backward of the baseline (whose SDPA attention it sees,
while fastclip's Triton kernels it cannot), the same work for both competitors. Writes bench_train.json (after
every point) and bench_train.png into --out.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file, however this is run
import common  # noqa: E402
from common import ByDevice, Column, Table  # noqa: E402

import fastclip  # noqa: E402
from fastclip.backends import resolve_attention_backend, resolve_loss_backend  # noqa: E402
from fastclip.model.factory import create_model  # noqa: E402
from fastclip.ops.reference import contrastive_loss_reference  # noqa: E402
from fastclip.train.optim import make_optimizer  # noqa: E402

IMPLEMENTATIONS = ("baseline", "fastclip")  # baseline first: the ratios need it
ATTN_BACKEND = {"fastclip": "auto", "baseline": "torch"}
TARGET_THROUGHPUT_RATIO = 1.3  # the targets: fastclip vs baseline at equal batch,
TARGET_BATCH_RATIO = 4.0  # largest batch that fits vs the baseline's,
TARGET_MFU = 0.35  # and fastclip's model FLOPs utilisation at the largest batch both fit
EOT_ID = 49407  # the highest id: argmax pooling takes the end-of-text token
OPTIMIZER = {"lr": 5e-4, "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6}  # CLIP's
DEFAULT_BATCHES = {"cuda": [64, 128, 256, 512, 1024, 2048], "cpu": [8, 16, 32]}
REFINE_MULTIPLE = 8  # bisected batch sizes are multiples of this
SEED = 0


# --------------------------------------------------------------------------------------------- inputs


def random_tokens(batch: int, context: int, device: str | torch.device, generator: torch.Generator) -> torch.Tensor:
    """[batch, context] ids in [1, EOT_ID), with EOT_ID at one random position per row."""
    tokens = torch.randint(1, EOT_ID, (batch, context), generator=generator, device=device)
    eot = torch.randint(0, context, (batch,), generator=generator, device=device)
    tokens[torch.arange(batch, device=device), eot] = EOT_ID
    return tokens


def random_batch(batch: int, image_size: int, context: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images [batch, 3, R, R] and token ids, made on `device` (the same for every competitor)."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator, device=device)
    return images, random_tokens(batch, context, device, generator)


# ----------------------------------------------------------------------------------------------- step


def loss_fn(impl: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The competitor's contrastive loss of (image features, text features, logit-scale multiplier)."""
    return fastclip.ClipLoss() if impl == "fastclip" else contrastive_loss_reference


def make_step(
    impl: str, model: str, batch: int, precision: str, grad_checkpointing: bool, device: str
) -> Callable[[], torch.Tensor]:
    """One training step (returns the detached loss) on a fresh, seeded model and optimizer.

    Module-level so that `common.cpu_peak_extra_bytes` can rebuild it in a child process.
    """
    torch.manual_seed(SEED)  # the same initial weights for both competitors
    net = create_model(model, attn_backend=ATTN_BACKEND[impl], grad_checkpointing=grad_checkpointing, device=device)
    optimizer = make_optimizer(net, **OPTIMIZER)
    images, tokens = random_batch(batch, net.image_size, net.config.text.context_length, device)
    loss = loss_fn(impl)
    autocast_dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def step() -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            image_features, text_features, scale = net(images, tokens)
            value = loss(image_features, text_features, scale)
        value.backward()
        optimizer.step()
        # set_to_none after the step: between steps only weights, optimizer state and inputs stay alive,
        # so the gradients count in the step's peak (as they do in a training loop's)
        optimizer.zero_grad(set_to_none=True)
        return value.detach()

    return step


def make_warm_step(**kwargs) -> Callable[[], torch.Tensor]:
    """`make_step` after one step: AdamW's state exists, so a measured step counts only its own memory."""
    step = make_step(**kwargs)
    step()
    return step


# -------------------------------------------------------------------------------------------- measure


FLOP_COUNT_BATCH = 32  # the batch whose step the FLOP counter runs once: small enough to fit wherever the sweep runs


@functools.cache
def flops_per_sample(model: str, precision: str, grad_checkpointing: bool, device: str) -> float:
    """Model FLOPs of one training step per sample: torch's FLOP counter over one forward + backward of the
    baseline at FLOP_COUNT_BATCH (matmuls, convolutions and SDPA; with --grad-checkpointing the recomputed
    forward counts too). Counted once per run, not per point: a step at the sweep's largest batches could
    run out of memory, and the work per sample does not depend on the batch (caption lengths aside)."""
    step = make_step("baseline", model, FLOP_COUNT_BATCH, precision, grad_checkpointing, device)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / FLOP_COUNT_BATCH


def measure_point(impl: str, batch: int, args: argparse.Namespace) -> dict:
    """Memory and time of one competitor at one batch size; raises on out-of-memory."""
    step = make_step(impl, args.model, batch, args.precision, args.grad_checkpointing, args.device)
    first_loss = step().item()  # untimed: lazy init, autotuning, AdamW's state; an OOM shows up here
    row: dict = {
        "status": "ok",
        "first_loss": first_loss,
        "peak_bytes": None,
        "state_bytes": None,
        "peak_extra_bytes": None,
    }
    if args.device == "cuda":
        # one step of its own, before the timings: do_bench's L2-flush buffer must not count
        row["peak_extra_bytes"] = common.cuda_peak_extra_bytes(step, warm=False)
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        row["state_bytes"] = row["peak_bytes"] - row["peak_extra_bytes"]  # weights, AdamW state, inputs
    elif args.cpu_memory:
        kwargs = {
            "impl": impl,
            "model": args.model,
            "batch": batch,
            "precision": args.precision,
            "grad_checkpointing": args.grad_checkpointing,
            "device": "cpu",
        }
        # no separate warm-up call in the child: make_warm_step's own first step loads what is lazy
        row["peak_extra_bytes"] = common.cpu_peak_extra_bytes(make_warm_step, kwargs)
    timing = {"warmup": args.warmup, "reps": args.steps, "budget_s": args.budget_s, "warmed": True}
    row["step"] = common.time_fn(step, args.device, **timing)
    row["samples_per_s"] = batch / (row["step"]["median_ms"] / 1e3)
    row["model_flops"] = batch * flops_per_sample(args.model, args.precision, args.grad_checkpointing, args.device)
    row["mfu"] = row["model_flops"] / (row["step"]["median_ms"] / 1e3) / (args.matmul_tflops * 1e12)
    return row


def sweep(impl: str, args: argparse.Namespace, record: common.Record) -> None:
    """Run one competitor over its batch sizes until its first out-of-memory; on a CUDA sweep, --refine
    bisection steps then narrow its largest batch down from the doubling's factor 2."""

    def point(batch: int) -> bool:
        measure = functools.partial(measure_point, impl, batch, args)
        row = {"impl": impl, "batch": batch, **common.measure_or_oom(measure, args.device)}
        record.add(row, format_row(row))
        return row["status"] == "ok"

    sizes = common.doubled(args.batch_sizes, args.max_batch) if args.sweep else args.batch_sizes
    common.sweep_until_oom(sizes, point, refine=args.refine if args.sweep else 0, multiple=REFINE_MULTIPLE)


# -------------------------------------------------------------------------------------------- summary


def summarize(rows: list[dict]) -> dict:
    """Largest batches, throughput ratios at equal batch, and the verdict on each target."""
    ok = {impl: {r["batch"]: r for r in rows if r["impl"] == impl and r["status"] == "ok"} for impl in IMPLEMENTATIONS}
    oom = {impl: any(r["impl"] == impl and r["status"] == "oom" for r in rows) for impl in IMPLEMENTATIONS}
    largest = {impl: max(ok[impl], default=None) for impl in IMPLEMENTATIONS}
    smallest_oom = {
        impl: min((r["batch"] for r in rows if r["impl"] == impl and r["status"] == "oom"), default=None)
        for impl in IMPLEMENTATIONS
    }
    common_batches = sorted(set(ok["fastclip"]) & set(ok["baseline"]))
    ratios = {b: ok["fastclip"][b]["samples_per_s"] / ok["baseline"][b]["samples_per_s"] for b in common_batches}
    # same weights and inputs: the first losses must agree (to autocast's rounding), or the two do different work
    diffs = [abs(ok["fastclip"][b]["first_loss"] - ok["baseline"][b]["first_loss"]) for b in common_batches]
    loss_diff = max(diffs, default=None)
    at = common_batches[-1] if common_batches else None
    throughput_met = None if at is None else bool(ratios[at] >= TARGET_THROUGHPUT_RATIO)
    mfu = None if at is None else ok["fastclip"][at]["mfu"]
    batch_ratio = largest["fastclip"] / largest["baseline"] if largest["fastclip"] and largest["baseline"] else None
    if batch_ratio is None or not oom["baseline"]:
        batch_met = None  # the baseline's limit was never reached: nothing to compare with
    elif batch_ratio >= TARGET_BATCH_RATIO:
        batch_met = True
    else:  # fastclip may simply have been stopped by --max-batch or the list
        batch_met = False if oom["fastclip"] else None
    return {
        "largest_batch": largest,
        "ran_out_of_memory": oom,
        "smallest_batch_out_of_memory": smallest_oom,  # the limit lies between largest_batch and this
        "throughput_ratio": ratios,
        "throughput_ratio_at": at,
        "min_throughput_ratio": min(ratios.values(), default=None),
        "largest_batch_ratio": batch_ratio,
        "max_first_loss_abs_diff": loss_diff,
        "targets": {
            "throughput_ratio": TARGET_THROUGHPUT_RATIO,
            "throughput_rule": "fastclip/baseline samples/s at the largest batch both fit",
            "largest_batch_ratio": TARGET_BATCH_RATIO,
            "largest_batch_rule": "largest fitting batch, fastclip/baseline; undecided unless both sweeps ran out of "
            "memory (or fastclip's reached the ratio)",
            "mfu": TARGET_MFU,
            "mfu_rule": "fastclip's model FLOPs per second over the measured matmul rate, at the largest batch "
            "both fit",
        },
        "fastclip_mfu": mfu,
        "mfu_target_met": None if mfu is None else bool(mfu >= TARGET_MFU),
        "throughput_target_met": throughput_met,
        "largest_batch_target_met": batch_met,
    }


TABLE = Table(
    Column("impl", 8),
    Column("batch", 6),
    Column("ms/step", 9, ".2f"),
    Column("samples/s", 10, ".1f"),
    Column("peak MiB", 9, ".0f"),
    Column("extra MiB", 9, ".0f"),
    Column("1st loss", 9, ".4f"),
    Column("MFU %", 6, ".1f"),
)


def format_row(row: dict) -> str:
    """One line of the printed table."""
    head = (row["impl"], row["batch"])
    if row["status"] != "ok":
        return common.status_line(TABLE.line(*head), row)
    mib = [row[key] / 2**20 if row[key] is not None else None for key in ("peak_bytes", "peak_extra_bytes")]
    mfu = 100 * row["mfu"]
    return TABLE.line(*head, row["step"]["median_ms"], row["samples_per_s"], *mib, row["first_loss"], mfu)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "undecided"}[met]


def print_summary(summary: dict) -> None:
    """The ratios and, for each target, whether this run met it."""
    ratios = summary["throughput_ratio"]
    print(
        "\nthroughput fastclip / baseline at equal batch: "
        + (", ".join(f"B={b}: {r:.2f}x" for b, r in ratios.items()) or "no batch where both ran")
    )
    largest = summary["largest_batch"]
    oom = summary["ran_out_of_memory"]
    diff = summary["max_first_loss_abs_diff"]
    if diff is not None:  # a large difference means the two do different work
        print(f"first-step loss, fastclip vs baseline (same weights and inputs): max |diff| {diff:.2e}")
    stopped = " (no out-of-memory: the sweep stopped first)"
    print(
        "largest batch that fit: "
        + ", ".join(f"{impl} {largest[impl]}{'' if oom[impl] else stopped}" for impl in IMPLEMENTATIONS)
    )
    at = summary["throughput_ratio_at"]
    shown = f"{ratios[at]:.2f}x at B={at}" if at is not None else "n/a"
    print(
        f"target: >= {TARGET_THROUGHPUT_RATIO}x the baseline's throughput at equal batch: {shown} "
        f"-> {_verdict(summary['throughput_target_met'])}"
    )
    batch_ratio = summary["largest_batch_ratio"]
    shown = f"{batch_ratio:.2f}x" if batch_ratio is not None else "n/a"
    verdict = _verdict(summary["largest_batch_target_met"])
    print(f"target: >= {TARGET_BATCH_RATIO}x the baseline's largest batch: {shown} -> {verdict}")
    mfu = summary["fastclip_mfu"]
    shown = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    verdict = _verdict(summary["mfu_target_met"])
    print(f"target: fastclip MFU >= {100 * TARGET_MFU:.0f}% at that batch: {shown} -> {verdict}")


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """samples/s and (where measured) peak memory versus batch size, one line per competitor."""
    ok = [r for r in rows if r["status"] == "ok"]
    memory_key = "peak_bytes" if any(r["peak_bytes"] for r in ok) else "peak_extra_bytes"
    speed, memory = {}, {}
    for impl in IMPLEMENTATIONS:
        mine = sorted((r for r in ok if r["impl"] == impl), key=lambda r: r["batch"])
        speed[impl] = ([r["batch"] for r in mine], [r["samples_per_s"] for r in mine])
        memory[impl] = ([r["batch"] for r in mine], [r[memory_key] / 2**20 if r[memory_key] else None for r in mine])
    panels = [
        {"title": "training-step throughput", "xlabel": "batch per device", "ylabel": "samples / s", "series": speed}
    ]
    if any(r[memory_key] for r in ok):
        label = "peak allocated (MiB)" if memory_key == "peak_bytes" else "peak beyond weights + optimizer (MiB)"
        panels.append({"title": "peak memory", "xlabel": "batch per device", "ylabel": label, "series": memory})
    return common.plot_lines(path, panels, ncols=len(panels), title=title)


# ----------------------------------------------------------------------------------------------- main


def fastclip_backends(device: str, precision: str) -> dict[str, str]:
    """What fastclip's "auto" resolves to here (the record shows whether the fused kernels really ran)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)  # CLIP's head dim; under autocast q is bf16
    loss = resolve_loss_backend("auto", torch.device(device), dtype)  # the same for fp32, bf16 and fp16 features
    return {"attention": resolve_attention_backend("auto", q), "loss": loss}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.benchmark_parser(__doc__)
    common.add_device_argument(parser)
    parser.add_argument(
        "--model", default=ByDevice("ViT-B-16", "demo-ViT"), help="model config name (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=common.int_list,
        help="comma-separated, run exactly these (default: cuda 64, 128, ... doubling until out of "
        "memory or --max-batch; cpu 8,16,32)",
    )
    parser.add_argument("--max-batch", type=int, default=32768, help="cuda sweep: largest batch to try (default 32768)")
    parser.add_argument(
        "--refine",
        type=int,
        default=2,
        help="cuda sweep: bisection steps after the first out-of-memory (default 2: the largest "
        "batch to within a quarter)",
    )
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=ByDevice("bf16", "fp32"),
        help="autocast dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute residual blocks in the backward (both)"
    )
    common.add_timing_arguments(
        parser,
        warmup=ByDevice(3, 1),
        reps=ByDevice(10, 3),
        budget_s=ByDevice(10.0, 3.0),
        unit="steps",
        reps_flag="--steps",
    )
    common.add_cpu_memory_argument(parser)
    common.add_out_argument(parser)
    args = common.parse_benchmark_args(parser, argv)
    args.sweep = args.device == "cuda" and not args.batch_sizes  # only a GPU sweeps until out of memory
    if not args.batch_sizes:
        args.batch_sizes = [b for b in DEFAULT_BATCHES[args.device] if b <= args.max_batch] or [args.max_batch]
    return args


def train_config(args: argparse.Namespace) -> dict:
    """The JSON's "config": what was run, and how each figure is defined."""
    return {
        "device": args.device,
        "model": args.model,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "batch_sizes": args.batch_sizes,
        "sweep_until_oom": args.sweep,
        "max_batch": args.max_batch if args.sweep else None,
        "refine": args.refine if args.sweep else 0,
        "warmup": args.warmup,
        "steps": args.steps,
        "budget_s": args.budget_s,
        "optimizer": {"name": "AdamW (fastclip.train.optim.make_optimizer)", **OPTIMIZER},
        "implementations": {
            "fastclip": "create_model(attn_backend='auto') + fastclip.ClipLoss()",
            "baseline": "create_model(attn_backend='torch') (SDPA) + contrastive_loss_reference "
            "(N x N logits + cross-entropy)",
        },
        "fastclip_resolved_backends": fastclip_backends(args.device, args.precision),
        "inputs": f"randn images; token ids uniform in [1, {EOT_ID}) with {EOT_ID} at a random position, full context",
        "memory": "cuda: max_memory_allocated during one step after the first (peak_bytes), minus memory_allocated "
        "before it (peak_extra_bytes); cpu: VmHWM - VmRSS of one step in a fresh process (peak_extra_bytes)"
        + ("" if args.cpu_memory or args.device == "cuda" else " (skipped: --no-cpu-memory)"),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the payload written to bench_train.json."""
    args = parse_args(argv)
    header = common.environment_header()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    args.matmul_tflops = common.matmul_rate_tflops(args.device, dtype)
    config = train_config(args)
    resolved = config["fastclip_resolved_backends"]
    print(
        f"device: {header['device']}; model {args.model}, {args.precision}"
        f"{', gradient checkpointing' if args.grad_checkpointing else ''}; fastclip runs attention on "
        f"{resolved['attention']!r} and the loss on {resolved['loss']!r}\n{TABLE.header()}"
    )
    if resolved["attention"] == "torch":
        print("(attention on 'torch' for both: the competitors differ only in the loss)")
    payload = {
        "benchmark": "train_step",
        "environment": header,
        "config": config,
        "matmul_tflops": {args.precision: args.matmul_tflops},
        "rows": [],
    }
    record = common.Record(args.out, "bench_train", payload)
    for impl in IMPLEMENTATIONS:
        sweep(impl, args, record)
    payload["summary"] = summarize(record.rows)
    print_summary(payload["summary"])
    title = f"{args.model} training step, {args.precision}, on {header['device']}"
    record.finish(lambda path: plot(record.rows, path, title))
    return payload


if __name__ == "__main__":
    main()

"""CLIP contrastive loss: forward and forward + backward time and peak memory over a batch-size sweep.

    python benchmarks/bench_loss.py [--device cuda] [--dtypes bf16,fp32] [--dims 512,1024] [--sizes 1024,4096]
                                    [--max-n 524288] [--backends naive,torch,cuda] [--out DIR]

Competitors, all measured in the same run on the same inputs:
  naive  what a user writes without fastclip: logits = scale * image @ text.T in the input dtype (N x N,
         materialised), then (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().T,
         labels)) / 2. Memory O(N^2).
  torch / cpp / cuda   fastclip.contrastive_loss(..., backend=...): tiled PyTorch, the C++ CPU op, the fused
         CUDA kernel. Memory O(N * D).
Inputs: independent random L2-normalised features ([N, D], requires_grad) and logit_scale = tensor(100.0)
(requires_grad), CLIP's clamp ceiling where trained models sit: the widest logit range the loss sees.
Forward+backward is loss and torch.autograd.grad w.r.t. image, text and logit_scale; the forward alone runs
with autograd recording, as in training. TFLOP/s counts 2*N^2*D for the forward and 8*N^2*D for
forward+backward (the fused algorithm's work: S, S recomputed, two gradient GEMMs) for every competitor, so
naive's figure is a speed on the same scale (it does 6*N^2*D). Peak memory is the extra bytes of one
forward+backward beyond its inputs (CUDA allocator peak; on a CPU the RSS high-water mark, in a fresh process).
Writes bench_loss.json and bench_loss.png into --out.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastclip from a checkout

import fastclip  # noqa: E402
from common import (  # noqa: E402
    DEFAULT_OUT, DTYPES, cpu_peak_extra_bytes, cuda_peak_extra_bytes, environment_header, is_oom,
    matmul_rate_tflops, plot_lines, time_fn, write_results,
)
from fastclip.ops.contrastive_lse import resolve_backend  # noqa: E402
from fastclip.ops.reference import contrastive_loss_reference  # noqa: E402

LOGIT_SCALE = 100.0
CHECK_MAX_N = {"cuda": 8192, "cpu": 2048}  # fp64 reference check up to here (cheap)
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}  # loss error / max(1, |loss|); a broken kernel is O(1)
NAIVE_BYTES_PER_LOGIT = 24  # CPU guard: naive fp32 peak measured at ~17 bytes per logit (N^2 of them), plus margin
DEFAULT_SIZES = {"cpu": [256, 1024, 2048, 4096], "cuda": [2**k for k in (10, 12, 13, 14, 15, 16, 17, 18)]}


def naive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The baseline: materialised logits in the input dtype, fp32 cross-entropy over rows and columns."""
    logits = scale * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().T, labels)) / 2


def loss_fn(backend: str) -> Callable[..., torch.Tensor]:
    if backend == "naive":
        return naive_loss
    return lambda image, text, scale: fastclip.contrastive_loss(image, text, scale, backend=backend)


def make_inputs(n: int, d: int, dtype: str, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random unit-norm image and text features and the logit scale, all leaves requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    image, text = (F.normalize(torch.randn(n, d, generator=gen, device=device), dim=-1) for _ in range(2))
    scale = torch.tensor(LOGIT_SCALE, device=device)
    return tuple(x.to(DTYPES[dtype] if x.dim() else torch.float32).requires_grad_() for x in (image, text, scale))


def make_step(backend: str, n: int, d: int, dtype: str, device: str, backward: bool = True) -> Callable[[], object]:
    """One forward (+ backward) on fresh inputs; module-level so the CPU memory child can import it."""
    return _step(backend, *make_inputs(n, d, dtype, device), backward=backward)


def _step(backend: str, image, text, scale, backward: bool) -> Callable[[], object]:
    loss = loss_fn(backend)
    if not backward:
        return lambda: loss(image, text, scale)
    return lambda: torch.autograd.grad(loss(image, text, scale), (image, text, scale))


def check_error(backend: str, image, text, scale) -> dict:
    """Loss and gradients against the fp64 reference on the same (rounded) inputs."""
    loss = loss_fn(backend)(image, text, scale)
    grads = torch.autograd.grad(loss, (image, text, scale))
    leaves = [x.detach().double().requires_grad_() for x in (image, text, scale)]
    ref = contrastive_loss_reference(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves)
    grad_rel = max(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, ref_grads))
    return {"loss": loss.item(), "ref_loss": ref.item(), "loss_abs_err": abs(loss.item() - ref.item()), "grad_rel_err": grad_rel}


def unavailable(backend: str, device: str, dtype: str) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend == "naive":
        return None
    try:
        resolve_backend(backend, torch.device(device), DTYPES[dtype])
    except (RuntimeError, ValueError) as error:
        return str(error).split(":")[0]
    return None


def naive_too_big_for_cpu(n: int) -> bool:
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return False
    return NAIVE_BYTES_PER_LOGIT * n * n > available / 2


def run_point(backend: str, n: int, d: int, dtype: str, device: str, args: argparse.Namespace) -> dict:
    """Memory, correctness and timings of one competitor at one size; raises on OOM."""
    image, text, scale = make_inputs(n, d, dtype, device)
    fwd_bwd = _step(backend, image, text, scale, backward=True)
    fwd = _step(backend, image, text, scale, backward=False)
    result = {"status": "ok"}
    if device == "cuda":
        fwd_bwd()  # first, untimed: lazy init, and an OOM shows up after one call, not after the timings
        result["peak_extra_bytes"] = cuda_peak_extra_bytes(fwd_bwd, warm=False)
    else:
        kwargs = {"backend": backend, "n": n, "d": d, "dtype": dtype, "device": device}
        result["peak_extra_bytes"] = cpu_peak_extra_bytes(make_step, kwargs, warmup_kwargs={**kwargs, "n": 64})
    if n <= CHECK_MAX_N[device]:
        result["check"] = check_error(backend, image, text, scale)
        tol = CHECK_TOLERANCE.get("bf16" if args.tf32 and dtype == "fp32" else dtype, 1e-3)  # TF32 rounds like bf16
        tol *= max(1.0, abs(result["check"]["ref_loss"]))
        result["check"]["ok"] = bool(result["check"]["loss_abs_err"] <= tol)  # NaN fails
    timing = {"warmup": args.warmup, "reps": args.reps, "budget_s": args.budget_s, "warmed": True}
    result["fwd_bwd"] = time_fn(fwd_bwd, device, **timing)
    result["fwd"] = time_fn(fwd, device, **timing)
    return result


def add_ratios(row: dict, naive: dict | None, rate_tflops: float) -> None:
    """TFLOP/s, fraction of the measured matmul rate, and ratios to naive at the same point."""
    for key in ("fwd", "fwd_bwd"):
        if key in row:
            row[key]["tflops"] = row[f"{key}_flops"] / (row[key]["median_ms"] / 1e3) / 1e12
            row[key]["matmul_fraction"] = row[key]["tflops"] / rate_tflops
            if naive is not None and key in naive:
                row[key]["speedup_vs_naive"] = naive[key]["median_ms"] / row[key]["median_ms"]
    if naive is not None and row.get("peak_extra_bytes") and naive.get("peak_extra_bytes"):
        row["memory_vs_naive"] = row["peak_extra_bytes"] / naive["peak_extra_bytes"]


COLUMNS = (
    f"{'dtype':>5} {'D':>5} {'N':>7} {'backend':>7} {'fwd ms':>9} {'f+b ms':>9} {'TFLOP/s':>8} {'%mm':>5} "
    f"{'peak MiB':>9} {'x naive':>8} {'mem/naive':>9} {'loss err':>9}"
)


def format_row(row: dict) -> str:
    head = f"{row['dtype']:>5} {row['d']:>5} {row['n']:>7} {row['backend']:>7}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('reason', '')}"[:160]
    fb, check = row["fwd_bwd"], row.get("check")
    peak = row["peak_extra_bytes"]
    cells = [
        f"{row['fwd']['median_ms']:9.2f}", f"{fb['median_ms']:9.2f}", f"{fb['tflops']:8.3f}", f"{100 * fb['matmul_fraction']:5.1f}",
        f"{peak / 2**20:9.2f}" if peak is not None else f"{'n/a':>9}",
        f"{fb['speedup_vs_naive']:8.2f}" if "speedup_vs_naive" in fb else f"{'':>8}",
        f"{row['memory_vs_naive']:9.4f}" if "memory_vs_naive" in row else f"{'':>9}",
        (f"{check['loss_abs_err']:9.1e}" + ("" if check["ok"] else " FAIL")) if check else "",
    ]
    return " ".join([head, *cells])


def plot(rows: list[dict], groups: list[tuple[str, int]], backends: list[str], rates: dict, path: Path, device_name: str) -> Path | None:
    """Per (dtype, D): fwd+bwd time vs N (with the matmul-rate limit) and peak extra memory vs N, log-log."""
    panels = []
    for dtype, d in groups:
        mine = [r for r in rows if (r["dtype"], r["d"]) == (dtype, d)]
        sizes = sorted({r["n"] for r in mine})
        times, memory = {}, {}
        for backend in backends:
            ok = {r["n"]: r for r in mine if r["backend"] == backend and r["status"] == "ok"}
            times[backend] = (sizes, [ok[n]["fwd_bwd"]["median_ms"] if n in ok else None for n in sizes])
            memory[backend] = (sizes, [ok[n]["peak_extra_bytes"] / 2**20 if n in ok and ok[n]["peak_extra_bytes"] else None for n in sizes])
        times["matmul limit"] = (sizes, [8 * n * n * d / (rates[dtype] * 1e12) * 1e3 for n in sizes])
        limit_style = {"matmul limit": {"color": "black", "linestyle": "--", "marker": None}}
        panels.append({"title": f"{dtype}, D={d}: forward+backward", "xlabel": "N (pairs)", "ylabel": "ms", "series": times, "styles": limit_style})
        panels.append({"title": f"{dtype}, D={d}: peak extra memory", "xlabel": "N (pairs)", "ylabel": "MiB", "series": memory})
    return plot_lines(path, panels, ncols=2, title=f"contrastive loss on {device_name}")


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--dtypes", help="comma-separated of fp32,bf16,fp16 (default: bf16,fp32 on cuda, fp32 on cpu)")
    parser.add_argument("--dims", help="comma-separated feature dims D (default: 512,1024 on cuda, 512 on cpu)")
    parser.add_argument("--sizes", help="comma-separated batch sizes N (default: cpu 256..4096, cuda 1024..262144)")
    parser.add_argument("--max-n", type=int, help="cut the default sweep at this N, or extend it by doubling up to it")
    parser.add_argument("--backends", help="comma-separated of naive,torch,cpp,cuda (default: all that run on the device)")
    parser.add_argument("--warmup", type=int, help="warm-up calls per measurement (default: 5 cuda, 1 cpu)")
    parser.add_argument("--reps", type=int, help="timed calls per measurement (default: 20 cuda, 5 cpu)")
    parser.add_argument("--budget-s", type=float, default=5.0, help="fewer reps (at least 3) for calls too slow to fit this many seconds")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (CUDA kernel and cuBLAS)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device visible")
    gpu = args.device == "cuda"
    args.dtypes = (args.dtypes or ("bf16,fp32" if gpu else "fp32")).split(",")
    args.dims = [int(x) for x in (args.dims or ("512,1024" if gpu else "512")).split(",")]
    if args.sizes:
        args.sizes = [int(x) for x in args.sizes.split(",")]
    else:
        args.sizes = DEFAULT_SIZES[args.device]
        if args.max_n:
            args.sizes = [n for n in args.sizes if n <= args.max_n]
            while args.sizes and args.sizes[-1] * 2 <= args.max_n:
                args.sizes.append(args.sizes[-1] * 2)
    args.backends = args.backends.split(",") if args.backends else [
        b for b in ("naive", "torch", "cpp", "cuda") if unavailable(b, args.device, "fp32") is None
    ]
    args.backends.sort(key=lambda b: b != "naive")  # naive first: the others' ratios need it
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.reps = args.reps if args.reps is not None else (20 if gpu else 5)
    return args


def main() -> int:
    args = parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    header = environment_header()
    rates = {dtype: matmul_rate_tflops(device, DTYPES[dtype]) for dtype in args.dtypes}
    groups = [(dtype, d) for dtype in args.dtypes for d in args.dims]
    config = {
        "device": device, "dtypes": args.dtypes, "dims": args.dims, "sizes": args.sizes, "backends": args.backends,
        "warmup": args.warmup, "reps": args.reps, "budget_s": args.budget_s, "tf32": args.tf32,
        "logit_scale": LOGIT_SCALE, "inputs": "independent randn rows, L2-normalised; features and logit_scale require grad",
        "naive": "logits = scale * image @ text.T (input dtype); (CE(logits.float(), arange) + CE(logits.float().T, arange)) / 2",
        "flops": "fwd 2*N^2*D, fwd_bwd 8*N^2*D for every backend (naive actually does 6*N^2*D)",
        "memory": "CUDA: max_memory_allocated - memory_allocated before; CPU: VmHWM - VmRSS in a fresh process",
        "check": f"loss and grads vs fp64 reference for N <= {CHECK_MAX_N[device]}; ok if |err| <= tol * max(1, |loss|), "
                 f"tol {CHECK_TOLERANCE} (bf16's with --tf32)",
    }
    print(f"device: {header['device']}; matmul rate (TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    rows: list[dict] = []
    points = [(dtype, d, n, b) for dtype, d in groups for n in args.sizes for b in args.backends]
    naive_oom_at: dict[tuple[str, int], int] = {}
    naive_rows: dict[tuple[str, int, int], dict] = {}
    tqdm.write(COLUMNS)
    for dtype, d, n, backend in tqdm(points, desc="bench_loss", disable=None, leave=False):
        row = {"dtype": dtype, "d": d, "n": n, "backend": backend, "fwd_flops": 2 * n * n * d, "fwd_bwd_flops": 8 * n * n * d}
        reason = unavailable(backend, device, dtype)
        if reason:
            row.update(status="unavailable", reason=reason)
        elif backend == "naive" and (dtype, d) in naive_oom_at:
            row.update(status="skipped", reason=f"naive ran out of memory at N={naive_oom_at[(dtype, d)]}")
        elif backend == "naive" and device == "cpu" and naive_too_big_for_cpu(n):
            row.update(status="skipped", reason=f"naive needs ~{NAIVE_BYTES_PER_LOGIT * n * n / 2**30:.1f} GiB")
        else:
            try:
                row.update(run_point(backend, n, d, dtype, device, args))
            except RuntimeError as error:
                if not is_oom(error):
                    raise
                row.update(status="oom", reason=str(error).splitlines()[0][:200])
            if backend == "naive" and row["status"] == "oom":
                naive_oom_at[(dtype, d)] = n
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()  # each point starts from an empty cache, whatever naive left
        if backend == "naive":
            naive_rows[(dtype, d, n)] = row if row["status"] == "ok" else None
        if row["status"] == "ok":
            add_ratios(row, naive_rows.get((dtype, d, n)) if backend != "naive" else None, rates[dtype])
        rows.append(row)
        tqdm.write(format_row(row))
        payload = {"benchmark": "contrastive_loss", "environment": header, "config": config, "matmul_tflops": rates, "points": rows}
        json_path = write_results(args.out, "bench_loss", payload)  # after every point: a killed run keeps its data
    print(f"results: {json_path}")
    png = plot(rows, groups, args.backends, rates, Path(args.out) / "bench_loss.png", header["device"])
    if png:
        print(f"plot: {png}")
    failed = [r for r in rows if r.get("check") and not r["check"]["ok"] and r["backend"] != "naive"]
    for r in failed:
        print(f"CHECK FAILED: {r['backend']} {r['dtype']} D={r['d']} N={r['n']}: {r['check']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

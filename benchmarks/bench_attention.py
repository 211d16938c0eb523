"""Attention on CLIP's shapes: fastclip's Triton kernel vs F.scaled_dot_product_attention, per backend.

    python benchmarks/bench_attention.py [--dtypes bf16,fp16] [--shapes vit_b16,text] [--out benchmarks/results/local]

For every shape and dtype, times the forward and the forward + backward (median, `common.time_fn`) of:
fastclip (`attention(..., backend="triton")`, autotuned), SDPA as a user gets it (it picks its kernel),
and SDPA forced to each backend with `torch.nn.attention.sdpa_kernel` (FLASH_ATTENTION,
EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH); a backend that does not apply to the inputs (e.g. flash with
a padding mask) is recorded as skipped with SDPA's reason. Reports TFLOP/s (dense FLOPs: 4*S_q*S_k*D per
head forward, the causal half when causal, backward = 2.5x forward) beside GB/s of the minimum traffic
(q, k, v, o forward; + dO, dq, dk, dv backward), since below S ~ 600 attention is memory-bound on an H100,
and the peak memory of the forward + backward. Writes JSON and a PNG (fwd+bwd speed-up over the best SDPA
backend). Without a GPU it runs tiny shapes on the PyTorch path only, as a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file (also when imported)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import DEFAULT_OUT, environment_header, time_fn, write_results  # noqa: E402
from fastclip.ops.attention import attention, attention_torch  # noqa: E402


@dataclass(frozen=True)
class Shape:
    batch: int  # images or captions
    heads: int
    seq: int
    head_dim: int
    causal: bool = False
    padded: bool = False  # text: key padding after each caption's end-of-text token


SHAPES = {
    "vit_b32": Shape(256, 12, 50, 64),
    "vit_b16": Shape(256, 12, 197, 64),  # 3072 heads x 197 tokens
    "vit_l14": Shape(256, 16, 257, 64),
    "vit_l14_336": Shape(256, 16, 577, 64),
    "vit_h14": Shape(256, 16, 257, 80),
    "text": Shape(256, 8, 77, 64, causal=True),
    "text_padded": Shape(256, 8, 77, 64, causal=True, padded=True),
}
TARGETS = {"vit_b16": 1.1, "text": 1.1}  # issue 3: fwd+bwd >= 1.1x the best SDPA backend in bf16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (
        torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, generator=gen).to(device, dtype).requires_grad_(True)
        for _ in range(3)
    )
    mask = None
    if shape.padded:  # caption lengths ~ N(18, 8) clipped to [3, seq]: captions average 15-20 of 77 tokens
        lengths = (torch.randn(shape.batch, generator=gen) * 8 + 18).round().clamp(3, shape.seq).long()
        mask = (torch.arange(shape.seq)[None, :] >= lengths[:, None]).to(device)  # True = padding
    return q, k, v, mask


def competitors(shape: Shape, device: str) -> dict[str, Callable]:
    """name -> f(q, k, v, mask) returning the attention output; SDPA ones use fastclip's mask convention."""
    def fastclip(q, k, v, mask):
        return attention(q, k, v, causal=shape.causal, key_padding_mask=mask, backend="triton")

    def sdpa(q, k, v, mask):
        return attention_torch(q, k, v, shape.causal, mask, shape.head_dim**-0.5)

    if device != "cuda":  # "auto" is the SDPA path on a CPU
        auto = lambda q, k, v, mask: attention(q, k, v, causal=shape.causal, key_padding_mask=mask)
        return {"fastclip (torch path)": auto, "sdpa_math": _forced(sdpa, "MATH")}
    return {"fastclip": fastclip, "sdpa": sdpa, **{f"sdpa_{b.split('_')[0].lower()}": _forced(sdpa, b) for b in SDPA_BACKENDS}}


def _forced(fn: Callable, backend: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(*args):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return fn(*args)

    return run


def flops_and_bytes(shape: Shape, dtype: torch.dtype) -> dict[str, float]:
    """Dense FLOPs (causal: visible pairs only) and the minimum bytes moved, per pass."""
    pairs = shape.seq * (shape.seq + 1) / 2 if shape.causal else shape.seq**2
    fwd = 4 * shape.batch * shape.heads * pairs * shape.head_dim
    tensor = shape.batch * shape.heads * shape.seq * shape.head_dim * torch.finfo(dtype).bits / 8
    return {"fwd_flops": fwd, "fwd_bwd_flops": 3.5 * fwd, "fwd_bytes": 4 * tensor, "fwd_bwd_bytes": 12 * tensor}


def measure(fn: Callable, q, k, v, mask, device: str, warmup: int, reps: int) -> dict:
    """Forward and forward + backward timings and the fwd+bwd peak memory; or {"skipped": reason}."""
    grad_out = torch.randn_like(q)
    forward = lambda: fn(q, k, v, mask)
    forward_backward = lambda: torch.autograd.grad(fn(q, k, v, mask), (q, k, v), grad_out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains a backend's refusal in warnings, then raises
            out = forward()  # also runs the autotuner once, outside the timings
            forward_backward()
    except RuntimeError as error:
        return {"skipped": str(error).splitlines()[0][:200]}
    # warmed: both already ran once just above (autotuning included), so time_fn skips its lazy-init call
    timing = {"warmup": warmup, "reps": reps, "warmed": True}
    result = {"fwd": time_fn(forward, device, **timing), "fwd_bwd": time_fn(forward_backward, device, **timing)}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        result["fwd_bwd_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    result["output"] = out.detach()
    return result


def run_shape(name: str, shape: Shape, dtype_name: str, device: str, warmup: int, reps: int) -> dict:
    dtype = DTYPES[dtype_name]
    q, k, v, mask = make_inputs(shape, dtype, device)
    work = flops_and_bytes(shape, dtype)
    rows, reference = {}, None
    for label, fn in competitors(shape, device).items():
        result = measure(fn, q, k, v, mask, device, warmup, reps)
        out = result.pop("output", None)
        if out is not None:
            reference = out if reference is None else reference
            result["max_abs_diff_vs_first"] = (out.float() - reference.float()).abs().max().item()
        for key in ("fwd", "fwd_bwd"):
            if key in result:
                seconds = result[key]["median_ms"] / 1e3
                result[key]["tflops"] = work[f"{key}_flops"] / seconds / 1e12
                result[key]["gbps"] = work[f"{key}_bytes"] / seconds / 1e9
        rows[label] = result
        if device == "cuda":
            torch.cuda.empty_cache()
    sdpa_times = [r["fwd_bwd"]["median_ms"] for label, r in rows.items() if label.startswith("sdpa") and "fwd_bwd" in r]
    ours = rows.get("fastclip", {}).get("fwd_bwd")
    speedup = min(sdpa_times) / ours["median_ms"] if ours and sdpa_times else None
    return {"shape": name, **asdict(shape), "dtype": dtype_name, **work, "results": rows, "fwd_bwd_speedup_vs_best_sdpa": speedup}


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: fwd+bwd time of every competitor relative to the best SDPA backend, per shape and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    labels = [f"{r['shape']}\n{r['dtype']}" for r in rows]
    names = list(dict.fromkeys(n for r in rows for n in r["results"]))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = []
        for r in rows:
            times = [x["fwd_bwd"]["median_ms"] for n, x in r["results"].items() if n.startswith("sdpa") and "fwd_bwd" in x]
            mine = r["results"].get(name, {}).get("fwd_bwd")
            values.append(min(times) / mine["median_ms"] if mine and times else 0.0)
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("fwd+bwd speed-up over the best SDPA backend")
    ax.set_title("Attention on CLIP shapes (higher is better; 0 = backend does not apply)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--dtypes", default="bf16,fp16", help=f"comma-separated, of {list(DTYPES)}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--batch", type=int, default=None, help="override every shape's batch size")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    dtypes = args.dtypes.split(",")
    if device == "cpu":
        print("no CUDA device: tiny shapes on the PyTorch path only (a smoke test, not a measurement)")
        shapes = {name: Shape(2, 2, s.seq, s.head_dim, s.causal, s.padded) for name, s in shapes.items()}
        dtypes, args.warmup, args.reps = ["fp32"], 1, 3
    if args.batch is not None:
        shapes = {name: Shape(args.batch, *list(asdict(s).values())[1:]) for name, s in shapes.items()}

    rows = []
    for name, shape in shapes.items():
        for dtype_name in dtypes:
            row = run_shape(name, shape, dtype_name, device, args.warmup, args.reps)
            rows.append(row)
            for label, r in row["results"].items():
                if "skipped" in r:
                    print(f"{name:12} {dtype_name:5} {label:22} skipped: {r['skipped'][:80]}")
                else:
                    f, fb = r["fwd"], r["fwd_bwd"]
                    print(f"{name:12} {dtype_name:5} {label:22} fwd {f['median_ms']:8.3f} ms {f['tflops']:6.1f} TFLOP/s "
                          f"{f['gbps']:7.0f} GB/s | fwd+bwd {fb['median_ms']:8.3f} ms {fb['tflops']:6.1f} TFLOP/s")
            if row["fwd_bwd_speedup_vs_best_sdpa"] is not None:
                target = TARGETS.get(name) if dtype_name == "bf16" else None
                verdict = "" if target is None else (" (target met)" if row["fwd_bwd_speedup_vs_best_sdpa"] >= target else f" (target {target}x NOT met)")
                print(f"{name:12} {dtype_name:5} fwd+bwd speed-up vs best SDPA: {row['fwd_bwd_speedup_vs_best_sdpa']:.2f}x{verdict}")

    payload = {"benchmark": "attention", "environment": environment_header(), "device": device, "warmup": args.warmup, "reps": args.reps, "rows": rows}
    path = write_results(args.out, f"attention_{device}", payload)
    print(f"results: {path}")
    plot(rows, args.out / f"attention_{device}.png")


if __name__ == "__main__":
    main()

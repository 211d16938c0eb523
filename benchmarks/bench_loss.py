"""The contrastive loss family (CLIP, SigLIP, SupCon): forward and forward + backward time and peak memory
over a batch-size sweep, each fastclip backend against the eager PyTorch loss a user would write.

    python benchmarks/bench_loss.py [--loss clip,siglip,supcon] [--device cuda] [--dtypes bf16,fp32]
                                    [--dims 512,1024] [--sizes 1024,4096] [--max-n 524288]
                                    [--backends naive,infcl,torch,cpp,cpp-chunked,cuda,cuda-fused,cuda-chunked]
                                    [--no-cpu-memory] [--out DIR]

--loss picks the losses (comma-separated, or `all`); the default is `clip`, the original benchmark, so an
existing invocation measures and writes exactly what it did. Each loss writes its own files into --out:
  clip    bench_loss.json, bench_loss.png (benchmark "contrastive_loss"; the keys of before, plus "loss")
  siglip  bench_loss_siglip.json, bench_loss_siglip.png (benchmark "sigmoid_loss")
  supcon  bench_loss_supcon.json, bench_loss_supcon.png (benchmark "supcon_loss")
Every point (row) carries "loss", so rows from different files never mix up.

Competitors, all measured in the same run on the same inputs ("naive" is the eager PyTorch baseline,
memory O(N^2); torch / cpp / cuda are fastclip's tiled PyTorch, C++ CPU op and CUDA op, memory
O(N * D)). The C++ and CUDA ops of CLIP and SupCon each have two paths, the fused tile sweep and the
chunked GEMM (a BLAS/cuBLAS GEMM per row chunk and one epilogue): "cpp" and "cuda" run the path the op
picks by default, "cpp-chunked", "cuda-fused" and "cuda-chunked" force one (FASTCLIP_CPU_LOSS_PATH /
FASTCLIP_CUDA_LOSS_PATH around every call, backward included), so one run compares them:
  clip    naive: logits = scale * image @ text.T in the input dtype (N x N, materialised), then
          (F.cross_entropy(logits.float(), arange) + F.cross_entropy(logits.float().T, arange)) / 2.
          fastclip: fastclip.contrastive_loss(image, text, scale, backend=...).
          Inputs: image, text [N, D]; logit_scale s = 100 (CLIP's clamp ceiling: the widest logit range).
          infcl: Inf-CL (`pip install inf-cl`, CUDA only; tools/gpu_wheels.sh fetches it), the best public tiled
          CLIP loss: its single-GPU `cal_flash_loss` once per direction, (rows + columns) / 2, as its README
          composes the symmetric loss; it computes in fp32/TF32 whatever the input dtype, D a multiple of 256.
  siglip  naive (open_clip's SigLipLoss, upcast as under autocast):
              logits = scale * image @ text.T + bias           # N x N in the input dtype
              z = torch.full((N, N), -1.0).fill_diagonal_(1.0)  # fp32 labels, +1 on the diagonal
              loss = -F.logsigmoid(z * logits.float()).sum() / N
          (open_clip builds z as 2 * eye - ones, three transient N x N buffers; this one allocates one,
          so the baseline is, if anything, leaner than open_clip's.)
          fastclip: fastclip.sigmoid_loss(image, text, scale, bias, backend=...).
          Inputs: image, text [N, D]; s = 10, b = -10 (SigLIP's initialisation, t' = log 10, b = -10).
  supcon  naive (Khosla et al.'s SupConLoss, with base_temperature = temperature so the loss is L_out
          itself; the similarity upcast after the matmul as under autocast):
              labels = arange(N / 2).repeat(2); mask = (labels[:, None] == labels[None, :]).float()
              adc = (f @ f.T).float() / T;  logits = adc - adc.max(1, keepdim=True).values.detach()
              logits_mask = ones_like(mask).scatter_(1, arange(N)[:, None], 0); mask = mask * logits_mask
              log_prob = logits - log((exp(logits) * logits_mask).sum(1, keepdim=True))
              loss = -((mask * log_prob).sum(1) / mask.sum(1)).mean()
          fastclip: fastclip.supcon_loss(f, None, temperature=T, backend=...) (NT-Xent labels).
          Inputs: f [N, D], M = N rows stacked as [view1; view2] of N/2 images; T = 0.1. N is the
          number of rows of the N x N similarity, so every loss's N means the same matrix size.
All features are independent random rows, L2-normalised, in the benchmarked dtype; every tensor input
(features, s, b) is a leaf requiring grad, the temperature is a fixed number (as in Khosla's code).
Forward+backward is the loss and torch.autograd.grad w.r.t. all those leaves; the forward alone runs with
autograd recording, as in training (fastclip's SigLIP then makes its gradients in the same pass, so its
forward time includes them and its backward is nearly free).

FLOP accounting: TFLOP/s counts 2*N^2*D for the forward and 8*N^2*D for forward+backward for every loss
and every competitor: the fused algorithm's work (the N x N similarity S, S recomputed in the backward,
two gradient GEMMs), which is the same for CLIP, SigLIP and SupCon (SupCon's S = f @ f.T is N x N too).
The naive losses, and fastclip's one-pass SigLIP, do 6*N^2*D (S and two gradient GEMMs), so their
figure is a speed on the same scale.
Peak memory is the extra bytes of one forward+backward beyond its inputs (CUDA allocator peak; on a CPU the
RSS high-water mark, in a fresh process). Ratios (speedup_vs_naive = naive ms / backend ms, memory_vs_naive
= backend bytes / naive bytes) compare with the naive point of the same loss, dtype, D and N in this run.

Correctness: for N <= 8192 (CUDA) / 2048 (CPU) every competitor's loss and gradients are compared with the
float64 reference of fastclip.ops.reference (contrastive_loss_reference, sigmoid_loss_reference,
supcon_loss_reference) on the same rounded inputs; a loss error above tol * max(1, |loss|) (tol 1e-3 fp32,
5e-2 bf16/fp16 or fp32 with --tf32) is printed as CHECK FAILED and makes the exit code 1 — for a fastclip
backend always, for a naive baseline in fp32 (in bf16/fp16 its rounded N x N logits may legitimately miss).

The SigLIP GPU target (bf16, N = 65536, D = 768: the fused forward+backward at least 2x faster
than the naive loss and under 5% of its memory) is evaluated when that point was measured and written to
bench_loss_siglip.json as "target" (tools/gpu_check.sh runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file, however this is run
import common  # noqa: E402
from common import ByDevice, Column, Table, matmul_rate_tflops  # noqa: E402

import fastclip  # noqa: E402
from fastclip.backends import DTYPES, resolve_loss_backend  # noqa: E402
from fastclip.ops.reference import (  # noqa: E402
    contrastive_loss_reference,
    naive_clip_loss,
    sigmoid_loss_reference,
    supcon_loss_reference,
)

LOGIT_SCALE = 100.0  # CLIP
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation: s = exp(log 10), b = -10
SUPCON_TEMPERATURE = 0.1
CHECK_MAX_N = {"cuda": 8192, "cpu": 2048}  # fp64 reference check up to here (cheap)
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}  # loss error / max(1, |loss|); a broken kernel is O(1)
DEFAULT_SIZES = {"cpu": [256, 1024, 2048, 4096], "cuda": [2**k for k in (10, 12, 13, 14, 15, 16, 17, 18)]}
LOSSES = ("clip", "siglip", "supcon")
BASELINES = ("naive", "infcl")  # the competitors that are not fastclip's
# Competitors that run a fastclip backend on one path: name -> (backend, environment variable, path)
PATH_VARIANTS = {
    "cpp-chunked": ("cpp", "FASTCLIP_CPU_LOSS_PATH", "chunked"),
    "cuda-fused": ("cuda", "FASTCLIP_CUDA_LOSS_PATH", "fused"),
    "cuda-chunked": ("cuda", "FASTCLIP_CUDA_LOSS_PATH", "chunked"),
}
COMPETITORS = ("naive", "infcl", "torch", "cpp", "cpp-chunked", "cuda", "cuda-fused", "cuda-chunked")
# The SigLIP GPU target: at (dtype, D, N), fwd+bwd speed-up at least, memory fraction below
SIGLIP_TARGET = {
    "dtype": "bf16",
    "d": 768,
    "n": 65536,
    "backend": "cuda",
    "min_speedup": 2.0,
    "max_memory_fraction": 0.05,
}


# ------------------------------------------------------------------------------------------ the naive losses


def infcl_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inf-CL's symmetric CLIP loss: its tiled Triton loss once per direction."""
    from inf_cl import cal_flash_loss  # optional peer: imported only when benchmarked

    return (cal_flash_loss(image, text, scale=scale).mean() + cal_flash_loss(text, image, scale=scale).mean()) / 2


def naive_sigmoid_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP baseline (open_clip's SigLipLoss): logits in the input dtype, fp32 labels z and log-sigmoid."""
    logits = scale * image @ text.T + bias
    n = logits.shape[0]
    z = torch.full((n, n), -1.0, device=logits.device).fill_diagonal_(1.0)
    return -F.logsigmoid(z * logits.float()).sum() / n


def naive_supcon_loss(features: torch.Tensor, temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """SupCon / NT-Xent baseline in Khosla et al.'s style; rows [view1; view2], base_temperature = temperature."""
    m = features.shape[0]
    device = features.device
    labels = torch.arange(m // 2, device=device).repeat(2)
    mask = torch.eq(labels[:, None], labels[None, :]).float()
    anchor_dot_contrast = (features @ features.T).float() / temperature
    logits_max, _ = anchor_dot_contrast.max(dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    logits_mask = torch.ones_like(mask).scatter_(1, torch.arange(m, device=device).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos.mean()


# ------------------------------------------------------------------------------------------ the loss table


def _features(n: int, d: int, gen: torch.Generator, device: str) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, device=device), dim=-1)


def _pair_inputs(n: int, d: int, gen: torch.Generator, device: str) -> list[torch.Tensor]:
    return [_features(n, d, gen, device), _features(n, d, gen, device)]


class LossSpec(NamedTuple):
    """One loss of the family: its baseline, its fastclip call, its reference and its inputs."""

    name: str
    benchmark: str  # the JSON's "benchmark"
    result_name: str  # <out>/<result_name>.json and .png
    title: str
    op: str  # the fused op whose kernels decide which backends can run
    naive: Callable[..., torch.Tensor]
    fused: Callable[[str], Callable[..., torch.Tensor]]
    reference: Callable[..., torch.Tensor]  # on float64 copies of the inputs
    features: Callable[[int, int, torch.Generator, str], list[torch.Tensor]]
    scalars: tuple[float, ...]  # extra leaves after the features (fp32, requiring grad)
    naive_bytes_per_logit: int  # CPU guard: naive fp32 peak per N^2 logit, with margin
    config: dict


SPECS = {
    "clip": LossSpec(
        name="clip",
        benchmark="contrastive_loss",
        result_name="bench_loss",
        title="contrastive loss (CLIP)",
        op="contrastive_lse",
        naive=naive_clip_loss,
        fused=lambda b: lambda image, text, scale: fastclip.contrastive_loss(image, text, scale, backend=b),
        reference=contrastive_loss_reference,
        features=_pair_inputs,
        scalars=(LOGIT_SCALE,),
        naive_bytes_per_logit=24,  # measured ~17 bytes per logit at fp32
        config={
            "logit_scale": LOGIT_SCALE,
            "naive": "logits = scale * image @ text.T (input dtype); "
            "(CE(logits.float(), arange) + CE(logits.float().T, arange)) / 2",
            "fastclip": "fastclip.contrastive_loss(image, text, scale, backend=...)",
            "reference": "fastclip.ops.reference.contrastive_loss_reference",
        },
    ),
    "siglip": LossSpec(
        name="siglip",
        benchmark="sigmoid_loss",
        result_name="bench_loss_siglip",
        title="SigLIP sigmoid loss",
        op="pairwise_sigmoid",
        naive=naive_sigmoid_loss,
        fused=lambda b: lambda image, text, scale, bias: fastclip.sigmoid_loss(image, text, scale, bias, backend=b),
        reference=sigmoid_loss_reference,
        features=_pair_inputs,
        scalars=(SIGLIP_SCALE, SIGLIP_BIAS),
        naive_bytes_per_logit=40,
        config={
            "logit_scale": SIGLIP_SCALE,
            "logit_bias": SIGLIP_BIAS,
            "naive": "logits = scale * image @ text.T + bias (input dtype); "
            "z = full((N, N), -1.0).fill_diagonal_(1.0) (fp32); "
            "-logsigmoid(z * logits.float()).sum() / N  (open_clip SigLipLoss)",
            "fastclip": "fastclip.sigmoid_loss(image, text, scale, bias, backend=...)",
            "reference": "fastclip.ops.reference.sigmoid_loss_reference",
            "target": SIGLIP_TARGET,
        },
    ),
    "supcon": LossSpec(
        name="supcon",
        benchmark="supcon_loss",
        result_name="bench_loss_supcon",
        title="SupCon / NT-Xent loss",
        op="contrastive_lse",
        naive=naive_supcon_loss,
        fused=lambda b: lambda f: fastclip.supcon_loss(f, None, temperature=SUPCON_TEMPERATURE, backend=b),
        reference=lambda f: supcon_loss_reference(f, None, SUPCON_TEMPERATURE),
        features=lambda n, d, gen, device: [_features(n, d, gen, device)],
        scalars=(),
        naive_bytes_per_logit=48,
        config={
            "temperature": SUPCON_TEMPERATURE,
            "layout": "N rows = [view1; view2] of N/2 images (NT-Xent labels: row i and i + N/2 are positives)",
            "naive": "Khosla et al. SupConLoss (base_temperature = temperature): (f @ f.T).float() / T, row max "
            "subtracted, self-mask, log_prob, mean over positives, mean over anchors",
            "fastclip": "fastclip.supcon_loss(f, None, temperature=T, backend=...)",
            "reference": "fastclip.ops.reference.supcon_loss_reference(f, None, T)",
        },
    ),
}


def loss_fn(backend: str, loss: str = "clip") -> Callable[..., torch.Tensor]:
    spec = SPECS[loss]
    if backend == "infcl":
        return infcl_loss
    if backend == "naive":
        return spec.naive
    return spec.fused(PATH_VARIANTS[backend][0] if backend in PATH_VARIANTS else backend)


@contextlib.contextmanager
def loss_path(backend: str) -> Iterator[None]:
    """The op path a PATH_VARIANTS competitor forces, set while it runs (the ops read it on every call)."""
    if backend not in PATH_VARIANTS:
        yield
        return
    _, variable, path = PATH_VARIANTS[backend]
    before = os.environ.get(variable)
    os.environ[variable] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def make_inputs(n: int, d: int, dtype: str, device: str, seed: int = 0, loss: str = "clip") -> tuple[torch.Tensor, ...]:
    """The loss's random unit-norm features (in `dtype`) and fp32 scalars, all leaves requiring grad."""
    spec = SPECS[loss]
    gen = torch.Generator(device=device).manual_seed(seed)
    features = [x.to(DTYPES[dtype]) for x in spec.features(n, d, gen, device)]
    scalars = [torch.tensor(v, device=device) for v in spec.scalars]
    return tuple(x.requires_grad_() for x in (*features, *scalars))


def make_step(
    backend: str, n: int, d: int, dtype: str, device: str, backward: bool = True, loss: str = "clip"
) -> Callable[[], object]:
    """One forward (+ backward) on fresh inputs; module-level so the CPU memory child can import it."""
    return _step(backend, make_inputs(n, d, dtype, device, loss=loss), backward=backward, loss=loss)


def _step(backend: str, inputs: tuple[torch.Tensor, ...], backward: bool, loss: str = "clip") -> Callable[[], object]:
    fn = loss_fn(backend, loss)

    def step() -> object:
        with loss_path(backend):
            value = fn(*inputs)
            return torch.autograd.grad(value, inputs) if backward else value

    return step


def check_error(backend: str, inputs: tuple[torch.Tensor, ...], loss: str = "clip") -> dict:
    """Loss and gradients against the fp64 reference on the same (rounded) inputs."""
    with loss_path(backend):
        value = loss_fn(backend, loss)(*inputs)
        grads = torch.autograd.grad(value, inputs)
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    ref = SPECS[loss].reference(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves)
    grad_rel = max(
        ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for g, r in zip(grads, ref_grads, strict=True)
    )
    return {
        "loss": value.item(),
        "ref_loss": ref.item(),
        "loss_abs_err": abs(value.item() - ref.item()),
        "grad_rel_err": grad_rel,
    }


def unavailable(backend: str, device: str, dtype: str, loss: str = "clip") -> str | None:
    """Why `backend` cannot run `loss` here, or None."""
    if backend == "naive":
        return None
    if backend == "infcl":
        return _infcl_unavailable(device, loss)
    if backend in PATH_VARIANTS and SPECS[loss].op != "contrastive_lse":
        return f"{loss} has one path"
    try:
        base = PATH_VARIANTS[backend][0] if backend in PATH_VARIANTS else backend
        resolve_loss_backend(base, torch.device(device), DTYPES[dtype], SPECS[loss].op)
    except (RuntimeError, ValueError) as error:
        return str(error).split(":")[0]
    return None


def _infcl_unavailable(device: str, loss: str) -> str | None:
    if loss != "clip":
        return "Inf-CL computes the CLIP loss only"
    if device != "cuda":
        return "Inf-CL needs CUDA"
    try:
        import inf_cl  # noqa: F401
    except ImportError as error:
        return f"inf_cl does not import ({error})"
    return None


def naive_too_big_for_cpu(n: int, loss: str = "clip") -> bool:
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return False
    return SPECS[loss].naive_bytes_per_logit * n * n > available / 2


def run_point(
    backend: str,
    n: int,
    d: int,
    dtype: str,
    device: str,
    args: argparse.Namespace,
    loss: str = "clip",
    steps_out: dict | None = None,
) -> dict:
    """Memory, correctness and timings of one competitor at one size; raises on OOM. With `steps_out`, the
    timing is left to the caller: the "fwd_bwd" and "fwd" calls go into it instead."""
    inputs = make_inputs(n, d, dtype, device, loss=loss)
    fwd_bwd = _step(backend, inputs, backward=True, loss=loss)
    fwd = _step(backend, inputs, backward=False, loss=loss)
    result = {"status": "ok"}
    if device == "cuda":
        fwd_bwd()  # first, untimed: lazy init, and an OOM shows up after one call, not after the timings
        result["peak_extra_bytes"] = common.cuda_peak_extra_bytes(fwd_bwd, warm=False)
    elif getattr(args, "cpu_memory", True):
        kwargs = {"backend": backend, "n": n, "d": d, "dtype": dtype, "device": device, "loss": loss}
        result["peak_extra_bytes"] = common.cpu_peak_extra_bytes(make_step, kwargs, warmup_kwargs={**kwargs, "n": 64})
    else:
        result["peak_extra_bytes"] = None
    if n <= CHECK_MAX_N[device]:
        result["check"] = check_error(backend, inputs, loss)
        tol = CHECK_TOLERANCE.get("bf16" if args.tf32 and dtype == "fp32" else dtype, 1e-3)  # TF32 rounds like bf16
        tol *= max(1.0, abs(result["check"]["ref_loss"]))
        result["check"]["ok"] = bool(result["check"]["loss_abs_err"] <= tol)  # NaN fails
    if steps_out is not None:
        steps_out.update(fwd_bwd=fwd_bwd, fwd=fwd)
        return result
    for key, step in (("fwd_bwd", fwd_bwd), ("fwd", fwd)):
        result[key] = common.time_fn(step, device, warmed=True, **timing_kwargs(args))
    return result


def timing_kwargs(args: argparse.Namespace) -> dict:
    return {"warmup": args.warmup, "reps": args.reps, "budget_s": args.budget_s}


def time_together(rows: list[dict], steps: dict[str, dict], args: argparse.Namespace) -> None:
    """The CPU timings of one point's measured competitors, taken in turns (`common.time_interleaved`)."""
    ok = [row for row in rows if row["status"] == "ok"]
    for key in ("fwd_bwd", "fwd"):
        calls = {row["backend"]: steps[row["backend"]][key] for row in ok}
        timings = common.time_interleaved(calls, **timing_kwargs(args))
        for row in ok:
            row[key] = timings[row["backend"]]


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


TABLE = Table(
    Column("loss", 6),
    Column("dtype", 5),
    Column("D", 5),
    Column("N", 7),
    Column("backend", 12),
    Column("fwd ms", 9, ".2f"),
    Column("f+b ms", 9, ".2f"),
    Column("TFLOP/s", 8, ".3f"),
    Column("%mm", 5, ".1f"),
    Column("peak MiB", 9, ".2f"),
    Column("x naive", 8, ".2f"),
    Column("mem/naive", 9, ".4f"),
    Column("loss err", 9, ".1e"),
)


def format_row(row: dict) -> str:
    """One line of the printed table (a point that did not run: its status and why)."""
    head = (row.get("loss", "clip"), row["dtype"], row["d"], row["n"], row["backend"])
    if row["status"] != "ok":
        return common.status_line(TABLE.line(*head), row)
    fb, check, peak = row["fwd_bwd"], row.get("check"), row["peak_extra_bytes"]
    error = ""
    if check:
        error = f"{check['loss_abs_err']:9.1e}" + ("" if check["ok"] else " FAIL")
    return TABLE.line(
        *head,
        row["fwd"]["median_ms"],
        fb["median_ms"],
        fb["tflops"],
        100 * fb["matmul_fraction"],
        peak / 2**20 if peak is not None else None,
        fb.get("speedup_vs_naive", ""),
        row.get("memory_vs_naive", ""),
        error,
    )


def plot(
    rows: list[dict], groups: list[tuple[str, int]], backends: list[str], rates: dict, path: Path, title: str
) -> Path | None:
    """Per (dtype, D): fwd+bwd time vs N (with the matmul-rate limit) and peak extra memory vs N, log-log."""
    panels = []
    for dtype, d in groups:
        mine = [r for r in rows if (r["dtype"], r["d"]) == (dtype, d)]
        sizes = sorted({r["n"] for r in mine})
        times, memory = {}, {}
        for backend in backends:
            ok = {r["n"]: r for r in mine if r["backend"] == backend and r["status"] == "ok"}
            times[backend] = (sizes, [ok[n]["fwd_bwd"]["median_ms"] if n in ok else None for n in sizes])
            memory[backend] = (sizes, [_mib(ok[n]["peak_extra_bytes"]) if n in ok else None for n in sizes])
        times["matmul limit"] = (sizes, [8 * n * n * d / (rates[dtype] * 1e12) * 1e3 for n in sizes])
        limit_style = {"matmul limit": {"color": "black", "linestyle": "--", "marker": None}}
        panels.append(
            {
                "title": f"{dtype}, D={d}: forward+backward",
                "xlabel": "N",
                "ylabel": "ms",
                "series": times,
                "styles": limit_style,
            }
        )
        panels.append({"title": f"{dtype}, D={d}: peak extra memory", "xlabel": "N", "ylabel": "MiB", "series": memory})
    return common.plot_lines(path, panels, ncols=2, title=title)


def _mib(count: int | None) -> float | None:
    return count / 2**20 if count else None  # 0 or unmeasured: no point on a log scale


def siglip_target(rows: list[dict]) -> dict:
    """The SigLIP target at its point, from this run's rows (met None when not measured)."""
    t = SIGLIP_TARGET
    at = {r["backend"]: r for r in rows if (r["dtype"], r["d"], r["n"]) == (t["dtype"], t["d"], t["n"])}
    fused, naive = at.get(t["backend"]), at.get("naive")
    result = {**t, "fused_status": fused and fused["status"], "naive_status": naive and naive["status"], "met": None}
    if fused is None or fused["status"] != "ok":
        return result
    speedup = fused["fwd_bwd"].get("speedup_vs_naive")
    memory = fused.get("memory_vs_naive")
    result.update(
        fwd_bwd_speedup_vs_naive=speedup,
        memory_vs_naive=memory,
        fused_peak_extra_bytes=fused["peak_extra_bytes"],
        fused_fwd_bwd_ms=fused["fwd_bwd"]["median_ms"],
    )
    if naive is not None and naive["status"] == "oom":
        # naive does not fit at all: the memory criterion holds, the speed one cannot be measured
        result.update(note="naive ran out of memory at this point; no time ratio")
    elif speedup is not None and memory is not None:
        result["met"] = bool(speedup >= t["min_speedup"] and memory < t["max_memory_fraction"])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.benchmark_parser(__doc__)
    parser.add_argument("--loss", default="clip", help="comma-separated of clip,siglip,supcon, or all (default: clip)")
    common.add_device_argument(parser)
    parser.add_argument(
        "--dtypes",
        type=common.dtype_list,
        default=ByDevice(["bf16", "fp32"], ["fp32"]),
        help="comma-separated of fp32,bf16,fp16 (default: %(default)s)",
    )
    parser.add_argument(
        "--dims",
        type=common.int_list,
        default=ByDevice([512, 1024], [512]),
        help="comma-separated feature dims D (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        type=common.int_list,
        help="comma-separated batch sizes N (default: cpu 256..4096, cuda 1024..262144)",
    )
    parser.add_argument("--max-n", type=int, help="cut the default sweep at this N, or extend it by doubling up to it")
    parser.add_argument(
        "--backends",
        type=common.name_list,
        help=f"comma-separated of {','.join(COMPETITORS)} (default: all that run on the device)",
    )
    common.add_timing_arguments(parser, warmup=ByDevice(5, 1), reps=ByDevice(20, 5), budget_s=5.0)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (CUDA kernel and cuBLAS)")
    common.add_cpu_memory_argument(parser)
    common.add_out_argument(parser)
    args = common.parse_benchmark_args(parser, argv)
    args.losses = list(LOSSES) if args.loss == "all" else list(dict.fromkeys(args.loss.split(",")))
    if unknown := [x for x in args.losses if x not in SPECS]:
        parser.error(f"--loss: unknown {unknown}; choose from {','.join(LOSSES)} or all")
    if unknown := [x for x in args.backends or [] if x not in COMPETITORS]:
        parser.error(f"--backends: unknown {unknown}; choose from {','.join(COMPETITORS)}")
    if not args.sizes:
        sizes = DEFAULT_SIZES[args.device]
        args.sizes = common.doubled(sizes, args.max_n) if args.max_n else sizes
    if "supcon" in args.losses and (odd := [n for n in args.sizes if n % 2]):
        parser.error(f"--sizes: supcon stacks two views, N must be even, got {odd}")
    return args


def backends_for(loss: str, args: argparse.Namespace) -> list[str]:
    """The competitors for `loss`: --backends, or all that can run it on the device; naive first."""
    backends = list(args.backends or [b for b in COMPETITORS if unavailable(b, args.device, "fp32", loss) is None])
    backends.sort(key=lambda b: b != "naive")  # naive first: the others' ratios need it
    return backends


def loss_config(loss: str, args: argparse.Namespace, backends: list[str]) -> dict:
    """The JSON's "config": what was run, and how each figure is defined."""
    spec = SPECS[loss]
    return {
        "loss": loss,
        "device": args.device,
        "dtypes": args.dtypes,
        "dims": args.dims,
        "sizes": args.sizes,
        "backends": backends,
        "warmup": args.warmup,
        "reps": args.reps,
        "budget_s": args.budget_s,
        "tf32": args.tf32,
        **spec.config,
        "inputs": "independent randn rows, L2-normalised, in the benchmarked dtype; features and the scalars "
        f"{list(spec.scalars)} (fp32) require grad",
        "flops": "fwd 2*N^2*D, fwd_bwd 8*N^2*D for every backend (the fused algorithm's work; naive actually does "
        "6*N^2*D)",
        "memory": "CUDA: max_memory_allocated - memory_allocated before; CPU: VmHWM - VmRSS in a fresh process",
        "check": f"loss and grads vs fp64 reference for N <= {CHECK_MAX_N[args.device]}; ok if |err| <= tol * "
        f"max(1, |loss|), tol {CHECK_TOLERANCE} (bf16's with --tf32)",
    }


def not_run(loss: str, backend: str, dtype: str, d: int, n: int, device: str, naive_oom_at: dict) -> dict | None:
    """The status of a point that is not measured (its backend cannot run, or naive would not fit), else None."""
    if reason := unavailable(backend, device, dtype, loss):
        return {"status": "unavailable", "reason": reason}
    if backend != "naive":
        return None
    if (dtype, d) in naive_oom_at:
        return {"status": "skipped", "reason": f"naive ran out of memory at N={naive_oom_at[(dtype, d)]}"}
    if device == "cpu" and naive_too_big_for_cpu(n, loss):
        gib = SPECS[loss].naive_bytes_per_logit * n * n / 2**30
        return {"status": "skipped", "reason": f"naive needs ~{gib:.1f} GiB"}
    return None


def point_row(
    loss: str,
    dtype: str,
    d: int,
    n: int,
    backend: str,
    args: argparse.Namespace,
    naive_oom_at: dict,
    steps_out: dict | None = None,
) -> dict:
    """One point's row: measured (status "ok", or "oom" when it ran out of memory), or why it was not run;
    untimed with `steps_out` (see `run_point`)."""
    row = {
        "loss": loss,
        "dtype": dtype,
        "d": d,
        "n": n,
        "backend": backend,
        "fwd_flops": 2 * n * n * d,
        "fwd_bwd_flops": 8 * n * n * d,
    }
    measure = functools.partial(run_point, backend, n, d, dtype, args.device, args, loss, steps_out)
    row.update(
        not_run(loss, backend, dtype, d, n, args.device, naive_oom_at) or common.measure_or_oom(measure, args.device)
    )
    return row


def run_loss(loss: str, args: argparse.Namespace, header: dict, rates: dict) -> list[dict]:
    """The sweep of one loss; writes <out>/<result_name>.json after every point and the PNG at the end.

    A point that runs out of memory is recorded as such and the sweep goes on; naive, once out of memory at
    some N, is skipped at the larger N of that dtype and D.
    """
    spec = SPECS[loss]
    backends = backends_for(loss, args)
    groups = [(dtype, d) for dtype in args.dtypes for d in args.dims]
    payload = {
        "benchmark": spec.benchmark,
        "environment": header,
        "config": loss_config(loss, args, backends),
        "matmul_tflops": rates,
        "points": [],
    }
    record = common.Record(args.out, spec.result_name, payload, rows="points")
    naive_oom_at: dict[tuple[str, int], int] = {}
    points = [(dtype, d, n) for dtype, d in groups for n in args.sizes]
    # On a CPU a point's competitors are timed in turns (ratios that hold on a shared machine); on a GPU
    # each alone, as its kernels would run.
    together = args.device == "cpu"
    tqdm.write(TABLE.header())
    for dtype, d, n in tqdm(points, desc=f"bench_loss {loss}", disable=None, leave=False):
        rows, steps = [], {backend: {} for backend in backends}
        for backend in backends:
            row = point_row(loss, dtype, d, n, backend, args, naive_oom_at, steps[backend] if together else None)
            if backend == "naive" and row["status"] == "oom":
                naive_oom_at[(dtype, d)] = n
            rows.append(row)
        if together:
            time_together(rows, steps, args)
        del steps  # the competitors' inputs
        naive = next((row for row in rows if row["backend"] == "naive" and row["status"] == "ok"), None)
        for row in rows:
            if row["status"] == "ok":
                add_ratios(row, naive if row is not naive else None, rates[dtype])
            if loss == "siglip":
                payload["target"] = siglip_target([*record.rows, row])
            record.add(row, format_row(row))
    if payload.get("target", {}).get("fused_status") is not None:
        print(f"SigLIP target: {payload['target']}")
    title = f"{spec.title} on {header['device']}"
    record.finish(lambda path: plot(record.rows, groups, backends, rates, path, title))
    return record.rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    header = common.environment_header()
    rates = {dtype: matmul_rate_tflops(args.device, DTYPES[dtype]) for dtype in args.dtypes}
    print(
        f"device: {header['device']}; losses: {','.join(args.losses)}; matmul rate (TFLOP/s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in rates.items())
    )
    rows = [row for loss in args.losses for row in run_loss(loss, args, header, rates)]
    # a fastclip backend off its reference fails the run; so does a baseline in fp32 (a wrong baseline
    # would make every ratio meaningless), while bf16/fp16 naive may miss by its rounded N x N logits
    failed = [
        r
        for r in rows
        if r.get("check") and not r["check"]["ok"] and (r["backend"] not in BASELINES or r["dtype"] == "fp32")
    ]
    for r in failed:
        print(f"CHECK FAILED: {r['loss']} {r['backend']} {r['dtype']} D={r['d']} N={r['n']}: {r['check']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

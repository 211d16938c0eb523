"""Attention on CLIP's shapes, with the model's inputs: fastclip's Triton kernel vs F.scaled_dot_product_attention.

    python benchmarks/bench_attention.py [--dtypes bf16,fp16] [--shapes vit_b16,text] [--out benchmarks/results/local]

Inputs are what `MultiheadSelfAttention.forward` makes: one packed leaf `qkv` [B, S, 3, H, D] (requires grad),
the output consumed as `out.transpose(1, 2).reshape(B, S, H * D)`. The forward + backward runs
`torch.autograd.grad` to the packed leaf. Every competitor gets the same inputs; all but the packed calls
take q, k, v as its strided views `t.transpose(1, 2) for t in qkv.unbind(2)`, so autograd's re-stacking
of dq, dk, dv into d(qkv) is timed for them.

Competitors: fastclip (`attention_packed(qkv, ..., backend="triton")`, the model's call: d(qkv) written as one
tensor, the backward path the rule picks; autotuned in an untimed first call), fastclip_fused and
fastclip_split (the same call with FASTCLIP_ATTENTION_BACKWARD forcing the 5-dot atomic backward or the 7-dot
deterministic one around the whole measurement), fastclip_views (`attention` on the views: dq, dk, dv
stacked by autograd); SDPA as a user gets it (it picks its kernel) and forced to each backend with
`torch.nn.attention.sdpa_kernel` (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH). A backend that
refuses the inputs (e.g. flash with a mask) is recorded as skipped with SDPA's reason (its warnings, then its
error).

The text shape (S=77, causal) holds realistic captions: lengths from `common.caption_lengths` (log-normal,
mean ~18 tokens, clipped to [2, 77]), as CLIP's text tower sees them. Its fastclip competitors (the first
also as fastclip_fused, fastclip_split and fastclip_views, as above):
  fastclip        attention_packed(causal=True, lengths=lengths): the ragged path the text tower runs;
  fastclip_mask   attention_packed(causal=True, key_padding_mask=...): the same result through the mask;
  fastclip_dense  attention_packed(causal=True): every caption at full length;
  sdpa*           is_causal=True, dense: exact at each caption's real tokens (a token sees only earlier ones),
                  so the pooled end-of-text feature is the same;
  sdpa_mask*      a [B, 1, S, S] boolean mask, causal and key padding: what SDPA needs to skip the padding.
Outputs are compared at real tokens only (the dense competitors write something at the padding).

Reports TFLOP/s of the useful FLOPs (4*S_q*S_k*D per head forward over visible pairs: the causal half when
causal, and for the text shape only pairs inside each caption; backward = 2.5x forward) and, for the text shape,
of the dense-equivalent FLOPs (every caption at 77 tokens); GB/s of the minimum traffic of the real tokens
(q, k, v, o forward; + dO, dq, dk, dv backward), since below S ~ 600 attention is memory-bound; the peak memory
of the forward + backward; fastclip's fwd+bwd speed-up over the best SDPA competitor per shape, and whether it
meets TARGETS. Writes JSON (after every shape) and a PNG. Without a GPU it runs tiny shapes with fastclip on its
PyTorch path, as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file, however this is run
import common  # noqa: E402
from common import Column, Table  # noqa: E402

from fastclip.backends import DTYPES, SHORT_DTYPE_NAMES  # noqa: E402
from fastclip.ops.attention import attention, attention_packed  # noqa: E402

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> out [B, H, S, D]
# The fastclip competitors that force a backward path: label -> FASTCLIP_ATTENTION_BACKWARD's value
BACKWARD_PATH_ENV = "FASTCLIP_ATTENTION_BACKWARD"
FORCED_PATHS = {"fastclip_fused": "fused", "fastclip_split": "split"}


@dataclass(frozen=True)
class Shape:
    batch: int  # images or captions
    heads: int
    seq: int
    head_dim: int
    causal: bool = False
    padded: bool = False  # text: realistic caption lengths, padding after each caption's end-of-text token


SHAPES = {  # the shapes with a target first: a run cut short by its time limit still judges them
    "vit_b16": Shape(256, 12, 197, 64),  # 3072 heads x 197 tokens
    "vit_l14": Shape(256, 16, 257, 64),
    "text": Shape(256, 8, 77, 64, causal=True, padded=True),  # ViT-B's text tower: width 512, 8 heads
    "vit_b32": Shape(256, 12, 50, 64),
    "vit_l14_336": Shape(256, 16, 577, 64),
    "vit_h14": Shape(256, 16, 257, 80),
}
# the fwd+bwd speed-up over the best SDPA competitor that fastclip's kernel must reach, in TARGET_DTYPE
TARGETS = {
    "vit_b16": 1.3,  # S=197, d=64
    "vit_l14": 1.3,  # S=257, d=64
    "text": 1.5,  # S=77 causal, realistic caption lengths (fastclip on its ragged path)
}
TARGET_DTYPE = "bf16"
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
HAS_LENGTHS = "lengths" in inspect.signature(attention).parameters  # the ragged path, in this checkout or not


# --------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """One shape's inputs, shared by every competitor."""

    qkv: torch.Tensor  # [B, S, 3, H, D] leaf that requires grad: the fused projection's output
    grad_out: torch.Tensor  # [B, S, H * D], the gradient the output projection sends back
    lengths: torch.Tensor | None = None  # [B] int64 on the device: tokens per caption (padded shapes)
    key_padding_mask: torch.Tensor | None = None  # [B, S], True at padding (fastclip's convention)
    sdpa_mask: torch.Tensor | None = None  # [B, 1, S, S], True = attend: causal and not padding (SDPA's)
    valid: torch.Tensor | None = None  # [B, S], True at real tokens: where outputs are compared


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S, D]: strided views of the packed [B, S, 3, H, D] tensor, as the model makes them."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k, v


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H * D], as the model feeds its output projection."""
    batch, heads, seq, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """Seeded inputs made on the CPU (the same values on every device), then moved."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    size = (shape.batch, shape.seq, 3, shape.heads, shape.head_dim)
    qkv = torch.randn(size, generator=gen).to(device, dtype).requires_grad_(True)
    grad_out = torch.randn(shape.batch, shape.seq, shape.heads * shape.head_dim, generator=gen).to(device, dtype)
    if not shape.padded:
        return Inputs(qkv, grad_out)
    lengths = common.caption_lengths(shape.batch, shape.seq)
    valid = torch.arange(shape.seq)[None, :] < lengths[:, None]  # [B, S]
    visible = valid[:, None, None, :]  # keys: [B, 1, 1, S]
    if shape.causal:
        visible = visible & torch.ones(shape.seq, shape.seq, dtype=torch.bool).tril()
    sdpa_mask = visible.expand(shape.batch, 1, shape.seq, shape.seq).contiguous()
    return Inputs(qkv, grad_out, lengths.to(device), (~valid).to(device), sdpa_mask.to(device), valid.to(device))


# ---------------------------------------------------------------------------------------------- competitors


class PackedCall:
    """A competitor that takes the packed leaf [B, S, 3, H, D] (`measure` hands it over whole). Called with
    q, k, v, as other tools call every competitor, it ignores them: they are views of that very leaf."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor) -> None:
        self.fn, self.qkv = fn, qkv

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(self.qkv)


def fastclip_competitors(shape: Shape, inputs: Inputs, backend: str) -> dict[str, Attn]:
    """fastclip's packed call on `backend` (for padded shapes: ragged, masked and dense); the headline call
    also with each backward path forced (FORCED_PATHS, set around its measurement) and on the views."""
    options = dict(causal=shape.causal, backend=backend)
    headline_options = dict(options, lengths=inputs.lengths) if shape.padded else options

    def headline(qkv):
        if shape.padded and not HAS_LENGTHS:  # a RuntimeError, so it is recorded as skipped with this reason
            raise RuntimeError("fastclip.ops.attention.attention takes no `lengths` keyword in this checkout")
        return attention_packed(qkv, **headline_options)

    def views(q, k, v):
        return attention(q, k, v, **headline_options)

    packed = PackedCall(headline, inputs.qkv)
    found = {"fastclip": packed, **dict.fromkeys(FORCED_PATHS, packed), "fastclip_views": views}
    if shape.padded:
        masked = functools.partial(attention_packed, key_padding_mask=inputs.key_padding_mask, **options)
        found["fastclip_mask"] = PackedCall(masked, inputs.qkv)
        found["fastclip_dense"] = PackedCall(functools.partial(attention_packed, **options), inputs.qkv)
    return found


@contextlib.contextmanager
def forced_backward(label: str):
    """FASTCLIP_ATTENTION_BACKWARD set to the path `label` forces (read at every backward), if any."""
    if label not in FORCED_PATHS:
        yield
        return
    before = os.environ.get(BACKWARD_PATH_ENV)
    os.environ[BACKWARD_PATH_ENV] = FORCED_PATHS[label]
    try:
        yield
    finally:
        if before is None:
            del os.environ[BACKWARD_PATH_ENV]
        else:
            os.environ[BACKWARD_PATH_ENV] = before


def sdpa_competitors(shape: Shape, inputs: Inputs) -> dict[str, Attn]:
    """SDPA as a user gets it and forced to each backend; padded shapes add the boolean-mask variant."""
    scale = shape.head_dim**-0.5

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, scale=scale)

    def masked(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.sdpa_mask, scale=scale)

    variants = {"sdpa": dense, "sdpa_mask": masked} if shape.padded else {"sdpa": dense}
    competitors = {}
    for name, fn in variants.items():
        competitors[name] = fn
        for backend in SDPA_BACKENDS:
            competitors[f"{name}_{backend.split('_')[0].lower()}"] = _forced(fn, backend)
    return competitors


def _forced(fn: Attn, backend: str) -> Attn:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return fn(q, k, v)

    return run


def competitors(shape: Shape, inputs: Inputs, device: str) -> dict[str, Attn]:
    """fastclip first (the reference of the output comparison), then SDPA."""
    backend = "triton" if device == "cuda" else "torch"  # on a CPU: fastclip's PyTorch path, a smoke test
    return {**fastclip_competitors(shape, inputs, backend), **sdpa_competitors(shape, inputs)}


def is_sdpa(label: str) -> bool:
    return label.startswith("sdpa")


# --------------------------------------------------------------------------------------------- measuring


def flops_and_bytes(shape: Shape, dtype: torch.dtype, lengths: list[int] | None) -> dict[str, float]:
    """Useful FLOPs (visible pairs of real tokens) and the minimum bytes of the real tokens, per pass;
    with `lengths`, also the dense-equivalent FLOPs (every row at `shape.seq` tokens)."""

    def pairs(n: int) -> float:
        return n * (n + 1) / 2 if shape.causal else n * n

    per_pair = 4 * shape.heads * shape.head_dim  # q.k and p.v, 2 FLOPs per multiply-add
    token_bytes = shape.heads * shape.head_dim * torch.finfo(dtype).bits / 8  # one tensor, one token
    rows = lengths if lengths is not None else [shape.seq] * shape.batch
    fwd = per_pair * sum(pairs(n) for n in rows)
    tokens = sum(rows)
    work = {
        "fwd_flops": fwd,
        "fwd_bwd_flops": 3.5 * fwd,
        "fwd_bytes": 4 * tokens * token_bytes,
        "fwd_bwd_bytes": 12 * tokens * token_bytes,
    }
    if lengths is not None:
        dense = per_pair * shape.batch * pairs(shape.seq)
        work.update(dense_fwd_flops=dense, dense_fwd_bwd_flops=3.5 * dense)
    return work


def _skip_reason(error: BaseException, caught: list[warnings.WarningMessage]) -> str:
    """SDPA explains a refusal in warnings, then raises a generic error: keep both."""
    messages = [str(w.message).strip() for w in caught if str(w.message).strip()]
    head = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return " | ".join([*dict.fromkeys(messages), f"{type(error).__name__}: {head}"])[:600]


def measure(fn: Attn, inputs: Inputs, device: str, warmup: int, reps: int) -> dict:
    """Forward and forward + backward timings (to the packed qkv leaf) and the fwd+bwd peak memory;
    or {"skipped": reason}."""

    def forward():
        if isinstance(fn, PackedCall):  # the packed leaf itself, as the model hands it over
            return merge_heads(fn.fn(inputs.qkv))
        return merge_heads(fn(*split_heads(inputs.qkv)))

    def forward_backward():
        return torch.autograd.grad(forward(), inputs.qkv, inputs.grad_out)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = forward()  # also runs the autotuner once, outside the timings
            forward_backward()
        except (RuntimeError, TypeError, ValueError) as error:  # a refusal, or out of memory: the rest still runs
            return {"skipped": _skip_reason(error, caught)}
    # warmed: both already ran once just above (autotuning included), so time_fn skips its lazy-init call
    timing = {"warmup": warmup, "reps": reps, "warmed": True}
    result = {
        "fwd": common.time_fn(forward, device, **timing),
        "fwd_bwd": common.time_fn(forward_backward, device, **timing),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        result["fwd_bwd_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    result["output"] = out.detach()
    return result


def add_rates(result: dict, work: dict) -> None:
    """TFLOP/s (useful; dense-equivalent too when the work has it) and GB/s, in place."""
    for key in ("fwd", "fwd_bwd"):
        seconds = result[key]["median_ms"] / 1e3
        result[key]["tflops"] = work[f"{key}_flops"] / seconds / 1e12
        result[key]["gbps"] = work[f"{key}_bytes"] / seconds / 1e9
        if f"dense_{key}_flops" in work:
            result[key]["tflops_dense_equiv"] = work[f"dense_{key}_flops"] / seconds / 1e12


def max_abs_diff(out: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None) -> float:
    """Largest difference at real tokens (all tokens when `valid` is None)."""
    diff = (out.float() - reference.float()).abs()
    return (diff if valid is None else diff[valid]).max().item()


def speedups(rows: dict) -> tuple[str | None, dict[str, float]]:
    """(the fastest SDPA competitor's label, every fastclip competitor's fwd+bwd speed-up over it)."""
    times = {label: r["fwd_bwd"]["median_ms"] for label, r in rows.items() if "fwd_bwd" in r}
    sdpa = {label: t for label, t in times.items() if is_sdpa(label)}
    if not sdpa:
        return None, {}
    best = min(sdpa, key=sdpa.get)
    return best, {label: sdpa[best] / t for label, t in times.items() if not is_sdpa(label)}


def run_shape(name: str, shape: Shape, dtype_name: str, device: str, warmup: int, reps: int) -> dict:
    """Every competitor on one shape and dtype, its rates and its agreement with the first that ran."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, dtype, device)
    lengths = inputs.lengths.tolist() if inputs.lengths is not None else None
    work = flops_and_bytes(shape, dtype, lengths)
    rows, reference, reference_label = {}, None, None
    for label, fn in competitors(shape, inputs, device).items():
        with forced_backward(label):
            result = measure(fn, inputs, device, warmup, reps)
        out = result.pop("output", None)
        if out is not None:
            if reference is None:
                reference, reference_label = out, label
            result["max_abs_diff"] = max_abs_diff(out, reference, inputs.valid)
            add_rates(result, work)
        rows[label] = result
        common.free_memory(device)
    best, ratios = speedups(rows)
    row = {
        "shape": name,
        **asdict(shape),
        "dtype": dtype_name,
        **work,
        "diff_reference": reference_label,
        "results": rows,
        "best_sdpa": best,
        "speedups_vs_best_sdpa": ratios,
        "fwd_bwd_speedup_vs_best_sdpa": ratios.get("fastclip"),
    }
    if lengths is not None:
        row["lengths"] = lengths
        row["length_stats"] = common.length_summary(inputs.lengths)
    row["target"] = target_verdict(name, dtype_name, device, row["fwd_bwd_speedup_vs_best_sdpa"])
    return row


def target_verdict(name: str, dtype_name: str, device: str, speedup: float | None) -> dict | None:
    """{"min_speedup", "speedup", "met", "note"} for a shape with a target; met is None when not measured."""
    if name not in TARGETS:
        return None
    verdict = {"min_speedup": TARGETS[name], "dtype": TARGET_DTYPE, "speedup": speedup, "met": None, "note": ""}
    if device != "cuda":
        verdict["note"] = "not measured: no GPU (smoke test)"
    elif dtype_name != TARGET_DTYPE:
        verdict["note"] = f"not measured: the target is for {TARGET_DTYPE}"
    elif speedup is None:
        verdict["note"] = "not measured: fastclip or every SDPA competitor was skipped"
    else:
        verdict["met"] = speedup >= TARGETS[name]
    return verdict


def targets_summary(rows: list[dict], shapes: list[str], device: str) -> list[dict]:
    """One entry per target: its verdict in TARGET_DTYPE, or why there is none."""
    summary = []
    for name, minimum in TARGETS.items():
        mine = [r for r in rows if r["shape"] == name and r["dtype"] == TARGET_DTYPE]
        if mine:
            summary.append({"shape": name, **mine[0]["target"]})
            continue
        if device != "cuda":
            note = "not measured: no GPU (smoke test)"
        elif name not in shapes:
            note = "not run: shape not selected"
        else:
            note = f"not run: {TARGET_DTYPE} not selected"
        summary.append(
            {"shape": name, "min_speedup": minimum, "dtype": TARGET_DTYPE, "speedup": None, "met": None, "note": note}
        )
    return summary


# --------------------------------------------------------------------------------------------- output


def format_result(name: str, dtype_name: str, label: str, r: dict) -> str:
    """One printed line; `[dense ...]` is the dense-equivalent TFLOP/s of the padded text shape."""
    head = f"{name:12} {dtype_name:5} {label:22}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped'][:160]}"
    f, fb = r["fwd"], r["fwd_bwd"]
    dense = f" [dense {fb['tflops_dense_equiv']:6.1f}]" if "tflops_dense_equiv" in fb else ""
    return (
        f"{head} fwd {f['median_ms']:8.3f} ms {f['tflops']:6.1f} TFLOP/s {f['gbps']:7.0f} GB/s | "
        f"fwd+bwd {fb['median_ms']:8.3f} ms {fb['tflops']:6.1f} TFLOP/s{dense} | diff {r['max_abs_diff']:.1e}"
    )


def format_speedups(row: dict) -> list[str]:
    lines = []
    for label, ratio in row["speedups_vs_best_sdpa"].items():
        verdict = ""
        if label == "fastclip" and row["target"] is not None and row["target"]["met"] is not None:
            verdict = f" (target {row['target']['min_speedup']}x {'met' if row['target']['met'] else 'MISSED'})"
        lines.append(
            f"{row['shape']:12} {row['dtype']:5} {label} fwd+bwd speed-up vs best SDPA "
            f"({row['best_sdpa']}): {ratio:.2f}x{verdict}"
        )
    return lines


def format_shape(row: dict) -> list[str]:
    """The printed lines of one shape and dtype: caption lengths, every competitor, the speed-ups."""
    name, dtype_name = row["shape"], row["dtype"]
    lines = []
    if "length_stats" in row:
        stats = row["length_stats"]
        lines.append(
            f"{name:12} {dtype_name:5} caption lengths: mean {stats['mean']:.1f}, "
            f"min {stats['min']}, max {stats['max']} of {row['seq']}"
        )
    lines += [format_result(name, dtype_name, label, result) for label, result in row["results"].items()]
    return lines + format_speedups(row)


TARGETS_TABLE = Table(
    Column("target (fwd+bwd vs best SDPA)", 36, align="<"),
    Column("required", 9),
    Column("measured", 9),
    Column("verdict", 0, align="<"),
)


def format_targets(summary: list[dict]) -> list[str]:
    lines = [TARGETS_TABLE.header()]
    for t in summary:
        measured = f"{t['speedup']:.2f}x" if t["speedup"] is not None else "-"
        verdict = t["note"] if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(TARGETS_TABLE.line(f"{t['shape']} {t['dtype']}", f">= {t['min_speedup']}x", measured, verdict))
    return lines


def plot(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars: fwd+bwd speed-up of every competitor over the best SDPA one, per shape and dtype."""
    names = list(dict.fromkeys(n for r in rows for n in r["results"]))
    speedups = {name: [_speedup(r, name) for r in rows] for name in names}
    groups = [f"{r['shape']}\n{r['dtype']}" for r in rows]
    return common.plot_bars(
        path,
        groups,
        speedups,
        reference=1.0,
        ylabel="fwd+bwd speed-up over the best SDPA competitor",
        title="Attention on CLIP shapes (higher is better; 0 = does not apply)",
    )


def _speedup(row: dict, name: str) -> float:
    """`name`'s fwd+bwd speed-up over the best SDPA competitor in `row`; 0 where either did not run."""
    best = row["results"].get(row["best_sdpa"], {}).get("fwd_bwd")
    mine = row["results"].get(name, {}).get("fwd_bwd")
    return best["median_ms"] / mine["median_ms"] if mine and best else 0.0


# ------------------------------------------------------------------------------------ tile quantization

TILE_LENGTHS = (50, 77, 197, 257, 577)  # ViT-B/32, text, ViT-B/16, ViT-L/14, ViT-L/14@336
TILINGS = ((32, 32), (64, 64), (128, 64), (128, 128))  # (BLOCK_M, BLOCK_N) of the forward's configs


def computed_pairs(seq_q: int, seq_k: int, block_m: int, block_n: int, tail: int | None, causal: bool) -> int:
    """Query-key pairs the Triton forward computes, padding included, following its programs and key loops:
    whole blocks, then the ragged end in `tail`-wide tiles (None: in whole blocks, as before narrow tiles)."""
    tail_m, tail_n = min(tail or block_m, block_m), min(tail or block_n, block_n)
    full = seq_q // block_m
    programs = [(i * block_m, block_m) for i in range(full)]
    programs += [(full * block_m + j * tail_m, tail_m) for j in range(-(-(seq_q % block_m) // tail_m))]
    total = 0
    for start_m, rows in programs:
        if causal:  # as _key_range: keys up to the block's last row; whole blocks up to its first
            hi = min(seq_k, start_m + rows)
            full_hi = min(seq_k, start_m + 1) // block_n * block_n
            tail_lo = full_hi + (hi - full_hi) // block_n * block_n
        else:
            hi, full_hi = seq_k, seq_k // block_n * block_n
            tail_lo = full_hi
        total += rows * (tail_lo + -(-(hi - tail_lo) // tail_n) * tail_n)
    return total


def tile_work(head_dims: tuple[int, ...] = (64, 80)) -> list[dict]:
    """Useful fraction of the forward's tile work at CLIP's lengths, per tiling, before and after narrow
    ragged-end tiles (sequence: visible pairs / computed pairs) and head-dim pieces (lanes: head dim / lanes
    its dots compute). Pure arithmetic over the kernel's loop structure: no GPU, no timing."""
    from fastclip.ops import attention_triton as at  # the pieces rule; importing defines, never launches

    rows = []
    for head_dim in head_dims:
        padded = max(16, 1 << (head_dim - 1).bit_length())
        lanes = sum(at._pieces_kwargs(head_dim, "fwd").values())  # as the forward launches
        for causal in (False, True):
            for seq in TILE_LENGTHS:
                useful = sum(min(i + 1, seq) for i in range(seq)) if causal else seq * seq
                for block_m, block_n in TILINGS:
                    before = useful / computed_pairs(seq, seq, block_m, block_n, None, causal)
                    after = useful / computed_pairs(seq, seq, block_m, block_n, at.TAIL, causal)
                    rows.append(
                        dict(
                            seq=seq,
                            head_dim=head_dim,
                            causal=causal,
                            tile=f"{block_m}x{block_n}",
                            seq_before=before,
                            seq_after=after,
                            lanes_before=head_dim / padded,
                            lanes_after=head_dim / lanes,
                            total_before=before * head_dim / padded,
                            total_after=after * head_dim / lanes,
                        )
                    )
    return rows


def format_tile_work(rows: list[dict]) -> list[str]:
    lines = [
        "useful fraction of the forward's tile work (sequence x head-dim lanes), before -> after narrow "
        "ragged-end tiles and head-dim pieces"
    ]
    for r in rows:
        lines.append(
            f"  S={r['seq']:<4} d={r['head_dim']:<3} {'causal' if r['causal'] else 'full  '} {r['tile']:<8} "
            f"sequence {r['seq_before']:6.1%} -> {r['seq_after']:6.1%}   lanes {r['lanes_before']:6.1%} -> "
            f"{r['lanes_after']:6.1%}   total {r['total_before']:6.1%} -> {r['total_after']:6.1%}"
        )
    return lines


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.benchmark_parser(__doc__)
    common.add_device_argument(parser, auto=True)
    parser.add_argument(
        "--dtypes",
        type=common.dtype_list,
        default="bf16,fp16",
        help=f"comma-separated, of {','.join(SHORT_DTYPE_NAMES)} (default: %(default)s)",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--batch", type=int, default=None, help="override every shape's batch size")
    parser.add_argument(
        "--tiles", action="store_true", help="print the useful fraction of the tile work at CLIP's lengths and exit"
    )
    common.add_timing_arguments(parser, warmup=5, reps=20)
    common.add_out_argument(parser)
    args = common.parse_benchmark_args(parser, argv)
    unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    return args


def selected_shapes(args: argparse.Namespace) -> tuple[dict[str, Shape], list[str]]:
    """The shapes and dtypes to run: on a CPU tiny shapes in fp32 with few reps (a smoke test)."""
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    dtypes = args.dtypes
    if args.device == "cpu":
        print("no CUDA device: tiny shapes, fastclip on its PyTorch path (a smoke test, not a measurement)")
        shapes = {name: dataclasses.replace(s, batch=2, heads=2) for name, s in shapes.items()}
        dtypes, args.warmup, args.reps = ["fp32"], 1, 3
    if args.batch is not None:
        shapes = {name: dataclasses.replace(s, batch=args.batch) for name, s in shapes.items()}
    return shapes, dtypes


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the payload written to attention_<device>.json."""
    args = parse_args(argv)
    if args.tiles:
        rows = tile_work()
        print("\n".join(format_tile_work(rows)))
        return {"benchmark": "attention_tiles", "rows": rows}
    device = args.device
    shapes, dtypes = selected_shapes(args)
    payload = {
        "benchmark": "attention",
        "environment": common.environment_header(),
        "device": device,
        "warmup": args.warmup,
        "reps": args.reps,
        "has_lengths": HAS_LENGTHS,
        "inputs": "one packed [B, S, 3, H, D] leaf (fastclip: attention_packed; the others: its strided q/k/v "
        "views); backward to that leaf; output merged to [B, S, H*D]",
        "backward_paths": f"fastclip: the rule's path; fastclip_fused / fastclip_split: {BACKWARD_PATH_ENV} forced",
        "flops": "tflops: useful FLOPs (visible pairs of real tokens); tflops_dense_equiv: every caption at full "
        "length (text only); backward counted as 2.5x forward",
        "targets": TARGETS,
        "target_dtype": TARGET_DTYPE,
        "target_summary": targets_summary([], list(shapes), device),
        "rows": [],
    }
    record = common.Record(args.out, f"attention_{device}", payload)
    print(
        "TFLOP/s: useful FLOPs (text: causal pairs inside each caption), [dense] = dense-equivalent; "
        "diff: max |out - first competitor| at real tokens"
    )
    for name, shape in shapes.items():
        for dtype_name in dtypes:
            row = run_shape(name, shape, dtype_name, device, args.warmup, args.reps)
            payload["target_summary"] = targets_summary([*record.rows, row], list(shapes), device)
            record.add(row, *format_shape(row))
    print("\n".join(format_targets(payload["target_summary"])))
    record.finish(lambda path: plot(record.rows, path))
    return payload


if __name__ == "__main__":
    main()

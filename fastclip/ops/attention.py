"""`attention`: scaled dot-product attention for the CLIP encoders.

    out = softmax(q @ k^T * scale + masks) @ v,   q [B, H, Sq, D], k and v [B, H, Sk, D]

Conventions (the same on every backend and in `attention_reference`):
- `scale` defaults to 1/sqrt(D);
- `causal=True` is top-left aligned, as SDPA's `is_causal`: query i sees keys j <= i;
- `key_padding_mask` is a bool [B, Sk] tensor, True where the key is padding and must be ignored
  (nn.MultiheadAttention's convention; the opposite of SDPA's boolean `attn_mask`);
- `lengths` is an integer [B] tensor of valid lengths (values are clamped to [0, S]): for sequence b,
  keys at positions >= lengths[b] are ignored and query rows there get output 0. CLIP's text tower
  passes its end-of-text positions + 1, so the kernels skip every tile past a caption's end;
- a query row that sees no key at all (e.g. every key of its sequence padded) gets output 0 and
  passes no gradient, instead of the NaN of a plain softmax.

`attention_packed(qkv, ...)` takes the output of a fused qkv projection, [B, S, 3, H, D], and returns the
same as `attention` on its q, k, v slices; on the Triton backend its gradient is ONE tensor shaped like
qkv whose slices the backward kernels write directly, instead of three that autograd then stacks (an
extra read and write of 3*B*S*H*D elements per layer). The model's transformer calls it.

Backends: "triton" (the fused kernels of `attention_triton`, registered as the `fastclip::attention` and
`fastclip::attention_packed` custom ops with fake and autograd kernels) and "torch"
(`F.scaled_dot_product_attention`, which picks its own best kernel), or "auto": `fastclip.backends` says
which runs where (fp32 goes to SDPA on a GPU: the kernels compiled for fp32 spill registers).
`backend="triton"` also runs on CPU tensors when `TRITON_INTERPRET=1` was set before Triton kernels were
first defined: that is how CI tests the kernel without a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastclip.backends import resolve_attention_backend
from fastclip.ops._checks import check_float_tensor
from fastclip.ops.attention_masks import visible_keys


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    lengths: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices; raises TypeError/ValueError naming the argument and the expectation."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, ["batch", "heads", "seq", "head_dim"])
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device} and {v.device}")
    if k.shape != v.shape:
        raise ValueError(
            "k and v must have the same shape [batch, heads, seq_k, head_dim], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(
            f"q [batch, heads, seq_q, head_dim] and k [batch, heads, seq_k, head_dim] must agree in batch, heads and "
            f"head_dim, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_lengths(lengths, q)
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padded key, ignored), got {key_padding_mask.dtype}; "
            "for a 0/1 tensor with 1 = padding use mask.bool()"
        )
    expected = (k.shape[0], k.shape[2])
    if tuple(key_padding_mask.shape) != expected:
        raise ValueError(
            f"key_padding_mask must have shape [batch, seq_k] = {list(expected)}, got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on the device of q ({q.device}), got {key_padding_mask.device}")


def _check_lengths(lengths: torch.Tensor | None, q: torch.Tensor) -> None:
    """Shape, dtype and device only: the values are clamped, never read on the host (no device sync)."""
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor or None, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be an int32 or int64 tensor of sequence lengths, got {lengths.dtype}")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"lengths must have shape [batch] = [{q.shape[0]}], got {tuple(lengths.shape)}")
    if lengths.device != q.device:
        raise ValueError(f"lengths must be on the device of q ({q.device}), got {lengths.device}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """1/sqrt(head_dim) by default; otherwise a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (for 1/sqrt(head_dim)), got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite (it multiplies q @ k^T), got {scale}")
    return float(scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale + masks) v: q [B, H, Sq, D], k and v [B, H, Sk, D] -> [B, H, Sq, D].

    Any strides are accepted (views of a fused qkv projection need no copy); the Triton path stores the
    output as [B, Sq, H, D], so `out.transpose(1, 2).reshape(B, Sq, H * D)` is free. `key_padding_mask`
    [B, Sk] is True at padded keys; rows with no visible key return 0. `lengths` [B] ends each sequence:
    keys past it are ignored, rows past it return 0 (the Triton kernels skip their work). Differentiable
    in q, k and v.
    """
    check_attention_inputs(q, k, v, key_padding_mask, causal, lengths)
    scale = resolve_scale(scale, q.shape[-1])
    if resolve_attention_backend(backend, q) == "torch":
        return attention_torch(q, k, v, causal, key_padding_mask, scale, lengths)
    if torch.compiler.is_compiling():  # the registered op: one opaque node in the compiled graph
        return torch.ops.fastclip.attention(q, k, v, key_padding_mask, causal, scale, lengths)[0]
    return _EagerAttention.apply(q, k, v, key_padding_mask, causal, scale, lengths)


def check_packed_qkv(qkv: torch.Tensor) -> None:
    """A [batch, seq, 3, heads, head_dim] floating tensor: q, k, v stacked on dim 2."""
    check_float_tensor("qkv", qkv, ["batch", "seq", "3", "heads", "head_dim"])
    if qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must have shape [batch, seq, 3, heads, head_dim] (q, k, v on dim 2), got {tuple(qkv.shape)}"
        )


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S, D]: strided views of a packed [B, S, 3, H, D] tensor, no copy."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k, v


def attention_packed(
    qkv: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`attention` on the q, k, v slices of a fused projection qkv [B, S, 3, H, D] -> [B, H, S, D].

    The same result and arguments as `attention(*split_qkv(qkv), ...)`. On the Triton path the gradient
    of qkv is one tensor that the backward kernels write slice by slice (no stack of dq, dk, dv); the torch
    path is `attention`'s on the views.
    """
    check_packed_qkv(qkv)
    q, k, v = split_qkv(qkv)
    check_attention_inputs(q, k, v, key_padding_mask, causal, lengths)
    scale = resolve_scale(scale, q.shape[-1])
    if resolve_attention_backend(backend, q) == "torch":
        return attention_torch(q, k, v, causal, key_padding_mask, scale, lengths)
    if torch.compiler.is_compiling():
        return torch.ops.fastclip.attention_packed(qkv, key_padding_mask, causal, scale, lengths)[0]
    return _EagerPackedAttention.apply(qkv, key_padding_mask, causal, scale, lengths)


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The PyTorch path: SDPA, with `is_causal` (its fastest kernels) whenever there is no padding mask."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    # With a top-left causal mask a row before its end sees only keys before it: lengths need no key mask.
    if key_padding_mask is None and (lengths is None or (causal and seq_q <= seq_k)):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        if lengths is None:
            return out
        rows_past_end = torch.arange(seq_q, device=q.device) >= lengths[:, None]  # (B, Sq)
        return out.masked_fill(rows_past_end[:, None, :, None], 0.0)
    visible = visible_keys(seq_q, seq_k, causal, key_padding_mask, q.device, lengths)  # SDPA's True = attend
    has_key = visible.any(-1, keepdim=True)  # (B, 1, Sq or 1, 1)
    # Let rows with no key attend everywhere (finite, no NaN in the forward or backward), then zero them.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, scale=scale)
    return out.masked_fill(~has_key, 0.0)


# ------------------------------------------------------------------------------- the registered Triton op
# `torch.library.custom_op`, not `triton_op`: both give torch.compile a graph without breaks, but only the
# opaque custom op is known to work the same on torch 2.11 and 2.13, with an autotuned kernel, and on CPU
# tensors under the Triton interpreter (how CI runs opcheck and compile on it). Inductor could not fuse
# anything into a flash-attention kernel's prologue/epilogue here anyway.


def _triton_module():
    """attention_triton, imported on first use so that CPU-only runs never import Triton."""
    from fastclip.ops import attention_triton

    return attention_triton


def _check_triton_mode(q: torch.Tensor):
    kernels = _triton_module()
    if q.device.type == "cpu" and not kernels.INTERPRET:
        raise RuntimeError(
            "the Triton attention kernel got CPU tensors, but fastclip.ops.attention_triton was imported without "
            "TRITON_INTERPRET=1, so its kernels are compiled for a GPU; set the variable before the first import"
        )
    return kernels


@torch.library.custom_op(
    "fastclip::attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale, Tensor? lengths=None) "
    "-> (Tensor, Tensor)",
)
def _attention_op(q, k, v, key_padding_mask, causal, scale, lengths=None):
    """(out [B, H, Sq, D] in [B, Sq, H, D] memory order, lse [B, H, Sq] fp32, natural log)."""
    return _check_triton_mode(q).forward(q, k, v, key_padding_mask, causal, scale, lengths=lengths)


@torch.library.custom_op(
    "fastclip::attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? key_padding_mask, bool causal, float scale, Tensor? lengths=None) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, causal, scale, lengths=None):
    return _check_triton_mode(q).backward(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, causal, scale, lengths=lengths
    )


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, lengths=None):
    batch, heads, seq_q, head_dim = q.shape
    out = q.new_empty((batch, seq_q, heads, head_dim)).transpose(1, 2)  # same layout as the kernel's
    return out, q.new_empty((batch, heads, seq_q), dtype=torch.float32)


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, causal, scale, lengths=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, causal, scale, lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, lengths)
    ctx.causal, ctx.scale = causal, scale
    # An unused output's gradient arrives as None rather than a materialised zero tensor: the model
    # never uses the log-sum-exp, and a zero [B, H, S] tensor per layer would be allocated and read.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, lengths = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fastclip.attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, lengths
    )
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _packed_forward(qkv, key_padding_mask, causal, scale, lengths):
    return _check_triton_mode(qkv).forward(*split_qkv(qkv), key_padding_mask, causal, scale, lengths=lengths)


def _packed_backward(grad_out, grad_lse, qkv, out, lse, key_padding_mask, causal, scale, lengths):
    """d(qkv) in one tensor: the kernels write dq, dk and dv straight into its slices."""
    dqkv = torch.empty_like(qkv)
    _check_triton_mode(qkv).backward(
        grad_out,
        grad_lse,
        *split_qkv(qkv),
        out,
        lse,
        key_padding_mask,
        causal,
        scale,
        lengths=lengths,
        grads=split_qkv(dqkv),
    )
    return dqkv


@torch.library.custom_op(
    "fastclip::attention_packed",
    mutates_args=(),
    schema="(Tensor qkv, Tensor? key_padding_mask, bool causal, float scale, Tensor? lengths=None) -> (Tensor, Tensor)",
)
def _attention_packed_op(qkv, key_padding_mask, causal, scale, lengths=None):
    """`fastclip::attention` on the slices of qkv [B, S, 3, H, D]: (out, lse) as that op returns them."""
    return _packed_forward(qkv, key_padding_mask, causal, scale, lengths)


@torch.library.custom_op(
    "fastclip::attention_packed_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor? grad_lse, Tensor qkv, Tensor out, Tensor lse, Tensor? key_padding_mask, "
    "bool causal, float scale, Tensor? lengths=None) -> Tensor",
)
def _attention_packed_backward_op(grad_out, grad_lse, qkv, out, lse, key_padding_mask, causal, scale, lengths=None):
    return _packed_backward(grad_out, grad_lse, qkv, out, lse, key_padding_mask, causal, scale, lengths)


@_attention_packed_op.register_fake
def _(qkv, key_padding_mask, causal, scale, lengths=None):
    batch, seq, _, heads, head_dim = qkv.shape
    out = qkv.new_empty((batch, seq, heads, head_dim)).transpose(1, 2)  # the kernel's layout
    return out, qkv.new_empty((batch, heads, seq), dtype=torch.float32)


@_attention_packed_backward_op.register_fake
def _(grad_out, grad_lse, qkv, out, lse, key_padding_mask, causal, scale, lengths=None):
    return torch.empty_like(qkv)


def _setup_packed_context(ctx, inputs, output) -> None:
    qkv, key_padding_mask, causal, scale, lengths = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, key_padding_mask, lengths)
    ctx.causal, ctx.scale = causal, scale
    ctx.set_materialize_grads(False)  # as `_setup_context`: the log-sum-exp's gradient is usually unused


def _packed_backward_formula(ctx, grad_out, grad_lse):
    qkv, out, lse, key_padding_mask, lengths = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dqkv = torch.ops.fastclip.attention_packed_backward(
        grad_out, grad_lse, qkv, out, lse, key_padding_mask, ctx.causal, ctx.scale, lengths
    )
    return dqkv, None, None, None, None


_attention_packed_op.register_autograd(_packed_backward_formula, setup_context=_setup_packed_context)


class _EagerAttention(torch.autograd.Function):
    """The registered op's forward and backward without the custom-op dispatch, for eager mode.

    Each call of a `torch.library.custom_op` passes through the dispatcher, default filling and its own
    autograd wrapper, in both directions: over a quarter of this path's host time per call, which matters where
    the kernels are short (CLIP's text tower, small batches). Both paths run the same kernels with the same
    arguments.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, lengths):
        out, lse = _check_triton_mode(q).forward(q, k, v, key_padding_mask, causal, scale, lengths=lengths)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, lengths)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @once_differentiable  # the kernels' gradients are first-order only
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask, lengths = ctx.saved_tensors
        dq, dk, dv = _check_triton_mode(q).backward(
            grad_out, None, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, lengths=lengths
        )
        return dq, dk, dv, None, None, None, None


class _EagerPackedAttention(torch.autograd.Function):
    """`attention_packed`'s registered op without the custom-op dispatch, for eager mode (as `_EagerAttention`)."""

    @staticmethod
    def forward(ctx, qkv, key_padding_mask, causal, scale, lengths):
        out, lse = _packed_forward(qkv, key_padding_mask, causal, scale, lengths)
        ctx.save_for_backward(qkv, out, lse, key_padding_mask, lengths)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, out, lse, key_padding_mask, lengths = ctx.saved_tensors
        dqkv = _packed_backward(grad_out, None, qkv, out, lse, key_padding_mask, ctx.causal, ctx.scale, lengths)
        return dqkv, None, None, None, None

"""fastclip.ops.attention: the Triton kernels (interpreted on CPU, compiled on a GPU), the SDPA path, the
registered op (opcheck, torch.compile) and the argument errors.

On a machine without a GPU this module sets TRITON_INTERPRET=1 before the kernels are first defined
(fastclip.ops.attention_triton is imported lazily, only when the Triton backend runs), so the kernels
themselves run on CPU tensors. On a GPU machine the variable is left alone and the `cuda` tests run the
compiled kernels instead; the interpreter tests are then skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before anything defines the Triton kernels (see the module docstring)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastclip import backends  # noqa: E402
from fastclip.backends import resolve_attention_backend as resolve_backend  # noqa: E402
from fastclip.backends import triton_available  # noqa: E402
from fastclip.ops.attention import attention  # noqa: E402
from fastclip.ops.attention_reference import attention_lse_reference, attention_reference  # noqa: E402

interpreted = pytest.mark.skipif(
    ON_GPU or not triton_available(),
    reason="Triton interpreter tests run on machines without a GPU (there the cuda tests run the compiled kernels)",
)
CLIP_HEAD_DIMS = (32, 64, 80)


# ------------------------------------------------------------------------------------------------ helpers


def make_inputs(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    masked: bool = False,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random q, k, v (requiring grad) and, if `masked`, a random key padding mask (True = padded)."""
    q, k, v = (
        torch.randn(batch, heads, s, head_dim, device=device).to(dtype).requires_grad_(True)
        for s in (seq_q, seq_k, seq_k)
    )
    mask = torch.rand(batch, seq_k, device=device) < 0.3 if masked else None
    return q, k, v, mask


def forward_backward(fn, q, k, v, grad_out, **kwargs) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of `fn(q, k, v, **kwargs)` for the given output gradient."""
    out = fn(q, k, v, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def reference_results(q, k, v, grad_out, dtype: torch.dtype, **kwargs) -> list[torch.Tensor]:
    """The plain-math results with every input cast to `dtype` (float64 for the truth)."""
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    return forward_backward(attention_reference, q, k, v, grad_out.to(dtype), **kwargs)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


NAMES = ("out", "dq", "dk", "dv")
LOW_PRECISION_EPS = 1e-4  # relative to the tensor's scale: absorbs ties where plain torch happens to be exact


def assert_fp32_close(got: list[torch.Tensor], truth: list[torch.Tensor]) -> None:
    """fp32: absolute error within 1e-5 of the tensor's scale (measured ~1e-6 on these shapes)."""
    for name, g, t in zip(NAMES, got, truth):
        assert torch.isfinite(g).all(), name
        bound = 1e-5 * max(1.0, t.abs().max().item())
        assert max_err(g, t) <= bound, f"{name}: error {max_err(g, t):.3g} > {bound:.3g}"


def assert_low_precision_close(got, truth, same_dtype_torch) -> None:
    """flash-attention's rule: error vs float64 at most 2x that of the plain computation in the same dtype."""
    for name, g, t, p in zip(NAMES, got, truth, same_dtype_torch):
        assert torch.isfinite(g).all(), name
        allowed = 2 * max_err(p, t) + LOW_PRECISION_EPS * max(1.0, t.abs().max().item())
        assert max_err(g, t) <= allowed, (
            f"{name}: error {max_err(g, t):.3g} > {allowed:.3g} (plain torch: {max_err(p, t):.3g})"
        )


def check_against_reference(fn, q, k, v, **kwargs) -> None:
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device).to(q.dtype)
    got = forward_backward(fn, q, k, v, grad_out, **kwargs)
    truth = reference_results(q, k, v, grad_out, torch.float64, **kwargs)
    if q.dtype == torch.float32:
        assert_fp32_close(got, truth)
    else:
        assert_low_precision_close(got, truth, reference_results(q, k, v, grad_out, q.dtype, **kwargs))


def triton_attention(q, k, v, **kwargs):
    return attention(q, k, v, backend="triton", **kwargs)


# ------------------------------------------------------------------------- the Triton kernel, interpreted

INTERPRETED_CASES = [
    pytest.param(
        seq,
        head_dim,
        causal,
        masked,
        dtype,
        id=f"s{seq}-d{head_dim}-{'causal' if causal else 'full'}-{'mask' if masked else 'nomask'}-{str(dtype)[6:]}",
    )
    for seq in (1, 7, 50, 77, 197)
    for head_dim in CLIP_HEAD_DIMS
    for causal in ((False,) if seq == 197 else (False, True))
    for masked in (False, True)
    for dtype in (torch.float32, torch.float16)
]


@interpreted
@pytest.mark.parametrize("seq, head_dim, causal, masked, dtype", INTERPRETED_CASES)
def test_triton_kernel_matches_reference(
    seq: int, head_dim: int, causal: bool, masked: bool, dtype: torch.dtype
) -> None:
    """Forward and dq, dk, dv of the Triton kernel (interpreter) against float64, at CLIP's awkward lengths."""
    batch, heads = (2, 1) if masked else (1, 2)  # two sequences so the mask differs per batch entry
    q, k, v, mask = make_inputs(batch, heads, seq, seq, head_dim, dtype, masked=masked)
    check_against_reference(triton_attention, q, k, v, causal=causal, key_padding_mask=mask)


@interpreted
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("block", [(16, 16), (16, 32), (32, 16), (64, 32)], ids=str)
@pytest.mark.parametrize("seq_q, seq_k, causal", [(77, 77, True), (50, 50, False), (50, 77, True), (77, 50, True)])
def test_triton_kernel_other_tilings(block: tuple[int, int], seq_q: int, seq_k: int, causal: bool, path: str) -> None:
    """The GPU autotuner picks other tiles than the interpreter's: the bounds/causal splits must hold for all,
    on both backward paths."""
    from fastclip.ops import attention_triton

    q, k, v, mask = make_inputs(2, 1, seq_q, seq_k, 64, torch.float32, masked=True)
    scale = 0.125
    grad_out = torch.randn_like(q)
    out, lse = attention_triton.forward(q.detach(), k.detach(), v.detach(), mask, causal, scale, block)
    grads = attention_triton.backward(
        grad_out, None, q.detach(), k.detach(), v.detach(), out, lse, mask, causal, scale, block, path=path
    )
    truth = reference_results(q, k, v, grad_out, torch.float64, causal=causal, key_padding_mask=mask, scale=scale)
    assert_fp32_close([out, *grads], truth)


@interpreted
@pytest.mark.parametrize("seq_q, seq_k, causal", [(1, 50, False), (50, 7, False), (7, 50, True), (50, 7, True)])
def test_triton_cross_attention_lengths(seq_q: int, seq_k: int, causal: bool) -> None:
    """seq_q != seq_k (e.g. attention pooling: one query over all tokens); causal is top-left like SDPA."""
    q, k, v, mask = make_inputs(2, 1, seq_q, seq_k, 32, torch.float32, masked=True)
    check_against_reference(triton_attention, q, k, v, causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreted), "torch"])
def test_rows_without_keys_give_zeros_not_nan(backend: str) -> None:
    """Every key of batch entry 1 padded, and key 0 of entry 0 padded under causal (row 0 sees nothing)."""
    q, k, v, _ = make_inputs(2, 2, 9, 9, 32, torch.float32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 0] = mask[0, 5] = True
    mask[1] = True
    grad_out = torch.randn_like(q)
    out, dq, dk, dv = forward_backward(
        attention, q, k, v, grad_out, causal=True, key_padding_mask=mask, backend=backend
    )
    assert out[1].eq(0).all() and out[0, :, 0].eq(0).all()
    assert dq[1].eq(0).all() and dk[1].eq(0).all() and dv[1].eq(0).all()
    assert dk[0, :, 0].eq(0).all() and dv[0, :, 5].eq(0).all()  # padded keys get no gradient
    truth = reference_results(q, k, v, grad_out, torch.float64, causal=True, key_padding_mask=mask)
    assert_fp32_close([out, dq, dk, dv], truth)
    if backend == "triton":
        lse = torch.ops.fastclip.attention(q.detach(), k.detach(), v.detach(), mask, True, 32**-0.5)[1]
        assert (
            lse[1].eq(float("-inf")).all() and lse[0, :, 0].eq(float("-inf")).all() and lse[0, :, 1:].isfinite().all()
        )


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreted), "torch"])
def test_strided_views_of_a_fused_qkv_projection(backend: str) -> None:
    """q, k, v as views of one [B, S, 3*H*D] projection (no copies), a strided mask and output gradient."""
    batch, seq, heads, head_dim = 2, 50, 2, 32
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, requires_grad=True)
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, S, D), strided
    assert not q.is_contiguous()
    mask = (torch.rand(batch, 2 * seq) < 0.3)[:, ::2]  # a non-contiguous [B, S] view
    grad_out = torch.randn(batch, heads, head_dim, seq).transpose(-1, -2)  # a non-contiguous gradient
    out = attention(q, k, v, key_padding_mask=mask, backend=backend)
    if backend == "triton":  # written as [B, S, H, D]: merging the heads back is a free view
        assert out.transpose(1, 2).is_contiguous()
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    base = qkv.detach().double().requires_grad_(True)
    qr, kr, vr = base.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    ref = attention_reference(qr, kr, vr, key_padding_mask=mask)
    (dref,) = torch.autograd.grad(ref, base, grad_out.double())
    assert_fp32_close([out, dqkv], [ref.detach(), dref])


@interpreted
def test_triton_head_dim_stride_not_one() -> None:
    """The kernel reads every dim through its stride, the head dim included."""
    q, k, v = (torch.randn(1, 2, 20, 64)[..., ::2].requires_grad_(True) for _ in range(3))  # stride_d = 2
    check_against_reference(triton_attention, q, k, v, causal=True)


@interpreted
@pytest.mark.parametrize("seq, causal", [(50, False), (77, True)])
def test_triton_log_sum_exp_and_its_gradient(seq: int, causal: bool) -> None:
    """The op's second output is the natural-log lse; its gradient folds into delta in the backward."""
    q, k, v, mask = make_inputs(2, 1, seq, seq, 64, torch.float32, masked=True)
    scale = 0.1
    out, lse = torch.ops.fastclip.attention(q, k, v, mask, causal, scale)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = [out.detach(), lse.detach(), *torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))]
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kwargs = dict(causal=causal, key_padding_mask=mask, scale=scale)
    ref_out, ref_lse = attention_reference(qr, kr, vr, **kwargs), attention_lse_reference(qr, kr, **kwargs)
    grads = torch.autograd.grad((ref_out, ref_lse), (qr, kr, vr), (grad_out.double(), grad_lse.double()))
    truth = [ref_out.detach(), ref_lse.detach(), *grads]
    finite = truth[1].isfinite()
    assert torch.equal(got[1].isfinite(), finite)
    got[1], truth[1] = got[1][finite], truth[1][finite]
    for name, g, t in zip(("out", "lse", "dq", "dk", "dv"), got, truth):
        assert max_err(g, t) <= 1e-5 * max(1.0, t.abs().max().item()), name


@interpreted
@pytest.mark.parametrize("causal", [False, True])
def test_eager_path_matches_the_registered_op(causal: bool) -> None:
    """Eager calls skip the custom-op dispatch (host time) but must run the very same kernels: outputs and
    gradients are identical to the registered op's, bit for bit, and a double backward is refused."""
    q, k, v, mask = make_inputs(2, 3, 37, 29, 16, torch.float32, masked=True)
    lengths = torch.tensor([29, 11])
    grad = torch.randn(2, 3, 37, 16)
    eager = triton_attention(q, k, v, causal=causal, key_padding_mask=mask, lengths=lengths, scale=0.3)
    registered = torch.ops.fastclip.attention(q, k, v, mask, causal, 0.3, lengths)[0]
    assert torch.equal(eager, registered)
    got = torch.autograd.grad(eager, (q, k, v), grad, create_graph=True)
    want = torch.autograd.grad(registered, (q, k, v), grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name
    with pytest.raises(RuntimeError, match="does not require grad"):
        got[0].sum().backward()


# -------------------------------------------------------------------------------- the two backward paths

# (batch, heads, seq_q, seq_k, head_dim, causal, masked, lengths): S = 1, odd lengths, lengths that are not
# a multiple of the interpreter's 32-row block, causal, a key padding mask, per-sequence lengths (0, inside
# a block, on its edge, full), cross lengths, and batch * heads well over one program.
BACKWARD_CASES = [
    (2, 1, 1, 1, 32, True, False, None),
    (1, 2, 7, 7, 80, False, True, None),
    (3, 5, 37, 37, 16, True, True, None),
    (2, 2, 50, 50, 64, False, False, [50, 17]),
    (4, 1, 77, 77, 32, True, True, [0, 32, 77, 50]),
    (2, 1, 50, 7, 32, True, True, None),
    (2, 1, 7, 50, 32, False, True, None),
]


def dq_rounding_scale(q, k, v, grad_out, *, scale: float, **masks) -> torch.Tensor:
    """First-order size of the roundings in dQ = scale * dS K, dS = P * (dP - delta), in units of eps
    (float64, per element): those of the recomputed scores, log-sum-exp, dP and delta carried through P, and
    of the sum over keys (one per key block, bounded by the key count). Two backwards that recompute dS
    from different tiles and sum it in different orders differ by a small multiple of this."""
    q, k, v, grad_out = (t.detach().double() for t in (q, k, v, grad_out))
    eye = torch.eye(k.shape[-2], dtype=torch.float64).expand(*k.shape[:-2], -1, -1)
    probs = attention_reference(q, k, eye, scale=scale, **masks)  # P itself: softmax(...) @ I
    lse = attention_lse_reference(q, k, scale=scale, **masks).nan_to_num(neginf=0.0)
    out = probs @ v
    grad_probs = grad_out @ v.transpose(-1, -2)
    delta = (grad_out * out).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta)
    k_abs, v_abs = k.abs(), v.abs()
    score_err = scale * q.abs() @ k_abs.transpose(-1, -2) + lse.abs().unsqueeze(-1) + 2  # relative error of each P
    delta_err = (grad_out.abs() * (out.abs() + probs @ v_abs)).sum(-1, keepdim=True)
    product_err = grad_out.abs() @ v_abs.transpose(-1, -2) + delta_err
    grad_scores_err = grad_scores.abs() * score_err + probs * product_err
    return scale * (grad_scores_err + k.shape[-2] * grad_scores.abs()) @ k_abs


def _both_backwards(q, k, v, mask, causal, lengths, scale=0.2):
    """(out, {path: (dq, dk, dv)}, grad_out) of the launchers, with each backward path forced."""
    from fastclip.ops import attention_triton

    q, k, v = (t.detach() for t in (q, k, v))
    grad_out = torch.randn_like(q)
    out, lse = attention_triton.forward(q, k, v, mask, causal, scale, lengths=lengths)
    grads = {
        path: attention_triton.backward(
            grad_out, None, q, k, v, out, lse, mask, causal, scale, lengths=lengths, path=path
        )
        for path in attention_triton.BACKWARD_PATHS
    }
    return out, grads, grad_out


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_fused_and_split_backwards_match_float64(case: tuple, dtype: torch.dtype) -> None:
    """Both backwards against float64 math; dK and dV are the same bits on both (the same tiles in the same
    order); dQ differs by the rounding of its dS, recomputed from other tiles, and its summation order
    (atomics across key blocks vs one loop)."""
    batch, heads, seq_q, seq_k, head_dim, causal, masked, lengths = case
    q, k, v, mask = make_inputs(batch, heads, seq_q, seq_k, head_dim, dtype, masked=masked)
    lengths = None if lengths is None else torch.tensor(lengths)
    out, grads, grad_out = _both_backwards(q, k, v, mask, causal, lengths)
    kwargs = dict(causal=causal, key_padding_mask=mask, lengths=lengths, scale=0.2)
    truth = reference_results(q, k, v, grad_out, torch.float64, **kwargs)
    for got in grads.values():
        if dtype == torch.float32:
            assert_fp32_close([out, *got], truth)
        else:
            assert_low_precision_close([out, *got], truth, reference_results(q, k, v, grad_out, dtype, **kwargs))
    fused, split = grads["fused"], grads["split"]
    assert torch.equal(fused[1], split[1]) and torch.equal(fused[2], split[2])
    if dtype == torch.float32:
        bound = 2 * torch.finfo(dtype).eps * dq_rounding_scale(q, k, v, grad_out, **kwargs)
        assert ((fused[0].double() - split[0].double()).abs() <= bound).all()
    else:  # both round the same fp32 accumulation to fp16 once
        ulp = torch.finfo(dtype).eps * max(1.0, split[0].abs().max().item())
        assert max_err(fused[0], split[0]) <= ulp


@interpreted
def test_fused_backward_writes_into_given_strided_grads() -> None:
    """`grads=` slices of one packed buffer are written in place, on both paths, with the values of fresh ones."""
    from fastclip.ops import attention_triton

    q, k, v, mask = make_inputs(2, 3, 41, 41, 16, torch.float32, masked=True)
    out, grads, grad_out = _both_backwards(q, k, v, mask, True, None)
    for path, want in grads.items():
        packed = torch.full((2, 41, 3, 3, 16), float("nan"))
        views = tuple(t.transpose(1, 2) for t in packed.unbind(2))
        lse = attention_triton.forward(q.detach(), k.detach(), v.detach(), mask, True, 0.2)[1]
        got = attention_triton.backward(
            grad_out, None, q.detach(), k.detach(), v.detach(), out, lse, mask, True, 0.2, grads=views, path=path
        )
        assert all(g is w for g, w in zip(got, views))
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert torch.equal(g, w), (path, name)


@interpreted
def test_preprocess_zeroes_the_fused_dq_sum() -> None:
    """The fused path allocates its fp32 dQ sum uninitialised: the preprocess launch must zero all of it
    (head dim 80: the padding lanes of the 128-wide block must not be written past the row)."""
    from fastclip.ops import attention_triton

    q, k, v, _ = make_inputs(2, 3, 37, 37, 80, torch.float32)
    out, lse = attention_triton.forward(q.detach(), k.detach(), v.detach(), None, False, 0.2)
    storage = torch.full((2 * 37 * 3 * 80 + 1,), float("nan"))
    acc = storage[:-1].view(2, 37, 3, 80).transpose(1, 2)
    attention_triton._delta(torch.randn_like(out), None, out, lse, acc)
    assert acc.eq(0).all() and storage[-1].isnan()


@interpreted
def test_default_backward_is_fused_and_deterministic_mode_takes_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `attention`: "fused" by default (the table is empty until a GPU run fills it), "split" in
    torch's deterministic mode even when the variable asks for "fused"."""
    from fastclip.ops import attention_triton

    taken: list[str] = []
    for path, launcher in (("fused", "_fused_backward"), ("split", "_split_backward")):
        original = getattr(attention_triton, launcher)
        monkeypatch.setattr(attention_triton, launcher, lambda *a, _o=original, _p=path: (taken.append(_p), _o(*a))[1])
    q, k, v, _ = make_inputs(1, 2, 9, 9, 16, torch.float32)
    triton_attention(q, k, v).sum().backward()
    monkeypatch.setenv("FASTCLIP_ATTENTION_BACKWARD", "fused")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        triton_attention(q, k, v).sum().backward()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert taken == ["fused", "split"]


# --------------------------------------------------------------------------------------- the torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize(
    "seq_q, seq_k, causal, masked",
    [
        (1, 1, False, False),
        (7, 7, True, True),
        (50, 50, False, True),
        (77, 77, True, False),
        (77, 77, True, True),
        (197, 197, False, False),
        (1, 50, False, True),
        (50, 7, True, True),
    ],
)
def test_torch_backend_matches_reference(
    seq_q: int, seq_k: int, causal: bool, masked: bool, dtype: torch.dtype
) -> None:
    q, k, v, mask = make_inputs(2, 3, seq_q, seq_k, 64, dtype, masked=masked)
    check_against_reference(
        lambda *a, **kw: attention(*a, backend="torch", **kw), q, k, v, causal=causal, key_padding_mask=mask
    )


def test_torch_backend_gradcheck() -> None:
    q, k, v, mask = make_inputs(2, 1, 5, 6, 8, torch.float64, masked=True)
    mask[0] = True  # include rows without keys
    fn = lambda q, k, v: attention(q, k, v, causal=True, key_padding_mask=mask, scale=0.7, backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_auto_is_the_torch_path_on_cpu() -> None:
    q = torch.randn(1, 1, 4, 64)
    assert resolve_backend("auto", q) == "torch"
    assert resolve_backend("torch", q) == "torch"
    assert resolve_backend("auto", q.to("meta")) == "torch"


@interpreted
def test_triton_is_forcible_on_cpu_under_the_interpreter() -> None:
    assert resolve_backend("triton", torch.randn(1, 1, 4, 64)) == "triton"


# ----------------------------------------------------------------------------- registration and compile


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal, masked", [(False, False), (True, True)])
def test_opcheck(dtype: torch.dtype, causal: bool, masked: bool) -> None:
    q, k, v, mask = make_inputs(2, 1, 13, 13, 32, dtype, masked=masked)
    torch.library.opcheck(torch.ops.fastclip.attention.default, (q, k, v, mask, causal, 0.2))
    with torch.no_grad():
        out, lse = torch.ops.fastclip.attention(q, k, v, mask, causal, 0.2)
    args = (
        torch.randn_like(out),
        torch.randn_like(lse),
        q.detach(),
        k.detach(),
        v.detach(),
        out,
        lse,
        mask,
        causal,
        0.2,
    )
    torch.library.opcheck(torch.ops.fastclip.attention_backward.default, args)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
def test_torch_compile_fullgraph(backend: str) -> None:
    """The call traces into one graph (no breaks) and gives the eager output and gradients."""
    torch._dynamo.reset()
    q, k, v, mask = make_inputs(2, 2, 23, 23, 32, torch.float32, masked=True)

    @torch.compile(fullgraph=True)
    def fn(q, k, v, mask):
        return attention(q, k, v, causal=True, key_padding_mask=mask, backend=backend)

    grad_out = torch.randn_like(q)
    got = forward_backward(fn, q, k, v, grad_out, mask=mask)
    truth = reference_results(q, k, v, grad_out, torch.float64, causal=True, key_padding_mask=mask)
    assert_fp32_close(got, truth)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_kernels_compile_for_hopper() -> None:
    """Compile (not run) the kernels to sm_90 cubins, in a process without the interpreter: catches errors
    that only the compiler sees (types, layouts, shared memory) on a machine without a GPU. bf16 and head dim
    80 are covered here since the interpreter cannot run bf16."""
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastclip.ops import attention_triton as at
        assert not at.INTERPRET
        POINTERS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
        def compile_(kernel, dtype, consts, warps, stages):
            sig = {}
            for name in kernel.arg_names:
                if name in consts: sig[name] = "constexpr"
                elif name == "DQ" and kernel is at._bwd_fused_kernel: sig[name] = "*fp32"  # the atomic sum
                elif name == "DQAcc": sig[name] = "*fp32"
                elif name in POINTERS: sig[name] = "*" + dtype
                elif name == "Mask": sig[name] = "*u8"
                elif name == "Lengths": sig[name] = "*i32"
                elif name in ("Lse", "Delta", "DLse"): sig[name] = "*fp32"
                elif name in ("qk_scale", "scale"): sig[name] = "fp32"
                else: sig[name] = "i32"
            src = ASTSource(kernel, sig, constexprs=consts)
            options = {"num_warps": warps, "num_stages": stages}
            return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        for dtype in ("bf16", "fp16"):
            flags = dict(HEAD_DIM=80, BLOCK_D=64, BLOCK_D1=16, CAUSAL=True, HAS_MASK=True, HAS_LENGTHS=True)
            compile_(at._fwd_kernel, dtype, dict(flags, **at._tiles(64, 64)), 4, 3)
            compile_(at._bwd_dkdv_kernel, dtype, dict(flags, **at._tiles(32, 64)), 4, 2)
            compile_(at._bwd_dq_kernel, dtype, dict(flags, **at._tiles(64, 32)), 4, 3)
            compile_(at._bwd_fused_kernel, dtype, dict(flags, **at._tiles(32, 128)), 8, 2)
        pre = dict(HEAD_DIM=80, BLOCK_D=128, HAS_DLSE=True, ZERO_DQ=True, BLOCK_M=64)
        compile_(at._bwd_preprocess, "bf16", pre, 4, 1)
        print("compiled")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


# --------------------------------------------------------------------------------------------- the errors


def _inputs(**override):
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    args = dict(q=q, k=k, v=v, causal=False, key_padding_mask=None, scale=None, backend="auto")
    args.update(override)
    return args


ERROR_CASES = [
    (dict(q=torch.randn(3, 5, 16)), ValueError, "q must be 4-D"),
    (dict(k=[[1.0]]), TypeError, "k must be a torch.Tensor"),
    (dict(v=torch.ones(2, 3, 5, 16, dtype=torch.int32)), TypeError, "v must be float32"),
    (dict(q=torch.randn(2, 3, 0, 16)), ValueError, "q is empty"),
    (dict(k=torch.randn(2, 3, 5, 16).half()), TypeError, "same dtype"),
    (dict(v=torch.randn(2, 3, 5, 16, device="meta")), ValueError, "same device"),
    (dict(v=torch.randn(2, 3, 6, 16)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(2, 4, 5, 16), v=torch.randn(2, 4, 5, 16)), ValueError, "agree in batch, heads and head_dim"),
    (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "agree in batch, heads and head_dim"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool tensor"),
    (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, r"shape \[batch, seq_k\] = \[2, 5\]"),
    (dict(key_padding_mask=torch.zeros(5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (
        dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta")),
        ValueError,
        "key_padding_mask must be on",
    ),
    (dict(key_padding_mask=[[True]]), TypeError, "key_padding_mask must be a torch.Tensor"),
    (dict(scale=0.0), ValueError, "scale must be positive and finite"),
    (dict(scale=-1.0), ValueError, "scale must be positive and finite"),
    (dict(scale=float("nan")), ValueError, "scale must be positive and finite"),
    (dict(scale=float("inf")), ValueError, "scale must be positive and finite"),
    (dict(scale=True), TypeError, "scale must be a float"),
    (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a float"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (
        dict(
            backend="triton",
            q=torch.randn(2, 3, 5, 16, device="meta"),
            k=torch.randn(2, 3, 5, 16, device="meta"),
            v=torch.randn(2, 3, 5, 16, device="meta"),
        ),
        RuntimeError,
        "backend='triton' cannot run here",
    ),
]


@pytest.mark.parametrize("override, error, match", ERROR_CASES, ids=[c[2][:40] for c in ERROR_CASES])
def test_argument_errors(override: dict, error: type, match: str) -> None:
    args = _inputs(**override)
    with pytest.raises(error, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@interpreted
def test_triton_input_limits() -> None:
    from fastclip.ops import attention_triton

    assert attention_triton.MAX_HEAD_DIM == backends.TRITON_MAX_HEAD_DIM
    q = torch.randn(1, 1, 4, 160)
    with pytest.raises(ValueError, match="head_dim <= 128"):
        attention(q, q, q, backend="triton")
    assert attention(q, q, q).shape == q.shape  # "auto" takes the torch path for what the kernel lacks
    q64 = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="supports float32, float16, bfloat16 inputs on cpu, got torch.float64"):
        attention(q64, q64, q64, backend="triton")


def test_forcing_triton_without_it_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 1, 4, 16)
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton does not import"):
        attention(q, q, q, backend="triton")
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        attention(q, q, q, backend="triton")


# ------------------------------------------------------------------------------------ GPU (pytest -m cuda)

CUDA_DTYPES = (torch.bfloat16, torch.float16)  # fp32 goes to SDPA on a GPU (test_cuda_fp32_goes_to_sdpa)
CLIP_SHAPES = [(50, False), (77, True), (197, False), (257, False), (577, False)]  # (seq, causal): ViT-B/32 .. @336


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (32, 64, 80, 128))
@pytest.mark.parametrize("seq, causal", CLIP_SHAPES)
@pytest.mark.parametrize("masked", (False, True), ids=("nomask", "mask"))
def test_cuda_clip_grid(seq: int, causal: bool, head_dim: int, dtype: torch.dtype, masked: bool) -> None:
    """The compiled kernel on the CLIP grid, one fixed tiling (the autotuned path is tested below)."""
    from fastclip.ops import attention_triton

    q, k, v, mask = make_inputs(2, 3, seq, seq, head_dim, dtype, masked=masked, device="cuda")
    scale = head_dim**-0.5

    def fixed_tiles(q, k, v, causal, key_padding_mask):
        return _FixedTiles.apply(q, k, v, causal, key_padding_mask, scale, attention_triton)

    check_against_reference(fixed_tiles, q, k, v, causal=causal, key_padding_mask=mask)


class _FixedTiles(torch.autograd.Function):
    """The launchers with block=(64, 64): one compile per specialisation instead of an autotune sweep."""

    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale, kernels):
        out, lse = kernels.forward(q, k, v, mask, causal, scale, (64, 64))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (mask, causal, scale, kernels)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, causal, scale, kernels = ctx.args
        dq, dk, dv = kernels.backward(grad_out, None, q, k, v, out, lse, mask, causal, scale, (64, 64))
        return dq, dk, dv, None, None, None, None


@pytest.mark.cuda
@pytest.mark.parametrize(
    "batch, heads, seq, head_dim, causal, masked, dtype",
    [
        (8, 12, 197, 64, False, False, torch.bfloat16),  # ViT-B/16
        (8, 8, 77, 64, True, True, torch.bfloat16),  # text encoder with padding
        (4, 16, 257, 80, False, False, torch.float16),  # ViT-H/14
        (2, 16, 577, 64, False, False, torch.bfloat16),  # ViT-L/14@336
        (3, 2, 50, 128, False, True, torch.bfloat16),
    ],
)
def test_cuda_autotuned_public_path(batch, heads, seq, head_dim, causal, masked, dtype) -> None:
    """`attention` with backend="auto" picks the (autotuned) Triton kernel on CUDA and matches the reference."""
    q, k, v, mask = make_inputs(batch, heads, seq, seq, head_dim, dtype, masked=masked, device="cuda")
    assert resolve_backend("auto", q) == "triton"
    check_against_reference(attention, q, k, v, causal=causal, key_padding_mask=mask)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile() -> None:
    q, k, v, mask = make_inputs(2, 2, 77, 77, 64, torch.bfloat16, masked=True, device="cuda")
    torch.library.opcheck(torch.ops.fastclip.attention.default, (q, k, v, mask, True, 0.125))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: attention(q, k, v, causal=True, key_padding_mask=mask), fullgraph=True)
    grad_out = torch.randn_like(q)
    got = forward_backward(fn, q, k, v, grad_out)
    truth = reference_results(q, k, v, grad_out, torch.float64, causal=True, key_padding_mask=mask)
    assert_low_precision_close(
        got, truth, reference_results(q, k, v, grad_out, torch.bfloat16, causal=True, key_padding_mask=mask)
    )


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch, heads, seq, head_dim, causal, masked",
    [
        (8, 12, 197, 64, False, False),
        (8, 8, 77, 64, True, True),
        (4, 16, 257, 80, False, False),
        (3, 2, 50, 128, False, True),
    ],
)
def test_cuda_both_backward_paths(
    path: str, dtype: torch.dtype, batch, heads, seq, head_dim, causal, masked, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each backward path, forced by FASTCLIP_ATTENTION_BACKWARD, autotuned, against float64."""
    monkeypatch.setenv("FASTCLIP_ATTENTION_BACKWARD", path)
    q, k, v, mask = make_inputs(batch, heads, seq, seq, head_dim, dtype, masked=masked, device="cuda")
    check_against_reference(triton_attention, q, k, v, causal=causal, key_padding_mask=mask)


@pytest.mark.cuda
def test_cuda_deterministic_mode_repeats_bit_for_bit() -> None:
    """Deterministic mode takes the split backward: the same inputs give the same gradient bits every run."""
    q, k, v, mask = make_inputs(4, 8, 197, 64, torch.bfloat16, masked=True, device="cuda")
    grad_out = torch.randn_like(q)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [forward_backward(triton_attention, q, k, v, grad_out, key_padding_mask=mask) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))

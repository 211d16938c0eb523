"""`attention_packed`: attention on a fused qkv projection [B, S, 3, H, D], whose Triton backward writes
d(qkv) as one tensor (dq, dk, dv straight into its slices) instead of three tensors autograd stacks.

Held to float64 math and, bit for bit, to `attention` on the same views (the same kernels run); its backward
is checked to launch no stack or cat, its registered ops with opcheck and torch.compile, and the model's
attention block to use it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything defines the Triton kernels (see test_attention.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastclip.backends import triton_available  # noqa: E402
from fastclip.ops.attention import attention, attention_packed, split_qkv  # noqa: E402
from fastclip.ops.attention_reference import attention_reference  # noqa: E402

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_available(), reason="the Triton interpreter runs where there is no GPU"
)
BACKENDS = [pytest.param("triton", marks=interpreted), "torch"]


def packed_inputs(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A packed leaf [B, S, 3, H, D] that requires grad, as the model's projection makes it."""
    return torch.randn(batch, seq, 3, heads, head_dim).to(dtype).requires_grad_(True)


def out_and_grad(fn, qkv: torch.Tensor, grad_out: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out = fn(qkv, **kwargs)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out.detach(), grad


def unpacked(qkv: torch.Tensor, **kwargs) -> torch.Tensor:
    """`attention` on the views: autograd stacks dq, dk, dv back into d(qkv)."""
    return attention(*split_qkv(qkv), **kwargs)


def reference(qkv: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.pop("backend", None)
    return attention_reference(*split_qkv(qkv), **kwargs)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


# (seq, heads, causal, masked, lengths): S = 1, odd, not a multiple of the 32-row block, causal, padding mask,
# per-sequence lengths, and batch * heads well over one program.
CASES = [
    (1, 2, True, False, None),
    (7, 3, False, True, None),
    (50, 2, True, False, [50, 17, 0]),
    (77, 1, True, True, [77, 31, 64]),
    (37, 5, False, False, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_packed_matches_float64_and_the_unpacked_call(backend: str, dtype: torch.dtype, case: tuple) -> None:
    """Output and d(qkv) within the tolerances of test_attention.py, and the same bits as `attention` on the
    views (the same kernels with the same arguments, only the gradient's destination differs)."""
    seq, heads, causal, masked, lengths = case
    batch = 3
    qkv = packed_inputs(batch, seq, heads, 32, dtype)
    grad_out = torch.randn(batch, heads, seq, 32).to(dtype)
    mask = torch.rand(batch, seq) < 0.3 if masked else None
    kwargs = dict(
        causal=causal, key_padding_mask=mask, lengths=None if lengths is None else torch.tensor(lengths), scale=0.3
    )
    got = out_and_grad(attention_packed, qkv, grad_out, backend=backend, **kwargs)
    want = out_and_grad(unpacked, qkv, grad_out, backend=backend, **kwargs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    leaf = qkv.detach().double().requires_grad_(True)
    truth = out_and_grad(reference, leaf, grad_out.double(), **kwargs)
    same_dtype = out_and_grad(reference, qkv.detach().requires_grad_(True), grad_out, **kwargs)
    for name, g, t, p in zip(("out", "d(qkv)"), got, truth, same_dtype):
        scale = max(1.0, t.abs().max().item())
        allowed = 1e-5 * scale if dtype == torch.float32 else 2 * max_err(p, t) + 1e-4 * scale
        assert max_err(g, t) <= allowed, f"{name}: error {max_err(g, t):.3g} > {allowed:.3g}"


def _backward_ops(fn, qkv: torch.Tensor, **kwargs) -> set[str]:
    """The aten ops that run during the backward of `fn(qkv)`."""
    out = fn(qkv, **kwargs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(torch.ones_like(out))
    return {event.name for event in prof.events()}


@interpreted
def test_packed_backward_makes_no_stack_or_cat() -> None:
    """The gradient flows from the op straight to the leaf (no unbind node), and no stack or cat runs; the
    unpacked call, profiled the same way, does stack (so the check can see one)."""
    qkv = packed_inputs(2, 19, 2, 16, torch.float32)
    out = attention_packed(qkv, causal=True, backend="triton")
    (leaf_node, _), *_ = out.grad_fn.next_functions
    assert type(leaf_node).__name__ == "AccumulateGrad" and leaf_node.variable is qkv
    copies = {"aten::stack", "aten::cat"}
    assert not _backward_ops(attention_packed, qkv, causal=True, backend="triton") & copies
    assert _backward_ops(unpacked, qkv, causal=True, backend="triton") & copies


@interpreted
@pytest.mark.parametrize("causal, masked, lengths", [(False, False, None), (True, True, [9, 4])])
def test_packed_opcheck(causal: bool, masked: bool, lengths: list[int] | None) -> None:
    qkv = packed_inputs(2, 13, 2, 16, torch.float32)
    mask = torch.rand(2, 13) < 0.3 if masked else None
    lengths_t = None if lengths is None else torch.tensor(lengths)
    torch.library.opcheck(torch.ops.fastclip.attention_packed.default, (qkv, mask, causal, 0.25, lengths_t))
    with torch.no_grad():
        out, lse = torch.ops.fastclip.attention_packed(qkv, mask, causal, 0.25, lengths_t)
    args = (torch.randn_like(out), torch.randn_like(lse), qkv.detach(), out, lse, mask, causal, 0.25, lengths_t)
    torch.library.opcheck(torch.ops.fastclip.attention_packed_backward.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_torch_compile_fullgraph(backend: str) -> None:
    """One graph without breaks (the registered op on Triton), with the eager output and gradient."""
    torch._dynamo.reset()
    qkv = packed_inputs(2, 23, 2, 16, torch.float32)
    mask = torch.rand(2, 23) < 0.3

    @torch.compile(fullgraph=True)
    def fn(qkv):
        return attention_packed(qkv, causal=True, key_padding_mask=mask, backend=backend)

    grad_out = torch.randn(2, 2, 23, 16)
    got = out_and_grad(fn, qkv, grad_out)
    want = out_and_grad(attention_packed, qkv, grad_out, causal=True, key_padding_mask=mask, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_attends_through_the_packed_call(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MultiheadSelfAttention hands its (B, S, 3, H, Dh) projection to `attention_packed` on every backend,
    and its output and parameter gradients equal those of the unpacked call."""
    from fastclip.model import transformer

    torch.manual_seed(0)
    block = transformer.MultiheadSelfAttention(32, 2, causal=True, backend=backend)
    x = torch.randn(3, 11, 32)
    lengths = torch.tensor([11, 4, 7])
    calls: list[tuple[int, ...]] = []

    def spy(qkv, **kwargs):
        calls.append(tuple(qkv.shape))
        return attention_packed(qkv, **kwargs)

    def run() -> list[torch.Tensor]:
        block.zero_grad()
        out = block(x, lengths=lengths)
        out.pow(2).sum().backward()
        return [out.detach(), *(p.grad.clone() for p in block.parameters())]

    monkeypatch.setattr(transformer, "attention_packed", spy)
    packed = run()
    assert calls == [(3, 11, 3, 2, 16)]
    monkeypatch.setattr(transformer, "attention_packed", unpacked)
    for got, want in zip(packed, run()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


ERROR_CASES = [
    (torch.randn(2, 5, 48), ValueError, r"qkv must be 5-D \[batch, seq, 3, heads, head_dim\]"),
    (torch.randn(2, 5, 4, 2, 8), ValueError, "q, k, v on dim 2"),
    (torch.ones(2, 5, 3, 2, 8, dtype=torch.int32), TypeError, "qkv must be float32"),
    ([[1.0]], TypeError, "qkv must be a torch.Tensor"),
]


@pytest.mark.parametrize("qkv, error, match", ERROR_CASES, ids=[c[2][:30] for c in ERROR_CASES])
def test_packed_argument_errors(qkv, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        attention_packed(qkv)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[batch, seq_k\] = \[2, 5\]"):
        attention_packed(torch.randn(2, 5, 3, 2, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "seq, heads, head_dim, causal", [(197, 12, 64, False), (77, 8, 64, True), (257, 16, 80, False)]
)
def test_cuda_packed_matches_the_unpacked_call(
    dtype: torch.dtype, path: str, seq: int, heads: int, head_dim: int, causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled kernels: the same output bits as `attention` on the views, and d(qkv) the same bits on the
    split path (atomics reorder dQ's sums on the fused one: there within a few bf16/fp16 ulps)."""
    monkeypatch.setenv("FASTCLIP_ATTENTION_BACKWARD", path)
    qkv = packed_inputs(4, seq, heads, head_dim, dtype).detach().cuda().requires_grad_(True)
    grad_out = torch.randn(4, heads, seq, head_dim, device="cuda").to(dtype)
    lengths = torch.tensor([seq, seq // 2, 1, seq - 3], device="cuda") if causal else None
    kwargs = dict(causal=causal, lengths=lengths, backend="triton")
    got = out_and_grad(attention_packed, qkv, grad_out, **kwargs)
    want = out_and_grad(unpacked, qkv, grad_out, **kwargs)
    assert torch.equal(got[0], want[0])
    if path == "split":
        assert torch.equal(got[1], want[1])
    else:
        torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=2e-2)

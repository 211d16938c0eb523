"""Per-sequence lengths in `fastclip.ops.attention` and the text tower's ragged attention.

`lengths[b]` ends sequence b: its keys past the end are ignored and its query rows there return 0. The
Triton kernels (interpreted on CPU) and the SDPA path are checked against float64 plain math with the
same rule, forward and backward, at lengths 0, 1, inside a block, on a block edge, the full length and
beyond it. The text tower passes end-of-text + 1 as lengths: its features and every parameter gradient
must equal those of the same model attending over all positions.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything defines the Triton kernels (see test_attention.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastclip.backends import triton_available  # noqa: E402
from fastclip.ops.attention import attention  # noqa: E402
from fastclip.ops.attention_reference import attention_reference  # noqa: E402

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_available(), reason="the Triton interpreter runs where there is no GPU"
)
BACKENDS = [pytest.param("triton", marks=interpreted), "torch"]


def fused_qkv(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """The packed leaf and its q, k, v views [B, H, S, D], as the model makes them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(dtype).requires_grad_(True)
    return qkv, [t.transpose(1, 2) for t in qkv.unbind(2)]


def run(fn, qkv, views, grad_out, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out = fn(*views, **kwargs)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out.detach(), grad


def reference(qkv, grad_out, dtype: torch.dtype = torch.float64, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain math on the same inputs cast to `dtype` (float64 for the truth)."""
    leaf = qkv.detach().to(dtype).requires_grad_(True)
    return run(attention_reference, leaf, [t.transpose(1, 2) for t in leaf.unbind(2)], grad_out.to(dtype), **kwargs)


def assert_close_to_float64(got, qkv, grad_out, **kwargs) -> None:
    """fp32 within 1e-5 of the scale; fp16/bf16 within twice the error of plain math in the same dtype (plus
    1e-4 of the scale), the rule of test_attention.py."""
    truth = reference(qkv, grad_out, **kwargs)
    same_dtype = reference(qkv, grad_out, qkv.dtype, **kwargs) if qkv.dtype != torch.float32 else None
    for name, index in (("out", 0), ("d(qkv)", 1)):
        error = (got[index].double() - truth[index]).abs().max().item()
        scale = max(1.0, truth[index].abs().max().item())
        if same_dtype is None:
            allowed = 1e-5 * scale
        else:
            allowed = 2 * (same_dtype[index].double() - truth[index]).abs().max().item() + 1e-4 * scale
        assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g}"


CASES = [  # (seq, lengths, causal, masked)
    (37, [5, 37, 0], True, False),
    (37, [1, 32, 36], False, False),
    (77, [18, 64, 77, 100], True, True),  # a block edge, the full length and past it
    (50, [-3, 17], False, True),  # a negative length hides the whole sequence
    (1, [1, 0], True, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("seq, lengths, causal, masked", CASES, ids=[f"s{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_lengths_match_float64(
    backend: str, dtype: torch.dtype, seq: int, lengths: list[int], causal: bool, masked: bool
) -> None:
    lengths_t = torch.tensor(lengths)
    batch = len(lengths)
    qkv, views = fused_qkv(batch, seq, 2, 32, dtype, seed=seq + batch)
    mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(1)) < 0.2 if masked else None
    grad_out = torch.randn(batch, 2, seq, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    kwargs = dict(causal=causal, key_padding_mask=mask, lengths=lengths_t)
    out, grad = run(attention, qkv, views, grad_out, backend=backend, **kwargs)
    assert_close_to_float64((out, grad), qkv, grad_out, **kwargs)
    for b, end in enumerate(lengths):  # past the end: exactly zero output, no gradient to q, k or v
        assert not out[b, :, max(end, 0) :].any()
        assert not grad[b, max(end, 0) :].any()


@interpreted
@pytest.mark.parametrize("block", [(16, 16), (16, 32), (32, 16), (64, 32)], ids=str)
def test_lengths_other_tilings(block: tuple[int, int]) -> None:
    """The GPU autotuner picks other tiles: lengths inside, on and past every block boundary."""
    from fastclip.ops import attention_triton

    lengths = torch.tensor([0, 1, 15, 16, 17, 32, 33, 49, 77])
    qkv, (q, k, v) = fused_qkv(len(lengths), 77, 1, 16, torch.float32, seed=3)
    grad_out = torch.randn(len(lengths), 1, 77, 16)
    for causal in (True, False):
        q_, k_, v_ = q.detach(), k.detach(), v.detach()
        out, lse = attention_triton.forward(q_, k_, v_, None, causal, 0.25, block, lengths=lengths)
        grads = attention_triton.backward(
            grad_out, None, q_, k_, v_, out, lse, None, causal, 0.25, block, lengths=lengths
        )
        leaf = qkv.detach().double().requires_grad_(True)
        views = [t.transpose(1, 2) for t in leaf.unbind(2)]
        want = attention_reference(*views, causal=causal, scale=0.25, lengths=lengths)
        want_grads = torch.autograd.grad(want, views, grad_out.double())
        for got, truth in zip((out, *grads), (want, *want_grads)):
            torch.testing.assert_close(got.double(), truth.detach(), atol=1e-5, rtol=1e-5)


def test_lengths_argument_errors() -> None:
    q = k = v = torch.randn(2, 1, 5, 8)
    with pytest.raises(TypeError, match="lengths must be an int32 or int64"):
        attention(q, k, v, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths must have shape \[batch\] = \[2\]"):
        attention(q, k, v, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="lengths must be a torch.Tensor or None"):
        attention(q, k, v, lengths=[1, 2])
    with pytest.raises(ValueError, match="lengths must be on the device of q"):
        attention(q, k, v, lengths=torch.tensor([1, 2], device="meta"))


# ------------------------------------------------------------------------------------ the text tower


def _text_batch(model, batch: int, seed: int) -> torch.Tensor:
    """Token rows as the tokenizer makes them: start, random ids, end-of-text, zeros; lengths 2..context."""
    gen = torch.Generator().manual_seed(seed)
    context = model.context_length
    text = torch.zeros(batch, context, dtype=torch.long)
    for row, length in enumerate(torch.randint(2, context + 1, (batch,), generator=gen).tolist()):
        text[row, 0] = 49406
        text[row, 1 : length - 1] = torch.randint(1, 49406, (length - 2,), generator=gen)
        text[row, length - 1] = 49407
    return text


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_tower_ragged_equals_full_attention(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Features and every parameter gradient equal those of the model attending over all positions."""
    from fastclip.model import transformer
    from fastclip.model.factory import create_model

    torch.manual_seed(0)
    model = create_model("tiny-ViT", attn_backend=backend)
    text = _text_batch(model, 6, seed=4)

    def features_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        features = model.encode_text(text, normalize=False)
        features.pow(2).sum().backward()
        return features.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ragged = features_and_grads()
    full_attention = transformer.attention_packed
    monkeypatch.setattr(transformer, "attention_packed", lambda *a, lengths=None, **kw: full_attention(*a, **kw))
    full = features_and_grads()
    torch.testing.assert_close(ragged[0], full[0], atol=1e-5, rtol=1e-5)
    assert len(ragged[1]) == len(full[1]) > 0
    for got, want in zip(ragged[1], full[1]):
        # fp32 rounding: the two paths sum the same terms in different tiles (the ragged end in 16-wide ones)
        atol = 1e-5 + 1e-6 * want.abs().max().item()
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seq, lengths, causal, masked", CASES, ids=[f"s{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_cuda_lengths_match_float64(
    dtype: torch.dtype, seq: int, lengths: list[int], causal: bool, masked: bool
) -> None:
    """The compiled kernels (autotuned tiles) against float64, as the interpreted test above."""
    lengths_t = torch.tensor(lengths, device="cuda")
    batch = len(lengths)
    qkv, _ = fused_qkv(batch, seq, 2, 64, dtype, seed=seq + batch)
    qkv = qkv.detach().cuda().requires_grad_(True)
    views = [t.transpose(1, 2) for t in qkv.unbind(2)]
    mask = (torch.rand(batch, seq, generator=torch.Generator().manual_seed(1)) < 0.2).cuda() if masked else None
    grad_out = torch.randn(batch, 2, seq, 64, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
    kwargs = dict(causal=causal, key_padding_mask=mask, lengths=lengths_t)
    out, grad = run(attention, qkv, views, grad_out, backend="triton", **kwargs)
    assert_close_to_float64((out, grad), qkv, grad_out, **kwargs)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_packed_text_tower_equals_dense(checkpointing: bool) -> None:
    """The packed tower (only each caption's tokens up to its end-of-text run) gives the features and
    every parameter gradient of the dense one (all positions of the [B, S] batch), in float64."""
    from fastclip.model.factory import create_model

    torch.manual_seed(1)
    model = create_model("tiny-ViT", attn_backend="torch", dtype=torch.float64)
    model.set_grad_checkpointing(checkpointing)
    text = _text_batch(model, 7, seed=5)
    text[3] = 0  # an empty row: all padding, its "end-of-text" is position 0
    text[5, 0], text[5, 1:] = 49407, 0  # a caption that is its end-of-text token alone

    def features_and_grads(trim: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        features = model.encode_text(text, normalize=False, trim=trim)
        (features * torch.linspace(-1, 1, features.shape[-1], dtype=features.dtype)).sum().backward()
        return features.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed, dense = features_and_grads(trim=True), features_and_grads(trim=False)
    torch.testing.assert_close(packed[0], dense[0], rtol=0, atol=1e-12)
    assert len(packed[1]) == len(dense[1]) > 0
    for got, want in zip(packed[1], dense[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

"""The O(N * D) terms of the contrastive loss (`_assemble_loss` through fastclip.ops.linear_terms): exact
against a dense float64 reference across chunk boundaries, traceable, and in bounded extra memory.

Memory is measured with a dispatch mode that counts the bytes of every tensor storage an operation
creates while it is alive (freed storages are subtracted through a finalizer): a tracking allocator
that works on a CPU, where peak-memory counters do not exist.
"""

from __future__ import annotations

import pytest
import torch
from loss_helpers import LiveBytes, features

from fastclip.functional import contrastive_loss_from_lse
from fastclip.ops import linear_terms
from fastclip.ops.reference import _soft_targets, contrastive_lse_reference


def test_live_bytes_counts_allocations_and_frees() -> None:
    with LiveBytes() as memory:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        a.view(10, 100).add_(1)  # a view and an in-place op: nothing new
        del a
    assert (memory.live, memory.peak) == (4000, 8000)
    del b


def share_reference(image, text, scale, row_lse, col_lse, offset, labels, weight, smoothing) -> torch.Tensor:
    """The rank share of the loss from dense float64 logits and targets (no chunks, no custom autograd)."""
    n, num_pairs = image.shape[0], text.shape[0]
    logits = scale * (image @ text.T)  # (n, N)
    targets = _soft_targets(labels, num_pairs, image.device, image.dtype)[offset : offset + n]
    positives = (targets * logits).sum()
    total = logits.sum()
    lse_terms = weight * row_lse.sum() + (1 - weight) * col_lse[offset : offset + n].sum()
    return (lse_terms - (1 - smoothing) * positives - (smoothing / num_pairs) * total) / num_pairs


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("with_labels", [False, True], ids=["pairs", "labels"])
@pytest.mark.parametrize("offset, rows", [(0, 61), (0, 20), (20, 1), (21, 40)])
def test_chunked_terms_match_float64_reference(
    monkeypatch, dtype: torch.dtype, with_labels: bool, offset: int, rows: int
) -> None:
    """A rank's share (or the whole batch) over uneven 7-row chunks: loss and gradients equal the dense
    float64 ones.

    The log-sum-exps are given (exact, as fp32 leaves), so only the chunked terms are under test: the loss
    and the logit_scale gradient to fp32 accumulation, each feature gradient entry to one rounding to
    its dtype.
    """
    num_pairs, dim = 61, 24
    monkeypatch.setattr(linear_terms, "CHUNK_BYTES", 7 * dim * 4)  # 7 fp32 rows per chunk
    image, text = features(rows, dim, dtype), features(num_pairs, dim, dtype)
    scale = torch.tensor(14.0, requires_grad=True)
    labels = torch.randint(0, 9, (num_pairs,)) if with_labels else None
    weight, smoothing = 0.3, 0.1
    exact = [t.detach().double().requires_grad_() for t in (image, text, scale)]
    row_lse, col_lse = (x.detach() for x in contrastive_lse_reference(*exact))

    got = contrastive_loss_from_lse(
        image,
        text,
        scale,
        row_lse.float(),
        col_lse.float(),
        offset=offset,
        labels=labels,
        weight=weight,
        label_smoothing=smoothing,
    )
    want = share_reference(*exact, row_lse, col_lse, offset, labels, weight, smoothing)
    got_grads = torch.autograd.grad(got, (image, text, scale))
    want_grads = torch.autograd.grad(want, exact)

    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale.item())
    torch.testing.assert_close(got_grads[2].double(), want_grads[2], rtol=1e-5, atol=1e-5)
    for got_grad, want_grad in zip(got_grads[:2], want_grads[:2]):
        assert got_grad.dtype == dtype
        # fp32 accumulation on near-cancelling entries; half the spacing of fp16's subnormals
        info = torch.finfo(dtype)
        tiny = 1e-6 * want_grad.abs().max().item() + info.smallest_normal * info.eps / 2
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=UNIT_ROUNDOFF[dtype] * 1.01 + 1e-6, atol=tiny)


def test_chunked_terms_compile_to_one_graph(monkeypatch) -> None:
    """Several chunks, labels and an offset trace with fullgraph=True and give the eager results."""
    torch._dynamo.reset()
    monkeypatch.setattr(linear_terms, "CHUNK_BYTES", 5 * 16 * 4)
    image, text = features(12, 16, torch.float32), features(30, 16, torch.float32)
    scale, labels = torch.tensor(9.0, requires_grad=True), torch.randint(0, 4, (30,))
    row_lse, col_lse = torch.randn(12, requires_grad=True), torch.randn(30, requires_grad=True)

    def share(i, t, s, r, c):
        return contrastive_loss_from_lse(i, t, s, r, c, offset=11, labels=labels, label_smoothing=0.1)

    inputs = (image, text, scale, row_lse, col_lse)
    eager = torch.autograd.grad(share(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(share, fullgraph=True)(*inputs), inputs)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_extra_memory_is_a_small_fraction_of_one_fp32_copy(monkeypatch, dtype: torch.dtype) -> None:
    """16-bit features of N = 2^17 rows: forward and backward need a few chunks beyond their inputs and
    outputs, where whole fp32 copies (2 for the features, 1 for their product, all kept for backward)
    took 3 x 64 MiB here, and 6 GiB at N = 2^20, D = 512 on a GPU.

    The chunk budget is scaled down with N (256 KiB for 32 MiB), to keep the run short on a CPU.
    """
    num_pairs, dim, chunk = 1 << 17, 128, 1 << 18
    monkeypatch.setattr(linear_terms, "CHUNK_BYTES", chunk)
    fp32_copy = num_pairs * dim * 4  # one [N, D] fp32 tensor: 64 MiB
    image = torch.randn(num_pairs, dim).to(dtype).requires_grad_()
    text = torch.randn(num_pairs, dim).to(dtype).requires_grad_()
    row_lse, col_lse = torch.randn(num_pairs, requires_grad=True), torch.randn(num_pairs, requires_grad=True)
    scale = torch.tensor(14.0, requires_grad=True)

    with LiveBytes() as forward:
        loss = contrastive_loss_from_lse(image, text, scale, row_lse, col_lse, label_smoothing=0.1)
    with LiveBytes() as backward:
        loss.backward()
    backward_extra = backward.peak - sum(t.grad.nbytes for t in (image, text, row_lse, col_lse, scale))
    mib = 2**20
    assert forward.peak <= 4 * chunk < fp32_copy / 16, f"forward peak {forward.peak / mib:.2f} MiB"
    # What the forward leaves alive for backward: a few [D] sums, nothing [N, D].
    assert forward.live < 64 * dim * 4, f"saved for backward: {forward.live} bytes"
    assert backward_extra <= 8 * chunk < fp32_copy / 8, f"backward peak beyond gradients {backward_extra / mib:.2f} MiB"

"""`fastclip.contrastive_loss` on every backend against the float64 reference: loss and every gradient.

Each test runs on the CPU backends ("torch", "cpp") and, marked `cuda`, on the CUDA kernel and the
PyTorch path on a GPU (skipped where there is none).
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from loss_helpers import (
    CLIP_SCALE,
    LOSS_TARGETS,
    assert_matches,
    chunked_reference,
    features,
    loss_and_grads,
    naive_same_dtype,
    pair,
    reference,
    scale_tensor,
)

import fastclip
from fastclip.functional import contrastive_loss_from_lse, contrastive_lse
from fastclip.ops.reference import contrastive_lse_reference

TARGETS = LOSS_TARGETS
FLOAT64_TARGETS = [t for t in TARGETS if t.id != "cuda"]  # the CUDA kernel takes fp32/bf16/fp16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = (0.0, 0.3, 0.5, 1.0)
SMOOTHINGS = (0.0, 0.1)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 17, 64, 512])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 257, 1000])
def test_loss_and_grads_match_reference(n: int, dim: int, dtype: torch.dtype, target: tuple[str, str]) -> None:
    backend, device = target
    image, text, scale = pair(n, dim, dtype, device)
    for weight, smoothing in itertools.product(WEIGHTS, SMOOTHINGS):
        options = dict(weight=weight, label_smoothing=smoothing)
        got = loss_and_grads(partial(fastclip.contrastive_loss, backend=backend, **options), image, text, scale)
        assert got.loss.dtype == torch.float32 and got.loss.dim() == 0
        assert got.grads[0].dtype == dtype and got.grads[1].dtype == dtype
        naive = naive_same_dtype(image, text, scale, **options) if dtype != torch.float32 else None
        assert_matches(got, reference(image, text, scale, **options), dtype, naive)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_float64_is_exact(target: tuple[str, str]) -> None:
    backend, device = target
    image, text, scale = pair(300, 33, torch.float64, device, scale=7.3)
    options = dict(weight=0.3, label_smoothing=0.1)
    got = loss_and_grads(partial(fastclip.contrastive_loss, backend=backend, **options), image, text, scale)
    assert got.loss.dtype == torch.float64
    assert_matches(got, reference(image, text, scale, **options), torch.float64)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_high_scale_and_unnormalized_features(target: tuple[str, str], dtype: torch.dtype) -> None:
    """logit_scale 100 (CLIP's clamp) with low-precision inputs, and features that are not unit vectors."""
    backend, device = target
    for normalize, value in ((True, 100.0), (False, 3.0)):
        image, text = (features(130, 48, dtype, device, normalize=normalize) for _ in range(2))
        scale = scale_tensor(value, device=device)
        got = loss_and_grads(partial(fastclip.contrastive_loss, backend=backend), image, text, scale)
        naive = naive_same_dtype(image, text, scale) if dtype != torch.float32 else None
        assert_matches(got, reference(image, text, scale), dtype, naive)


@pytest.mark.parametrize("target", TARGETS)
def test_identical_rows_tie(target: tuple[str, str]) -> None:
    """All pairs identical: every logit ties, so each cross-entropy is log N with zero gradient for the features."""
    backend, device = target
    row = features(1, 16, torch.float32, device=device).detach()
    image = row.expand(9, 16).clone().requires_grad_()
    text = row.expand(9, 16).clone().requires_grad_()
    scale = scale_tensor(CLIP_SCALE, device=device)
    got = loss_and_grads(partial(fastclip.contrastive_loss, backend=backend), image, text, scale)
    assert got.loss.item() == pytest.approx(torch.log(torch.tensor(9.0)).item(), rel=1e-6)
    assert_matches(got, reference(image, text, scale), torch.float32)


@pytest.mark.parametrize(
    "target, dtype",
    [pytest.param(t.values[0], torch.float32, id=f"{t.id}-float32", marks=t.marks) for t in TARGETS]
    + [pytest.param(t.values[0], torch.float64, id=f"{t.id}-float64", marks=t.marks) for t in FLOAT64_TARGETS],
)
def test_lse_rectangular(target: tuple[str, str], dtype: torch.dtype) -> None:
    """The op itself on n != N rows, with gradients through either output alone (the other one unused)."""
    backend, device = target
    image, text, scale = pair(101, 19, dtype, device, rows=37)
    row_lse, col_lse = contrastive_lse(image, text, scale, backend=backend)
    want_row, want_col = contrastive_lse_reference(*(x.detach().double() for x in (image, text, scale)))
    assert row_lse.shape == (37,) and col_lse.shape == (101,)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(row_lse.double(), want_row, rtol=tol, atol=tol)
    torch.testing.assert_close(col_lse.double(), want_col, rtol=tol, atol=tol)
    for pick in (0, 1):
        weights = torch.randn(101 if pick else 37, dtype=torch.float64, device=device)
        fused = partial(contrastive_lse, backend=backend)
        got = loss_and_grads(lambda *x: (fused(*x)[pick].double() * weights).sum(), image, text, scale)
        exact = (x.double() for x in (image, text, scale))
        want = loss_and_grads(lambda *x: (contrastive_lse_reference(*x)[pick] * weights).sum(), *exact)
        assert_matches(got, want, dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shares", [[1], [3, 4], [64, 1, 192]], ids=lambda s: "+".join(map(str, s)))
def test_offset_shares_sum_to_the_loss(target: tuple[str, str], dtype: torch.dtype, shares: list[int]) -> None:
    """Data-parallel form: each 'rank' holds a block of image rows against all columns; shares add up to L."""
    backend, device = target
    n = sum(shares)
    image, text, scale = pair(n, 40, dtype, device)
    options = dict(weight=0.3, label_smoothing=0.1)

    def sharded_loss(i, t, s):
        blocks = list(i.split(shares))
        per_rank = [contrastive_lse(block, t, s, backend=backend) for block in blocks]
        # Column log-sum-exps are partial per rank; a real run all-reduces them, here we merge directly.
        col_lse = torch.stack([col for _, col in per_rank]).logsumexp(0)
        offsets = itertools.accumulate([0, *shares[:-1]])
        return sum(
            contrastive_loss_from_lse(block, t, s, row, col_lse, offset=offset, **options)
            for block, (row, _), offset in zip(blocks, per_rank, offsets)
        )

    got = loss_and_grads(sharded_loss, image, text, scale)
    naive = naive_same_dtype(image, text, scale, **options) if dtype != torch.float32 else None
    # the positive-pair terms come from autograd here, after the op's rounded gradient tiles
    assert_matches(got, reference(image, text, scale, **options), dtype, naive, rounded_tiles=backend == "cuda")


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_gradcheck_float64(target: tuple[str, str]) -> None:
    backend, device = target
    image, text, scale = pair(6, 5, torch.float64, device, scale=2.5)

    def loss(i, t, s):
        return fastclip.contrastive_loss(i, t, s, weight=0.3, label_smoothing=0.1, backend=backend)

    def lse(i, t, s):
        return contrastive_lse(i, t, s, backend=backend)

    assert torch.autograd.gradcheck(loss, (image, text, scale))
    assert torch.autograd.gradcheck(lse, (image[:4].detach().requires_grad_(), text, scale))


@pytest.mark.parametrize("n, chunk", [(1, 4), (50, 7), (130, 64)])
def test_chunked_reference_matches_dense_reference(n: int, chunk: int) -> None:
    """The analytic chunked reference the large-N GPU tests rely on agrees with autograd on dense logits."""
    image, text, scale = pair(n, 11, torch.float64, scale=6.0)
    options = dict(weight=0.3, label_smoothing=0.1)
    got = chunked_reference(image, text, 6.0, chunk=chunk, **options)
    assert_matches(got, reference(image, text, scale, **options), torch.float64)

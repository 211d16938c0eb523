"""`fastclip.contrastive_loss` on the CPU backends against the float64 reference: loss and every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastclip
from fastclip import _extension
from fastclip.ops import contrastive_lse, contrastive_loss_from_lse
from fastclip.ops.reference import contrastive_lse_reference
from loss_helpers import CLIP_SCALE, assert_matches, features, loss_and_grads, naive_same_dtype, reference, scale_tensor

CPU_BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not _extension.has_kernel("contrastive_lse", "CPU"), reason="fastclip._C not built"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = (0.0, 0.3, 0.5, 1.0)
SMOOTHINGS = (0.0, 0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 17, 64, 512])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 257, 1000])
def test_loss_and_grads_match_reference(n: int, dim: int, dtype: torch.dtype, backend: str) -> None:
    image, text = features(n, dim, dtype), features(n, dim, dtype)
    scale = scale_tensor(CLIP_SCALE)
    for weight, smoothing in itertools.product(WEIGHTS, SMOOTHINGS):
        options = dict(weight=weight, label_smoothing=smoothing)
        got = loss_and_grads(lambda i, t, s: fastclip.contrastive_loss(i, t, s, backend=backend, **options), image, text, scale)
        assert got.loss.dtype == torch.float32 and got.loss.dim() == 0
        assert got.grads[0].dtype == dtype and got.grads[1].dtype == dtype
        naive = naive_same_dtype(image, text, scale, **options) if dtype != torch.float32 else None
        assert_matches(got, reference(image, text, scale, **options), dtype, naive)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_is_exact(backend: str) -> None:
    image, text, scale = features(300, 33, torch.float64), features(300, 33, torch.float64), scale_tensor(7.3, torch.float64)
    got = loss_and_grads(lambda i, t, s: fastclip.contrastive_loss(i, t, s, weight=0.3, label_smoothing=0.1, backend=backend), image, text, scale)
    assert got.loss.dtype == torch.float64
    assert_matches(got, reference(image, text, scale, weight=0.3, label_smoothing=0.1), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_high_scale_and_unnormalized_features(backend: str, dtype: torch.dtype) -> None:
    """logit_scale 100 (CLIP's clamp) with low-precision inputs, and features that are not unit vectors."""
    for normalize, value in ((True, 100.0), (False, 3.0)):
        image, text = features(130, 48, dtype, normalize=normalize), features(130, 48, dtype, normalize=normalize)
        scale = scale_tensor(value)
        got = loss_and_grads(lambda i, t, s: fastclip.contrastive_loss(i, t, s, backend=backend), image, text, scale)
        naive = naive_same_dtype(image, text, scale) if dtype != torch.float32 else None
        assert_matches(got, reference(image, text, scale), dtype, naive)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identical_rows_tie(backend: str) -> None:
    """All pairs identical: every logit ties, so each cross-entropy is log N with zero gradient for the features."""
    row = features(1, 16, torch.float32).detach()
    image = row.expand(9, 16).clone().requires_grad_()
    text = row.expand(9, 16).clone().requires_grad_()
    scale = scale_tensor(CLIP_SCALE)
    got = loss_and_grads(lambda i, t, s: fastclip.contrastive_loss(i, t, s, backend=backend), image, text, scale)
    assert got.loss.item() == pytest.approx(torch.log(torch.tensor(9.0)).item(), rel=1e-6)
    assert_matches(got, reference(image, text, scale), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lse_rectangular(backend: str, dtype: torch.dtype) -> None:
    """The op itself on n != N rows, with gradients through either output alone (the other one unused)."""
    image, text, scale = features(37, 19, dtype), features(101, 19, dtype), scale_tensor(CLIP_SCALE, dtype)
    row_lse, col_lse = contrastive_lse(image, text, scale, backend=backend)
    want_row, want_col = contrastive_lse_reference(image.detach().double(), text.detach().double(), scale.detach().double())
    assert row_lse.shape == (37,) and col_lse.shape == (101,)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(row_lse.double(), want_row, rtol=tol, atol=tol)
    torch.testing.assert_close(col_lse.double(), want_col, rtol=tol, atol=tol)
    for pick in (0, 1):
        weights = torch.randn(101 if pick else 37, dtype=torch.float64)
        got = loss_and_grads(lambda i, t, s: (contrastive_lse(i, t, s, backend=backend)[pick].double() * weights).sum(), image, text, scale)
        want = loss_and_grads(lambda i, t, s: (contrastive_lse_reference(i, t, s)[pick] * weights).sum(), image.double(), text.double(), scale.double())
        assert_matches(got, want, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shares", [[1], [3, 4], [64, 1, 192]], ids=lambda s: "+".join(map(str, s)))
def test_offset_shares_sum_to_the_loss(backend: str, dtype: torch.dtype, shares: list[int]) -> None:
    """Data-parallel form: each 'rank' holds a block of image rows against all columns; shares add up to L."""
    n = sum(shares)
    image, text, scale = features(n, 40, dtype), features(n, 40, dtype), scale_tensor(CLIP_SCALE)
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
    assert_matches(got, reference(image, text, scale, **options), dtype, naive)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend: str) -> None:
    image, text = features(6, 5, torch.float64), features(6, 5, torch.float64)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)

    def loss(i, t, s):
        return fastclip.contrastive_loss(i, t, s, weight=0.3, label_smoothing=0.1, backend=backend)

    def lse(i, t, s):
        return contrastive_lse(i, t, s, backend=backend)

    assert torch.autograd.gradcheck(loss, (image, text, scale))
    assert torch.autograd.gradcheck(lse, (image[:4].detach().requires_grad_(), text, scale))

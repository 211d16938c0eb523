"""The tiled PyTorch losses' working set: beside the gradients, one [chunk, N] tile alive at a time where
one exponential serves both directions (and for SigLIP), two where the column term needs its own; on a
CPU each tile made by column-block GEMMs (`similarity`) that equal one matmul.

Tensor memory is counted by LiveBytes (a dispatch mode): the BLAS library's own buffers, which the
column-block GEMMs keep small, are not tensors and are measured by benchmarks/bench_loss.py instead."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import LiveBytes, features

import fastclip
from fastclip.ops.contrastive_lse import contrastive_lse
from fastclip.ops.contrastive_lse_torch import GEMM_COLS, chunk_rows, similarity, tile_budget_bytes
from fastclip.ops.pairwise_sigmoid import pairwise_sigmoid


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, GEMM_COLS - 1), (7, GEMM_COLS), (5, GEMM_COLS + 1), (2, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_similarity_is_the_matmul(rows: int, cols: int, dtype: torch.dtype) -> None:
    a, b = torch.randn(rows, 37, dtype=dtype), torch.randn(cols, 37, dtype=dtype)
    expected = a.double() @ b.double().T
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(similarity(a, b).double(), expected, rtol=tol, atol=tol)


def test_similarity_is_differentiable_where_autograd_records() -> None:
    a = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(GEMM_COLS + 3, 9, dtype=torch.float64)
    (grad,) = torch.autograd.grad(similarity(a, b).square().sum(), a)
    torch.testing.assert_close(grad, 2 * (a @ b.T) @ b)


def test_tile_budget_follows_the_batch() -> None:
    mib = 1 << 20
    assert [tile_budget_bytes(n) // mib for n in (1, 4096, 8192, 16384, 32768, 1 << 20)] == [8, 8, 8, 32, 64, 64]


def _loss(kind: str, image, text, scale, bias, labels) -> torch.Tensor:
    if kind == "clip":
        return fastclip.contrastive_loss(image, text, scale, backend="torch")
    if kind == "clip-labels":
        return fastclip.contrastive_loss(image, text, scale, labels=labels, backend="torch")
    if kind == "lse":
        row_lse, col_lse = contrastive_lse(image, text, scale, masked_diagonal=1, backend="torch")
        return row_lse.sum() + col_lse.sum()
    if kind == "siglip":
        return fastclip.sigmoid_loss(image, text, scale, bias, backend="torch")
    return pairwise_sigmoid(image, text, scale, bias, labels, labels, backend="torch").sum()


TILES = [  # (loss, logit scale, tiles alive at the peak)
    ("clip", 14.3, 1),  # one exponential serves both directions
    ("clip", 1000.0, 2),  # the logits spread too far: P_row and P_col apart
    ("clip-labels", 14.3, 1),
    ("clip-labels", 1000.0, 2),
    ("lse", 14.3, 2),
    ("siglip", 10.0, 1),
    ("siglip-op", 10.0, 1),
]


@pytest.mark.parametrize("kind, scale, tiles", TILES)
def test_tiled_loss_working_set(kind: str, scale: float, tiles: int) -> None:
    """Forward + backward of a tiled PyTorch loss past the kept-similarity size: the gradients, `tiles`
    tiles and O(N * D) terms. A tile left alive while the next one is made, or a tile-sized temporary,
    breaks the bound."""
    n, dim = 4099, 24  # several chunks, the last one ragged
    image, text = features(n, dim, torch.float32), features(n, dim, torch.float32)
    logit_scale, logit_bias = torch.tensor(scale, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    labels = torch.arange(n) // 3
    tile = chunk_rows(n, 4) * n * 4
    assert tile * 3 < n * n * 4, "the tiles must be a small part of the matrix for this bound to mean anything"
    inputs = (image, text, logit_scale) + ((logit_bias,) if kind.startswith("siglip") else ())
    with LiveBytes() as memory:
        grads = torch.autograd.grad(_loss(kind, image, text, logit_scale, logit_bias, labels), inputs)
    linear = 8 * n * dim * 4  # gradients, their fp32 sums and [n, D] products, with room to spare
    assert memory.peak <= tiles * tile + linear, f"peak {memory.peak / tile:.2f} tiles of {tile / 2**20:.1f} MiB"
    assert all(torch.isfinite(g).all() for g in grads)

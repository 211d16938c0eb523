"""The tiled PyTorch losses' working set: at most two [chunk, N] similarity tiles alive at a time beside the
gradients, and on a CPU each tile made by column-block GEMMs (`similarity`) that equal one matmul."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import LiveBytes, features

import fastclip
from fastclip.ops.contrastive_lse_torch import GEMM_COLS, chunk_rows, similarity, tile_budget_bytes


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


@pytest.mark.parametrize("scale", [14.3, 1000.0], ids=["one-exponential", "two-exponentials"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["pairs", "labels"])
def test_tiled_loss_holds_two_tiles(scale: float, with_labels: bool) -> None:
    """Forward + backward of the tiled PyTorch loss past the kept-similarity size: the gradients, two
    tiles and O(N * D) terms. A tile left alive while the next one is made, or a tile-sized temporary,
    breaks the bound."""
    n, dim = 4099, 24  # several chunks, the last one ragged
    image, text = features(n, dim, torch.float32), features(n, dim, torch.float32)
    logit_scale = torch.tensor(scale, requires_grad=True)
    labels = torch.arange(n) // 3 if with_labels else None
    tile = chunk_rows(n, 4) * n * 4
    assert tile * 3 < n * n * 4, "the tiles must be a small part of the matrix for this bound to mean anything"
    with LiveBytes() as memory:
        loss = fastclip.contrastive_loss(image, text, logit_scale, labels=labels, backend="torch")
        grads = torch.autograd.grad(loss, (image, text, logit_scale))
    linear = 8 * n * dim * 4  # gradients, their fp32 sums and [n, D] products, with room to spare
    assert memory.peak <= 2 * tile + linear, f"peak {memory.peak / 2**20:.1f} MiB, tile {tile / 2**20:.1f} MiB"
    assert all(torch.isfinite(g).all() for g in grads)

"""The compiled ops' fake (meta) kernels: output shapes and dtypes for tracing, and the same shape checks as
the C++ ops, so that a traced graph with mismatched shapes fails when traced."""

from __future__ import annotations

import pytest
import torch

from fastclip import _extension

pytestmark = pytest.mark.skipif(not _extension.is_loaded(), reason="fastclip._C not built")

OPS = torch.ops.fastclip


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def lse_args(n: int, big_n: int, dim: int) -> dict[str, torch.Tensor]:
    return {"image": meta(n, dim), "text": meta(big_n, dim), "logit_scale": meta(dtype=torch.float32)}


@pytest.mark.parametrize("n, big_n, dim", [(1, 1, 1), (5, 7, 3), (130, 67, 512)])
def test_output_shapes(n: int, big_n: int, dim: int) -> None:
    args = lse_args(n, big_n, dim)
    row, col = OPS.contrastive_lse(*args.values())
    assert (row.shape, col.shape, row.dtype, col.dtype) == ((n,), (big_n,), torch.float32, torch.float32)
    grads = OPS.contrastive_lse_backward(
        meta(n, dtype=torch.float32), meta(big_n, dtype=torch.float32), *args.values(), row, col
    )
    assert [g.shape for g in grads] == [(n, dim), (big_n, dim), ()]
    labels = torch.empty(n, dtype=torch.long, device="meta"), torch.empty(big_n, dtype=torch.long, device="meta")
    row_loss = OPS.pairwise_sigmoid(*args.values(), meta(dtype=torch.float32), *labels)
    assert row_loss.shape == (n,) and row_loss.dtype == torch.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: OPS.contrastive_lse(meta(4, 8), meta(6, 9), meta(dtype=torch.float32)), "feature dims differ"),
        (
            lambda: OPS.contrastive_lse(meta(4, 8), meta(6, 8), meta(2, dtype=torch.float32)),
            "logit_scale must hold one",
        ),
        (lambda: OPS.contrastive_lse(meta(4, 8, 1), meta(6, 8), meta(dtype=torch.float32)), "must be 2-D"),
        (
            lambda: OPS.contrastive_lse(meta(4, 8), meta(6, 8, dtype=torch.float16), meta(dtype=torch.float32)),
            "dtypes differ",
        ),
        (
            lambda: OPS.contrastive_lse_backward(meta(4), meta(5), *lse_args(4, 6, 8).values(), meta(4), meta(6)),
            r"grad_col_lse must be \[6\]",
        ),
        (
            lambda: OPS.contrastive_lse_backward(meta(4), meta(6), *lse_args(4, 6, 8).values(), meta(3), meta(6)),
            r"row_lse must be \[4\]",
        ),
        (
            lambda: OPS.pairwise_sigmoid(
                *lse_args(4, 6, 8).values(),
                meta(dtype=torch.float32),
                torch.empty(4, dtype=torch.long, device="meta"),
                torch.empty(5, dtype=torch.long, device="meta"),
            ),
            r"col_labels must be \[6\]",
        ),
    ],
    ids=["dims", "scale", "rank", "dtype", "lse-backward-columns", "lse-backward-rows", "sigmoid-labels"],
)
def test_mismatched_shapes_fail_when_traced(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()

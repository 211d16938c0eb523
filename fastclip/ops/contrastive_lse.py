"""`contrastive_lse`: the fused part of the CLIP loss.

Given S = s * image @ text.T (never stored), returns the row log-sum-exps (n,) and the column
log-sum-exps (N,) over the rows given, in fp32 (float64 for float64 inputs). The contrastive losses are
built from these plus O(N * D) terms, so this op carries all of the O(N^2 * D) work of the forward and,
through its registered backward, of the backward.

With `masked_diagonal=d` the entries (i, i + d) are left out of both log-sum-exps, as if they were -inf:
the self-pairs of SupCon/NT-Xent, where both operands are one matrix (d is the rows' offset into it).

Backends: "cuda", "cpp", "torch" or "auto"; `fastclip.backends` says which runs where.
"""

from __future__ import annotations

import torch

from fastclip import _extension
from fastclip.backends import resolve_loss_backend
from fastclip.ops._checks import accumulate_dtype, as_logit_scale, check_fake_inputs, check_features, check_index
from fastclip.ops.contrastive_lse_torch import contrastive_lse_torch
from fastclip.ops.first_order import register_first_order_only

OP = "contrastive_lse"


def contrastive_lse(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    masked_diagonal: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (n,) and column (N,) log-sum-exps of `logit_scale * image_features @ text_features.T`.

    `masked_diagonal=d` leaves the entries (i, i + d) out (a row or column left empty gets -inf).
    Differentiable in both feature tensors and `logit_scale`; memory O((n + N) * D) on every backend.
    """
    check_features(image_features, text_features)
    if masked_diagonal is not None:
        check_index("masked_diagonal", masked_diagonal)
    scale = as_logit_scale(logit_scale, image_features.device)
    return dispatch_contrastive_lse(image_features, text_features, scale, backend, masked_diagonal)


def dispatch_contrastive_lse(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    backend: str,
    masked_diagonal: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chosen backend on already-checked inputs."""
    if resolve_loss_backend(backend, image.device, image.dtype, OP) == "torch":
        return contrastive_lse_torch(image, text, logit_scale, masked_diagonal)
    return torch.ops.fastclip.contrastive_lse(image, text, logit_scale, masked_diagonal)


def _register_compiled_op() -> None:
    """Fake (meta) kernels and autograd for the C++/CUDA op, so opcheck and torch.compile work."""

    @torch.library.register_fake(f"fastclip::{OP}")
    def _(image, text, logit_scale, masked_diagonal=None):
        check_fake_inputs(image, text, {"logit_scale": logit_scale})
        acc = accumulate_dtype(image.dtype)
        return image.new_empty(image.shape[0], dtype=acc), text.new_empty(text.shape[0], dtype=acc)

    @torch.library.register_fake(f"fastclip::{OP}_backward")
    def _(grad_row, grad_col, image, text, logit_scale, row_lse, col_lse, masked_diagonal=None):
        check_fake_inputs(
            image,
            text,
            {"logit_scale": logit_scale},
            rows={"grad_row_lse": grad_row, "row_lse": row_lse},
            columns={"grad_col_lse": grad_col, "col_lse": col_lse},
        )
        return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)

    def setup_context(ctx, inputs, output):
        image, text, logit_scale, masked_diagonal = inputs
        ctx.masked_diagonal = masked_diagonal
        ctx.save_for_backward(image, text, logit_scale, *output)

    def backward(ctx, grad_row, grad_col):
        image, text, logit_scale, row_lse, col_lse = ctx.saved_tensors
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
        grads = torch.ops.fastclip.contrastive_lse_backward(
            grad_row, grad_col, image, text, logit_scale, row_lse, col_lse, ctx.masked_diagonal
        )
        return (*grads, None)

    torch.library.register_autograd(f"fastclip::{OP}", backward, setup_context=setup_context)
    register_first_order_only(f"{OP}_backward")


if _extension.is_loaded():
    _register_compiled_op()

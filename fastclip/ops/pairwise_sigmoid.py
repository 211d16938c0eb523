"""`pairwise_sigmoid`: the fused part of SigLIP's sigmoid loss, with the same dispatch as `contrastive_lse`.

For L = s * image @ text.T + b (never stored) and z_ij = +1 where row_labels[i] == col_labels[j], -1
elsewhere, returns row_loss[i] = sum_j -log sigmoid(z_ij * L_ij) = sum_j softplus(-z_ij * L_ij), [n], in
fp32 (float64 for float64 inputs). Positives are decided inside each tile, so every term is computed in
its stable form (no large softplus(L) - L cancellation). Differentiable in both features, s and b.

Backends: "cuda" (CUDA kernel), "cpp" (C++ CPU kernel), "torch" (tiled PyTorch), "auto" as for
`contrastive_lse`. `dispatch_pairwise_sigmoid_with_grad` gives a loss whose row weights are known up
front (SigLIP's) the row losses and every gradient from one pass (fastclip.ops.sigmoid_loss).
"""

from __future__ import annotations

import torch

from fastclip import _extension
from fastclip.backends import resolve_loss_backend
from fastclip.ops._checks import (
    accumulate_dtype,
    as_logit_bias,
    as_logit_scale,
    check_fake_inputs,
    check_features,
    check_labels,
)
from fastclip.ops.first_order import register_first_order_only
from fastclip.ops.pairwise_sigmoid_torch import pairwise_sigmoid_torch, pairwise_sigmoid_with_grad_torch

OP = "pairwise_sigmoid"


def pairwise_sigmoid(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    row_labels: torch.Tensor,
    col_labels: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row sums [n] of -log sigmoid(z * (s * image @ text.T + b)); z from label equality.

    `row_labels` [n] and `col_labels` [N] are integer tensors; memory O((n + N) * D) on every backend.
    """
    check_features(image_features, text_features)
    device = image_features.device
    row_labels = check_labels("row_labels", row_labels, image_features.shape[0], device)
    col_labels = check_labels("col_labels", col_labels, text_features.shape[0], device)
    scale, bias = as_logit_scale(logit_scale, device), as_logit_bias(logit_bias, device)
    return dispatch_pairwise_sigmoid(image_features, text_features, scale, bias, row_labels, col_labels, backend)


def dispatch_pairwise_sigmoid(
    image, text, logit_scale, logit_bias, row_labels, col_labels, backend: str
) -> torch.Tensor:
    """Run the chosen backend on already-checked inputs (labels int64)."""
    if resolve_loss_backend(backend, image.device, image.dtype, OP) == "torch":
        return pairwise_sigmoid_torch(image, text, logit_scale, logit_bias, row_labels, col_labels)
    return torch.ops.fastclip.pairwise_sigmoid(image, text, logit_scale, logit_bias, row_labels, col_labels)


def dispatch_pairwise_sigmoid_with_grad(
    grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, backend: str
) -> tuple[torch.Tensor, ...]:
    """(row_loss, grad_image, grad_text, grad_logit_scale, grad_logit_bias) of sum_i grad_row[i] *
    row_loss[i] from one pass, unrounded in the accumulation dtype, on the chosen backend (inputs checked)."""
    args = (grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels)
    if resolve_loss_backend(backend, image.device, image.dtype, f"{OP}_with_grad") == "torch":
        return pairwise_sigmoid_with_grad_torch(*args)
    return torch.ops.fastclip.pairwise_sigmoid_with_grad(*args)


def _register_compiled_op() -> None:
    """Fake (meta) kernels and autograd for the C++/CUDA op, so opcheck and torch.compile work."""

    @torch.library.register_fake(f"fastclip::{OP}")
    def _(image, text, logit_scale, logit_bias, row_labels, col_labels):
        check_fake_inputs(
            image,
            text,
            {"logit_scale": logit_scale, "logit_bias": logit_bias},
            rows={"row_labels": row_labels},
            columns={"col_labels": col_labels},
        )
        return image.new_empty(image.shape[0], dtype=accumulate_dtype(image.dtype))

    def check_weighted(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels) -> None:
        """The checks of the two ops that take per-row weights of the row losses."""
        check_fake_inputs(
            image,
            text,
            {"logit_scale": logit_scale, "logit_bias": logit_bias},
            rows={"grad_row_loss": grad_row, "row_labels": row_labels},
            columns={"col_labels": col_labels},
        )

    @torch.library.register_fake(f"fastclip::{OP}_backward")
    def _(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels):
        check_weighted(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels)
        return (
            torch.empty_like(image),
            torch.empty_like(text),
            torch.empty_like(logit_scale),
            torch.empty_like(logit_bias),
        )

    @torch.library.register_fake(f"fastclip::{OP}_with_grad")
    def _(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels):
        check_weighted(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels)
        acc = accumulate_dtype(image.dtype)
        return (
            image.new_empty(image.shape[0], dtype=acc),
            image.new_empty(image.shape, dtype=acc),
            text.new_empty(text.shape, dtype=acc),
            image.new_empty((), dtype=acc),
            image.new_empty((), dtype=acc),
        )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_row):
        grads = torch.ops.fastclip.pairwise_sigmoid_backward(grad_row, *ctx.saved_tensors)
        return (*grads, None, None)

    torch.library.register_autograd(f"fastclip::{OP}", backward, setup_context=setup_context)
    register_first_order_only(f"{OP}_backward")
    register_first_order_only(f"{OP}_with_grad")


if _extension.is_loaded():
    _register_compiled_op()

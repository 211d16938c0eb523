"""SigLIP's sigmoid loss on top of the fused `pairwise_sigmoid`.

    L = -(1/N) sum_ij log sigmoid(z_ij * (s * <x_i, y_j> + b)),   z_ij = +1 for positives, -1 otherwise

Positives are the diagonal (pair i with pair i) or, with class `labels`, every pair with equal labels.
Every pair is its own binary problem, so a rank holding image rows offset..offset+n of the global batch
and all N text rows owes exactly its rows' terms: `sigmoid_loss_share` is that share, and the shares of
all ranks add up to L.

Every row of that share weighs 1/N, so its gradient is known before the similarities are: when a
gradient is wanted, one pass (`pairwise_sigmoid_with_grad`) makes the value and every gradient together
(three N x N x D GEMMs instead of a forward's one and a recomputing backward's three), and the backward
only scales them by the upstream gradient and rounds them once.
"""

from __future__ import annotations

import torch

from fastclip.ops._checks import (
    accumulate_dtype,
    as_logit_bias,
    as_logit_scale,
    check_features,
    check_labels,
    check_matched_pairs,
    check_offset,
    share_hint,
)
from fastclip.ops.contrastive_gradient import wants_gradient
from fastclip.ops.first_order import first_order_only
from fastclip.ops.pairwise_sigmoid import dispatch_pairwise_sigmoid, dispatch_pairwise_sigmoid_with_grad


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    labels: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP's loss for matched rows of `image_features` and `text_features` ([N, D] each).

    `logit_scale` is the multiplier s = exp(t'), `logit_bias` the bias b. With integer `labels` [N] every
    pair with equal labels is a positive (z = +1). Returns an fp32 scalar (float64 for float64 inputs),
    differentiable in both features, s and b; no N x N matrix is stored on any backend.
    """
    check_features(image_features, text_features)
    check_matched_pairs(image_features, text_features, share_hint("sigmoid_loss_share"))
    return sigmoid_loss_share(image_features, text_features, logit_scale, logit_bias, labels=labels, backend=backend)


def sigmoid_loss_share(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    offset: int = 0,
    labels: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The share of the global SigLIP loss owed to image rows offset..offset+n of an N-pair batch.

    `image_features` [n, D] are this rank's rows, `text_features` [N, D] all columns, `labels` [N] (if
    given) the whole batch's. Summed over ranks the shares give `sigmoid_loss` of the whole batch.
    """
    check_features(image_features, text_features)
    n, num_pairs = image_features.shape[0], text_features.shape[0]
    device = image_features.device
    check_offset(offset, n, num_pairs)
    if labels is None:  # the diagonal: pair i's label is i
        col_labels = torch.arange(num_pairs, device=device)
    else:
        col_labels = check_labels("labels", labels, num_pairs, device)
    scale, bias = as_logit_scale(logit_scale, device), as_logit_bias(logit_bias, device)
    row_labels = col_labels[offset : offset + n]
    inputs = (image_features, text_features, scale, bias)
    if not wants_gradient(*inputs):
        row_loss = dispatch_pairwise_sigmoid(*inputs, row_labels, col_labels, backend)
        return row_loss.sum() / num_pairs
    # Every row weighs 1/N: the gradient is known before the sweep, so one pass makes it with the value.
    acc = accumulate_dtype(image_features.dtype)
    weights = torch.full((n,), 1.0 / num_pairs, dtype=acc, device=device)
    row_loss, *grads = dispatch_pairwise_sigmoid_with_grad(
        weights, *(x.detach() for x in inputs), row_labels, col_labels, backend
    )
    return _PrecomputedGradient.apply(row_loss.sum() / num_pairs, tuple(grads), *inputs)


class _PrecomputedGradient(torch.autograd.Function):
    """value, grads, *inputs -> value, whose backward hands each input grad_value * its precomputed
    gradient (unrounded, in the accumulation dtype), rounded once to the input's dtype."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple[torch.Tensor, ...], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.like = [(x.dtype, x.shape) for x in inputs]
        # saved, not held on ctx: freed once the backward has run (unless the graph is retained)
        ctx.save_for_backward(*inputs, *grads)  # the inputs only as first_order_only's anchors
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        saved = ctx.saved_tensors
        anchors, grads = saved[: len(ctx.like)], saved[len(ctx.like) :]
        out = []
        for grad, (dtype, shape), needed in zip(grads, ctx.like, ctx.needs_input_grad[2:]):
            rounded = (grad * grad_value.to(grad.dtype)).to(dtype).reshape(shape) if needed else None
            out.append(None if rounded is None else first_order_only(rounded, anchors))
        return None, None, *out

"""CLIP's symmetric contrastive loss on top of `contrastive_lse`.

    L = (1/N) sum_i [ w * CE_i(row i of S) + (1 - w) * CE_i(column i of S) ],   S = s * I @ T.T

With label smoothing eps (as in F.cross_entropy, over N classes) each cross-entropy is
lse - (1 - eps) * S_positive - (eps / N) * sum(S over the row or column), so

    N * L = w * sum(row_lse) + (1 - w) * sum(col_lse) - (1 - eps) * sum_i S_ii - (eps / N) * sum_ij S_ij

where sum_ij S_ij = s * (sum_i I_i) . (sum_j T_j). Only the log-sum-exps are O(N^2 D); the rest is O(N D).

With class `labels`, every pair (i, j) with equal labels is a positive and each row's (and column's)
target spreads evenly over its positives P(i) (UniCL): sum_i S_ii becomes sum_i (1/|P(i)|) sum_{j in P(i)}
S_ij. Rows and columns share the labels, so |P| is the same from either side and the column form of that
sum equals the row form: still O(N D) through per-class feature sums (fastclip.ops.positives). Every row
is its own positive, so no row is ever without one; `labels=None` is the diagonal, today's CLIP loss.

The same formula gives one rank's share in data-parallel training: a rank holding image rows
offset..offset+n of the global batch and all N text rows contributes its row terms, the column terms of
the columns offset..offset+n, and its rows' part of the smoothing sum; the shares add up to L when
`col_lse` is the global column log-sum-exp (the partial ones merged across ranks).
"""

from __future__ import annotations

import torch

from fastclip.backends import resolve_loss_backend
from fastclip.ops._checks import (
    accumulate_dtype,
    as_logit_scale,
    check_features,
    check_labels,
    check_matched_pairs,
    check_offset,
    check_unit_interval,
    share_hint,
)
from fastclip.ops.contrastive_gradient import LossTerms, attach_fused_gradient, clip_terms, loss_lse, wants_gradient
from fastclip.ops.linear_terms import linear_terms
from fastclip.ops.positives import class_ids


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    weight: float = 0.5,
    label_smoothing: float = 0.0,
    labels: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLIP's contrastive loss for matched rows of `image_features` and `text_features` ([N, D] each).

    `logit_scale` is the multiplier s (exp of the learned temperature). `weight` weighs the image->text
    direction, 1 - weight the text->image one. With integer `labels` [N] every pair with equal labels is
    a positive, each row's target spread evenly over its positives (see the module docstring). Returns an
    fp32 scalar (float64 for float64 inputs), differentiable in both features and `logit_scale`; no N x N
    matrix is stored on any backend (but a small one: see `loss_lse`).
    """
    check_features(image_features, text_features)
    check_matched_pairs(image_features, text_features, share_hint("contrastive_loss_from_lse"))
    check_unit_interval("weight", weight)
    check_unit_interval("label_smoothing", label_smoothing)
    if labels is not None:
        labels = check_labels("labels", labels, text_features.shape[0], text_features.device)
    scale = as_logit_scale(logit_scale, image_features.device)
    backend = resolve_loss_backend(backend, image_features.device, image_features.dtype)
    # The value from detached inputs (unchanged arithmetic); the gradient from one fused backward that
    # folds the target terms in before its one rounding (fastclip.ops.contrastive_gradient).
    image, text = image_features.detach(), text_features.detach()
    differentiable = wants_gradient(image_features, text_features, scale)
    row_lse, col_lse, kept = loss_lse(image, text, scale.detach(), backend, None, differentiable)
    value = _assemble_loss(image, text, scale.detach(), row_lse, col_lse, 0, weight, label_smoothing, labels)

    def terms() -> LossTerms:
        return clip_terms(image.shape[0], labels, weight, label_smoothing, row_lse.dtype, image.device)

    return attach_fused_gradient(value, image_features, text_features, scale, row_lse, col_lse, terms, backend, kept)


def contrastive_loss_from_lse(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    *,
    offset: int = 0,
    weight: float = 0.5,
    label_smoothing: float = 0.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The share of the global loss owed to image rows offset..offset+n of an N-pair batch.

    `image_features` [n, D] are this rank's rows, `text_features` [N, D] all columns, `row_lse` [n] their
    row log-sum-exps and `col_lse` [N] the global column log-sum-exps (from `contrastive_lse`, merged
    across ranks). `labels` [N], if given, are the whole batch's. Summed over ranks the shares give
    `contrastive_loss` of the whole batch; gradients flow through `row_lse`/`col_lse` into the fused
    backward.
    """
    check_features(image_features, text_features)
    check_unit_interval("weight", weight)
    check_unit_interval("label_smoothing", label_smoothing)
    n, num_pairs = image_features.shape[0], text_features.shape[0]
    check_offset(offset, n, num_pairs)
    for name, lse in (("row_lse", row_lse), ("col_lse", col_lse)):
        if not isinstance(lse, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (from contrastive_lse), got {type(lse).__name__}")
        if not lse.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (from contrastive_lse), got {lse.dtype}")
        if lse.device != image_features.device:
            raise ValueError(f"{name} must be on the features' device {image_features.device}, got {lse.device}")
    if row_lse.shape != (n,) or col_lse.shape != (num_pairs,):
        raise ValueError(
            f"row_lse must be [{n}] and col_lse [{num_pairs}], got {tuple(row_lse.shape)} and {tuple(col_lse.shape)}"
        )
    if labels is not None:
        labels = check_labels("labels", labels, num_pairs, image_features.device)
    scale = as_logit_scale(logit_scale, image_features.device)
    return _assemble_loss(
        image_features, text_features, scale, row_lse, col_lse, offset, weight, label_smoothing, labels
    )


def _assemble_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    offset: int,
    weight: float,
    label_smoothing: float,
    labels: torch.Tensor | None,
) -> torch.Tensor:
    """The O(N * D) rest of the loss (see the module docstring), accumulated in fp32 (or float64).

    The feature terms run in row chunks (fastclip.ops.linear_terms): no whole fp32 copy of bf16/fp16
    features is made, nor saved for backward.
    """
    n, num_pairs = image.shape[0], text.shape[0]
    # fp32 at least (float64 for float64 inputs or log-sum-exps), whatever dtype the lse arrived in
    acc = torch.promote_types(accumulate_dtype(image.dtype), torch.promote_types(row_lse.dtype, col_lse.dtype))
    scale = logit_scale.to(acc).reshape(())
    col_ids = row_weights = None
    if labels is not None:  # each row's target spread over its positives P(i): weights 1/|P(i)|
        col_ids, counts = class_ids(labels)
        row_weights = 1.0 / counts[col_ids[offset : offset + n]].to(acc)
    # sum_i S_i,offset+i (or its label form) and sum over this rank's rows of sum_j S_ij, over s
    positives, total = linear_terms(image, text, offset, acc, col_ids, row_weights)
    lse_terms = weight * row_lse.to(acc).sum() + (1.0 - weight) * col_lse[offset : offset + n].to(acc).sum()
    smoothing = (label_smoothing / num_pairs) * total
    return (lse_terms - scale * ((1.0 - label_smoothing) * positives + smoothing)) / num_pairs

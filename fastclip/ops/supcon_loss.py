"""The supervised contrastive loss (SupCon, Khosla et al. 2020, the L_out form) and SimCLR's NT-Xent.

For features f [M, D] (for example two augmented views of N images stacked as [view1; view2]) and
S = f @ f.T / temperature, anchor i's loss is

    l_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(S_ip) / sum_{a != i} exp(S_ia) )
        = lse_{a != i}(S_i) - (1/|P(i)|) sum_{p in P(i)} S_ip

with P(i) the other samples of i's class, or, without labels, the other view of the same image
(NT-Xent). The log-sum-exp runs on the fused `contrastive_lse` with both operands the same matrix and the
diagonal masked; the positive sums are O(M * D) through class sums (fastclip.ops.positives). An anchor
with no positive (the only sample of its class in the batch) is left out of the mean; if no anchor has
one, the loss is 0 (with zero gradients).
"""

from __future__ import annotations

import torch

from fastclip.backends import resolve_loss_backend
from fastclip.ops._checks import accumulate_dtype, check_features, check_labels, one_value
from fastclip.ops.contrastive_gradient import attach_fused_gradient, loss_lse, supcon_terms, wants_gradient
from fastclip.ops.positives import class_ids, same_label_dots


def view_labels(num_rows: int, device: torch.device) -> torch.Tensor:
    """NT-Xent's labels for [view1; view2] rows: row i and row i + M/2 are the two views of one image."""
    if num_rows % 2:
        raise ValueError(
            f"features must have an even number of rows, two views stacked as [view1; view2], when labels is "
            f"None; got {num_rows} rows (pass labels for any other layout)"
        )
    return torch.arange(num_rows // 2, device=device).repeat(2)


def as_temperature_scale(temperature: torch.Tensor | float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1 / temperature as a one-element tensor; the temperature must be positive and finite. A Python
    number is inverted before it is rounded (to float64 beside float64 features, else float32)."""
    tensor, value = one_value("temperature", temperature, device, "the softmax temperature")
    if value is not None and not (0 < value < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {value}")
    if isinstance(temperature, torch.Tensor):
        return 1.0 / temperature
    return torch.full((), 1.0 / float(temperature), dtype=accumulate_dtype(dtype), device=device)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: torch.Tensor | float = 0.1,
    backend: str = "auto",
) -> torch.Tensor:
    """SupCon over `features` [M, D] with integer `labels` [M]; NT-Xent when `labels` is None.

    With `labels=None`, M must be even and rows i and i + M/2 are the positives of each other. Anchors
    without a positive are left out of the mean (see the module docstring). Returns an fp32 scalar
    (float64 for float64 features), differentiable in `features` (and `temperature` if it is a tensor).
    """
    check_features(features, features, ("features", "features"))
    device = features.device
    labels = (
        view_labels(features.shape[0], device)
        if labels is None
        else check_labels("labels", labels, features.shape[0], device)
    )
    scale = as_temperature_scale(temperature, device, features.dtype)
    backend = resolve_loss_backend(backend, device, features.dtype)
    # The value from detached inputs (unchanged arithmetic); the gradient from one fused backward that
    # folds the positives in before its one rounding (fastclip.ops.contrastive_gradient).
    detached = features.detach()
    # A view as the second operand: torch.compile cannot trace one tensor passed twice to an autograd.Function.
    differentiable = wants_gradient(features, scale)
    row_lse, col_lse, kept = loss_lse(detached, detached.view_as(detached), scale.detach(), backend, 0, differentiable)
    value = supcon_loss_share(detached, detached, scale.detach(), row_lse, labels, offset=0)
    terms = lambda: supcon_terms(labels, row_lse.dtype)  # noqa: E731
    return attach_fused_gradient(value, features, None, scale, row_lse, col_lse, terms, backend, kept)


def supcon_loss_share(
    anchors: torch.Tensor,
    features: torch.Tensor,
    scale: torch.Tensor,
    row_lse: torch.Tensor,
    labels: torch.Tensor,
    *,
    offset: int,
) -> torch.Tensor:
    """The share of the SupCon loss owed to anchors offset..offset+n of the M rows of `features`.

    `row_lse` [n] are the anchors' masked log-sum-exps (contrastive_lse with masked_diagonal=offset) and
    `labels` [M] the whole batch's (int64). The mean runs over the anchors of the whole batch that have
    a positive, so the shares of all ranks add up to the loss.
    """
    n = anchors.shape[0]
    acc = torch.promote_types(accumulate_dtype(anchors.dtype), row_lse.dtype)
    ids, counts = class_ids(labels)
    positives = counts[ids] - 1  # |P(i)| for every row of the batch: its class minus itself
    anchor_ids, anchor_positives = ids[offset : offset + n], positives[offset : offset + n]
    # sum over p in P(i) of <f_i, f_p>: the class sum minus the anchor itself
    dots = same_label_dots(anchors, features, anchor_ids, ids, acc) - (anchors.to(acc) ** 2).sum(1)
    has_positive = anchor_positives > 0
    # clamp: anchors without positives are dropped by the where, but 0/0 would poison their gradient
    per_anchor = row_lse.to(acc) - scale.to(acc).reshape(()) * dots / anchor_positives.clamp(min=1)
    kept = (positives > 0).sum().clamp(min=1)
    return torch.where(has_positive, per_anchor, torch.zeros_like(per_anchor)).sum() / kept

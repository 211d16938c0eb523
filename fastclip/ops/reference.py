"""The plain PyTorch math every fast path is tested against: logits materialised, no tricks.

Computed in float64 when given float64 inputs (the tests upcast), else in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    return logit_scale * (image.to(dtype) @ text.to(dtype).T)  # (n, N)


def contrastive_lse_reference(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of S = s * image @ text.T: shapes (n,) and (N,)."""
    logits = _logits(image, text, logit_scale)
    return logits.logsumexp(1), logits.logsumexp(0)


def _soft_targets(labels: torch.Tensor | None, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Row-stochastic targets: uniform over the pairs with the row's label (the identity without labels)."""
    if labels is None:
        return torch.eye(n, dtype=dtype, device=device)
    same = (labels[:, None] == labels[None, :]).to(dtype)
    return same / same.sum(1, keepdim=True)


def contrastive_loss_reference(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    labels: torch.Tensor | None = None,
    *,
    weight: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """CLIP's symmetric loss: weight * CE(image->text) + (1 - weight) * CE(text->image), mean over the batch;
    with `labels` every equal-label pair is a positive (cross-entropy against soft targets)."""
    logits = _logits(image, text, logit_scale)
    targets = _soft_targets(labels, logits.shape[0], logits.device, logits.dtype)  # symmetric, as are its columns
    per_image = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    per_text = F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing)
    return weight * per_image + (1.0 - weight) * per_text


def supcon_loss_reference(features: torch.Tensor, labels: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Khosla et al.'s L_out, written from the formula: anchors without positives leave the mean."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(dtype)
    m = f.shape[0]
    if labels is None:
        labels = torch.arange(m // 2, device=f.device).repeat(2)
    self_mask = torch.eye(m, dtype=torch.bool, device=f.device)
    logits = (f @ f.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / count.clamp(min=1)
    kept = count > 0
    if not kept.any():
        return (f * 0).sum()
    return per_anchor[kept].mean()


def sigmoid_loss_reference(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP: -(1/N) sum_ij log sigmoid(z_ij * (s <x_i, y_j> + b)), z = +1 on positives, -1 elsewhere."""
    logits = _logits(image, text, logit_scale) + logit_bias
    positive = _soft_targets(labels, logits.shape[0], logits.device, logits.dtype) > 0
    z = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


def naive_clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    weight: float = 0.5,
    label_smoothing: float = 0.0,
    scale_logits: bool = False,
) -> torch.Tensor:
    """CLIP's loss as written without fastclip (open_clip's ClipLoss): the N x N logits materialised in the
    input dtype, cross-entropy over rows and columns in float32, as autocast runs it. Unlike the references
    above it keeps the input dtype: it is the baseline that benchmarks time and low-precision tests bound by.

    The logits are `logit_scale * image @ text.T` (the scale on the image features, open_clip's order);
    `scale_logits=True` multiplies `image @ text.T` by the scale cast to the input dtype instead.
    """
    if scale_logits:
        logits = (image @ text.T) * logit_scale.to(image.dtype)
    else:
        logits = logit_scale * image @ text.T
    target = torch.arange(logits.shape[0], device=logits.device)
    # one float32 copy per direction, as a user's code makes them (the benchmarks measure its memory)
    per_image = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    per_text = F.cross_entropy(logits.float().T, target, label_smoothing=label_smoothing)
    return weight * per_image + (1.0 - weight) * per_text

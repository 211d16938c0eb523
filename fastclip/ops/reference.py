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


def contrastive_loss_reference(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    weight: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """CLIP's symmetric loss: weight * CE(image->text) + (1 - weight) * CE(text->image), mean over the batch."""
    logits = _logits(image, text, logit_scale)
    target = torch.arange(logits.shape[0], device=logits.device)
    per_image = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    per_text = F.cross_entropy(logits.T, target, label_smoothing=label_smoothing)
    return weight * per_image + (1.0 - weight) * per_text

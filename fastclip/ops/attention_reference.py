"""The plain math every attention path is tested against: scores materialised, no tricks.

    out = softmax(q @ k^T * scale + masks) @ v

Computed in the inputs' dtype (the tests upcast to float64 for the reference, and run it in fp16/bf16
for the "same-dtype plain PyTorch" error that low-precision tolerances are measured against).
Conventions shared with every backend: causal is top-left (key j visible to query i iff j <= i, as
SDPA's `is_causal`); `key_padding_mask` [batch, seq_k] is True where a key is padding (ignored);
`lengths` [batch] hides every key and query at or past a sequence's length; a row with no visible key
gets output 0, log-sum-exp -inf and zero gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from fastclip.ops.attention_masks import visible_keys


def attention_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked scores (-inf where hidden) [B, H, Sq, Sk] and the rows that see any key [B or 1, 1, Sq, 1]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    visible = visible_keys(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device, lengths)
    if visible is None:
        return scores, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores, visible.any(-1, keepdim=True)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **masks: Any) -> torch.Tensor:
    """softmax(q k^T * scale + masks) v for q [B, H, Sq, D], k and v [B, H, Sk, D]; differentiable.
    `masks`: causal, key_padding_mask, scale, lengths, as `attention_scores_reference` takes them."""
    scores, has_key = attention_scores_reference(q, k, **masks)
    # An empty row would softmax to NaN: give it finite scores, then zero its probabilities, so neither
    # the output nor any gradient sees a NaN.
    probs = scores.masked_fill(~has_key, 0.0).softmax(-1).masked_fill(~has_key, 0.0)  # (B, H, Sq, Sk)
    return probs @ v


def attention_lse_reference(q: torch.Tensor, k: torch.Tensor, **masks: Any) -> torch.Tensor:
    """log sum_j exp(score_ij) over the visible keys [B, H, Sq]; -inf for a row with none (`masks` as above)."""
    scores, has_key = attention_scores_reference(q, k, **masks)
    lse = scores.masked_fill(~has_key, 0.0).logsumexp(-1)  # finite first, so the gradient has no NaN
    return lse.masked_fill(~has_key[..., 0], float("-inf"))

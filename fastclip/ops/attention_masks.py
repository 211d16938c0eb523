"""Which keys each query may attend to, from fastclip's mask conventions (see `fastclip.ops.attention`)."""

from __future__ import annotations

import torch


def visible_keys(
    seq_q: int,
    seq_k: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean [batch or 1, 1, seq_q or 1, seq_k] mask, True where query i may attend to key j; None = all."""
    visible = None
    if causal:
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()  # (Sq, Sk)
    if key_padding_mask is not None:
        keys = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
        visible = keys if visible is None else keys & visible
    if lengths is not None:
        ends = lengths[:, None, None, None]  # (B, 1, 1, 1)
        inside = (torch.arange(seq_q, device=device)[:, None] < ends) & (torch.arange(seq_k, device=device) < ends)
        visible = inside if visible is None else inside & visible  # (B, 1, Sq, Sk)
    return visible

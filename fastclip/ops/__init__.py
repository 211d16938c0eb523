"""fastclip's operators: each dispatches to a fused kernel (CUDA, Triton or C++) or PyTorch (`backend=`)."""

from fastclip.ops.attention import attention
from fastclip.ops.contrastive_lse import contrastive_lse
from fastclip.ops.contrastive_loss import contrastive_loss, contrastive_loss_from_lse

__all__ = ["attention", "contrastive_lse", "contrastive_loss", "contrastive_loss_from_lse"]

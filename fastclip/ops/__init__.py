"""fastclip's operators: each dispatches to a CUDA kernel, a C++ CPU kernel or PyTorch (`backend=`)."""

from fastclip.ops.contrastive_lse import contrastive_lse
from fastclip.ops.contrastive_loss import contrastive_loss, contrastive_loss_from_lse

__all__ = ["contrastive_lse", "contrastive_loss", "contrastive_loss_from_lse"]

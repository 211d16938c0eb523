"""fastclip's operators as functions (as `torch.nn.functional` is to `torch.nn`).

Each dispatches to a fused kernel (CUDA, Triton or C++) or to PyTorch (`backend=`, see `fastclip.backends`).
The implementations live one op per module in `fastclip.ops`.
"""

from fastclip.ops.attention import attention, attention_packed
from fastclip.ops.contrastive_loss import contrastive_loss, contrastive_loss_from_lse
from fastclip.ops.contrastive_lse import contrastive_lse
from fastclip.ops.pairwise_sigmoid import pairwise_sigmoid
from fastclip.ops.sigmoid_loss import sigmoid_loss, sigmoid_loss_share
from fastclip.ops.supcon_loss import supcon_loss, supcon_loss_share

__all__ = [
    "attention",
    "attention_packed",
    "contrastive_loss",
    "contrastive_loss_from_lse",
    "contrastive_lse",
    "pairwise_sigmoid",
    "sigmoid_loss",
    "sigmoid_loss_share",
    "supcon_loss",
    "supcon_loss_share",
]

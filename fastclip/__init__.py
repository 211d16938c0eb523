"""fastclip: CLIP for PyTorch, built for speed and memory."""

from fastclip.checkpoint import save_checkpoint
from fastclip.environment import info
from fastclip.functional import attention, contrastive_loss, sigmoid_loss, supcon_loss
from fastclip.loss import ClipLoss, SigLipLoss, SupConLoss
from fastclip.model import CLIP, create_model, create_model_and_transforms, list_models, load_checkpoint
from fastclip.tokenizer import ClipTokenizer, get_tokenizer, tokenize
from fastclip.version import __version__

__all__ = [
    "CLIP",
    "ClipLoss",
    "ClipTokenizer",
    "SigLipLoss",
    "SupConLoss",
    "__version__",
    "attention",
    "contrastive_loss",
    "create_model",
    "create_model_and_transforms",
    "get_tokenizer",
    "info",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
    "sigmoid_loss",
    "supcon_loss",
    "tokenize",
]

"""fastclip: CLIP for PyTorch, built for speed and memory."""

from fastclip.info import info
from fastclip.ops import contrastive_loss
from fastclip.version import __version__

__all__ = ["__version__", "contrastive_loss", "info"]

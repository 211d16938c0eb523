"""CLIP's image preprocessing with Pillow and torch (no torchvision: its wheels pull a CUDA PyTorch).

Evaluation preprocessing is OpenAI's: bicubic resize of the short side to the model's resolution,
center crop, RGB in [0, 1], then normalisation by CLIP's per-channel mean and std.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB; unreadable or non-image files raise ValueError naming the file."""
    is_path = isinstance(path, (str, os.PathLike))
    if not is_path and not hasattr(path, "read"):
        raise TypeError(
            f"path must be a file path (str or os.PathLike) or a binary file object, got {type(path).__name__}"
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes now, so a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        name = os.fspath(path) if is_path else getattr(path, "name", repr(path))
        raise ValueError(f"cannot read image {name!r}: {error}") from error


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to `short_side`, keeping the aspect ratio."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centered size x size crop (rounded like torchvision's CenterCrop)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class CLIPPreprocess:
    """Callable preprocessing: PIL image or uint8 tensor [3, H, W] / [B, 3, H, W] -> normalised float tensor."""

    def __init__(self, image_size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            pixels = self._pil_to_uint8(image)  # (3, size, size)
        elif isinstance(image, torch.Tensor):
            pixels = self._resize_and_crop_tensor(image)
        else:
            raise TypeError(f"image must be a PIL.Image.Image or a uint8 torch.Tensor, got {type(image).__name__}")
        return (pixels.float() / 255.0 - self.mean) / self.std

    def _pil_to_uint8(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        height, width = resized_size(image.height, image.width, self.image_size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        top, left = crop_box(height, width, self.image_size)
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1)  # (3, size, size)

    def _resize_and_crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 in [0, 255], got {image.dtype}")
        if image.dim() not in (3, 4) or image.shape[-3] not in (1, 3):
            raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W] (or 1 channel), got {tuple(image.shape)}")
        if image.shape[-2] == 0 or image.shape[-1] == 0:
            raise ValueError(f"image tensor is empty: {tuple(image.shape)}")
        batched = image if image.dim() == 4 else image[None]
        batched = batched.expand(-1, 3, -1, -1)  # grey -> RGB, like PIL's convert("RGB")
        height, width = resized_size(batched.shape[-2], batched.shape[-1], self.image_size)
        # Antialiased bicubic, as Pillow does when shrinking; rounded back to uint8 like a decoded image.
        resized = F.interpolate(batched.float(), size=(height, width), mode="bicubic", antialias=True)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        top, left = crop_box(height, width, self.image_size)
        cropped = resized[..., top : top + self.image_size, left : left + self.image_size]
        return cropped if image.dim() == 4 else cropped[0]

    def __repr__(self) -> str:
        return f"CLIPPreprocess(image_size={self.image_size}, bicubic short-side resize, center crop, CLIP mean/std)"

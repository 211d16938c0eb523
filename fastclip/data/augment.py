"""Training augmentation: random resized crop (bicubic) + colour jitter + CLIP normalisation.

Pillow and torch only (no torchvision). Randomness comes from torch's global RNG, or from a
`generator` passed per call, so `torch.manual_seed` makes a run reproducible.

Why colour jitter: with random crops alone, the pixels' colour statistics survive every augmentation,
so the image tower can lean on them instead of on content; jittering brightness, contrast, saturation
and (a little) hue breaks that shortcut. Hue is kept small by default because captions name colours
("a red circle"): a large hue rotation would turn a red shape orange and make its caption wrong.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image

from fastclip.data.transforms import CLIP_MEAN, CLIP_STD

# ITU-R BT.601 luma weights, as Pillow's convert("L") and torchvision's rgb_to_grayscale use them.
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue rotation is a rotation of the (I, Q) chroma plane, one 3x3 matrix for the whole image.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    if len(value) != 2 or not low < value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a pair (min, max) with {low} < min <= max <= {high}, got {value!r}")
    return float(value[0]), float(value[1])


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator).item())


def crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random crop: torchvision's RandomResizedCrop rule.

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; after 10 misses (the crop
    does not fit), the largest centred crop whose aspect ratio is clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return _randint(height - crop_h, generator), _randint(width - crop_w, generator), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    crop_h, crop_w = max(1, crop_h), max(1, crop_w)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def colour_jitter(
    pixels: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """Jitter a float image [3, H, W] in [0, 1] by the given factors (1, 1, 1, 0 = unchanged); result in [0, 1].

    brightness scales, contrast blends with the mean grey level, saturation blends with the grey image,
    hue rotates the chroma plane by `hue` turns. Applied in this fixed order, clamped once at the end.
    """
    luma = torch.tensor(_LUMA, dtype=pixels.dtype).view(3, 1, 1)
    out = pixels * brightness
    mean = (out * luma).sum(0).mean()
    out = (out - mean) * contrast + mean
    grey = (out * luma).sum(0, keepdim=True)  # (1, H, W)
    out = grey + (out - grey) * saturation
    if hue != 0.0:
        angle = 2 * math.pi * hue
        cos, sin = math.cos(angle), math.sin(angle)
        rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=torch.float64)
        matrix = (_YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ).to(pixels.dtype)  # (3, 3)
        out = (matrix @ out.reshape(3, -1)).reshape(out.shape)  # (3, H, W)
    return out.clamp_(0.0, 1.0)


class TrainTransform:
    """Callable: PIL image or uint8 tensor [3, H, W] -> float tensor [3, image_size, image_size], normalised.

    Random resized crop (area fraction in `scale`, aspect ratio in `ratio`, bicubic), then colour jitter
    with brightness, contrast and saturation factors uniform in [1 - jitter, 1 + jitter] and a hue
    rotation uniform in [-hue, hue] turns (default hue = jitter / 10), then CLIP mean/std.
    `jitter=0` disables the colour jitter. Pass `generator=` to a call to draw from it instead of the
    global torch RNG.
    """

    def __init__(
        self,
        image_size: int,
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.4,
        hue: float | None = None,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1] (0 disables colour jitter), got {jitter!r}")
        hue = jitter / 10 if hue is None else hue
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] turns, got {hue!r}")
        self.image_size = image_size
        self.scale = _check_range("scale", tuple(scale), 0.0, 1.0)
        self.ratio = _check_range("ratio", tuple(ratio), 0.0, math.inf)
        self.jitter, self.hue = float(jitter), float(hue)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(image, Image.Image):
            pixels = self._crop_pil(image, generator)
        elif isinstance(image, torch.Tensor):
            pixels = self._crop_tensor(image, generator)
        else:
            raise TypeError(f"image must be a PIL.Image.Image or a uint8 torch.Tensor, got {type(image).__name__}")
        out = pixels.float().div_(255.0)  # (3, R, R) in [0, 1]
        if self.jitter > 0 or self.hue > 0:
            low, high = 1.0 - self.jitter, 1.0 + self.jitter
            factors = [_uniform(low, high, generator) for _ in range(3)]
            out = colour_jitter(out, *factors, hue=_uniform(-self.hue, self.hue, generator))
        return (out - self.mean) / self.std

    def _crop_pil(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        image = image.convert("RGB")
        top, left, height, width = crop_params(image.height, image.width, self.scale, self.ratio, generator)
        size = self.image_size
        # resize(box=...) crops and resamples in one pass, antialiased when shrinking.
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(size, size, 3).permute(2, 0, 1)  # (3, R, R)

    def _crop_tensor(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 in [0, 255], got {image.dtype}")
        if image.dim() != 3 or image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"image tensor must be [3, H, W] (or 1 channel) and non-empty, got {tuple(image.shape)}")
        top, left, height, width = crop_params(image.shape[1], image.shape[2], self.scale, self.ratio, generator)
        crop = image[None, :, top : top + height, left : left + width].expand(-1, 3, -1, -1)  # (1, 3, h, w)
        size = (self.image_size, self.image_size)
        resized = F.interpolate(crop.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        return resized[0].round_().clamp_(0, 255)  # rounded like a decoded image, as CLIPPreprocess does

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"jitter={self.jitter}, hue={self.hue})"
        )

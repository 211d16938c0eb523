"""CLIP's evaluation preprocessing: sizes, crop position, normalisation, PIL/tensor agreement, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data import CLIP_MEAN, CLIP_STD, CLIPPreprocess, load_image


def gradient_image(height: int, width: int) -> np.ndarray:
    """A smooth RGB image (H, W, 3) uint8: resampling differences stay at rounding level."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    return (np.stack([255 * x * y, 255 * x * (1 - y), 255 * (1 - x) * y], axis=-1)).astype(np.uint8)


@pytest.mark.parametrize(
    "height, width, size", [(300, 500, 224), (500, 300, 224), (224, 224, 224), (17, 31, 8), (1, 3, 1)]
)
def test_output_shape_and_dtype(height: int, width: int, size: int) -> None:
    preprocess = CLIPPreprocess(size)
    pixels = gradient_image(height, width)
    from_pil = preprocess(Image.fromarray(pixels))
    from_tensor = preprocess(torch.from_numpy(pixels).permute(2, 0, 1))
    assert from_pil.shape == from_tensor.shape == (3, size, size)
    assert from_pil.dtype == from_tensor.dtype == torch.float32


def test_constant_image_gives_exact_normalised_values() -> None:
    color = (200, 30, 120)
    image = Image.new("RGB", (640, 480), color)
    out = CLIPPreprocess(224)(image)
    want = [(c / 255 - m) / s for c, m, s in zip(color, CLIP_MEAN, CLIP_STD)]
    for channel in range(3):
        torch.testing.assert_close(out[channel], torch.full((224, 224), want[channel]), atol=1e-6, rtol=0)


def test_center_crop_keeps_the_middle() -> None:
    """A wide image: white in the central square, black on the sides that the crop must remove."""
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, 100:200] = 255
    out = CLIPPreprocess(50)(Image.fromarray(pixels))
    white = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    for channel in range(3):  # the crop is exactly the white square, up to bicubic ringing at its edge
        assert out[channel, :, 2:-2].min() > white[channel] - 0.05


def test_pil_and_tensor_paths_agree() -> None:
    pixels = gradient_image(333, 517)
    preprocess = CLIPPreprocess(224)
    from_pil = preprocess(Image.fromarray(pixels))
    from_tensor = preprocess(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    difference = (from_pil - from_tensor).abs()
    one_level = 1 / 255 / min(CLIP_STD)  # one uint8 step after normalisation
    assert difference.max() <= one_level + 1e-6 and difference.mean() < 0.1 * one_level


def test_batched_tensor_and_grayscale() -> None:
    pixels = torch.from_numpy(gradient_image(64, 80)).permute(2, 0, 1)
    preprocess = CLIPPreprocess(32)
    batch = preprocess(torch.stack([pixels, pixels.flip(-1)]))
    assert batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch[0], preprocess(pixels))
    gray = preprocess(pixels[:1])
    assert gray.shape == (3, 32, 32)
    grey_pil = preprocess(Image.fromarray(pixels[0].numpy(), mode="L"))
    assert (gray - grey_pil).abs().max() <= 1 / 255 / min(CLIP_STD) + 1e-6


def test_statistics_of_a_natural_like_image() -> None:
    """Random uint8 noise has per-channel mean 127.5/255: the output mean is (0.5 - mean) / std."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    out = CLIPPreprocess(256)(Image.fromarray(noise))  # no resize: pixels pass through exactly
    for channel in range(3):
        expected_mean = (noise[..., channel].mean() / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert out[channel].mean().item() == pytest.approx(expected_mean, abs=1e-5)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (torch.zeros(3, 8, 8), TypeError, "uint8"),
        (torch.zeros(8, 8, dtype=torch.uint8), ValueError, r"\[3, H, W\]"),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), ValueError, r"\[3, H, W\]"),
        (torch.zeros(3, 0, 8, dtype=torch.uint8), ValueError, "empty"),
        (np.zeros((8, 8, 3)), TypeError, "PIL.Image.Image or a uint8 torch.Tensor"),
    ],
)
def test_bad_images_raise(image, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        CLIPPreprocess(8)(image)


def test_bad_image_size() -> None:
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        CLIPPreprocess(0)


def test_load_image(tmp_path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(gradient_image(10, 12)).convert("RGBA").save(good)
    assert load_image(good).mode == "RGB" and load_image(good).size == (12, 10)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        load_image(broken)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read image .*truncated.png"):
        load_image(truncated)
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        load_image(tmp_path / "missing.png")

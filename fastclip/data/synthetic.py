"""`SyntheticShapes`: captioned images of coloured shapes, generated on the fly (no download).

Each image is one shape (COLOURS x SHAPES), small or large, on the left/right/top/bottom/center, over
a noisy or textured background of a clearly different colour; its caption names the colour and the
shape, and often the size and position ("a large blue square at the top"). Item i is determined by
(seed, split, i) alone, so any worker, any run, any order produces the same sample.

Compositional held-out test: the (colour, shape) pairs in HELDOUT_PAIRS never occur in
split="train" (every colour and every shape still does, with other partners); split="heldout"
produces only them, and split="test" any pair from its own seed stream. A model that learnt
"colour" and "shape" as separate concepts classifies the held-out pairs zero-shot above chance.

`extra_colours=True` (split="train" only) also draws every shape in the EXTRA_COLOURS, colours that no
evaluation class names: each shape is then seen in more colours (10-12 instead of 6-8), which teaches the
image tower a shape that does not depend on the colour, so that the held-out pairs compose. The held-out
pairs still never occur; the 40 evaluation classes (`class_names()`) are unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Training-only colours (extra_colours=True): every shape in each of them, never an evaluation class. Each is
# at least 94 (RGB distance) from every colour above, beyond the +-15 per channel that a shape's colour varies.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "cyan": (40, 200, 210),
    "pink": (250, 130, 200),
    "brown": (130, 80, 30),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS: dict[str, tuple[float, float, str]] = {  # name: (x, y) centre as a fraction of the side, phrase
    "left": (0.27, 0.5, "on the left"),
    "right": (0.73, 0.5, "on the right"),
    "top": (0.5, 0.27, "at the top"),
    "bottom": (0.5, 0.73, "at the bottom"),
    "center": (0.5, 0.5, "in the center"),
}
SIZES = {"small": 0.12, "large": 0.21}  # shape radius as a fraction of the side
# 7 of the 40 pairs (17.5%); each colour at most once, each shape at most twice (black with none).
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "square"),
    ("yellow", "star"),
    ("purple", "circle"),
    ("orange", "triangle"),
    ("white", "cross"),
)
TEMPLATES = (
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "a photo of a {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "{size} {colour} {shape}, {where}",
)
SPLITS = {"train": 0, "test": 1, "heldout": 2}  # the split's id is part of every item's seed
_AN = re.compile(r"\b(a) ([aeiou])")  # "a orange" -> "an orange"
_SUPERSAMPLE = 2  # shapes are drawn at 2x and averaged down: smooth edges for little cost


def class_names() -> list[str]:
    """Every colour-shape pair as "red circle", ...; index = colour index * len(SHAPES) + shape index."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def class_index(colour: str, shape: str) -> int:
    """Index of (colour, shape) in `class_names()`; an EXTRA_COLOURS pair gets an index after all of those
    (a training label only: no evaluation class)."""
    return list({**COLOURS, **EXTRA_COLOURS}).index(colour) * len(SHAPES) + SHAPES.index(shape)


def _pairs_of(split: str, extra_colours: bool = False) -> list[tuple[str, str]]:
    heldout = set(HELDOUT_PAIRS)
    every = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    if split == "train":
        extra = [(colour, shape) for colour in EXTRA_COLOURS for shape in SHAPES] if extra_colours else []
        return [pair for pair in every if pair not in heldout] + extra
    return list(HELDOUT_PAIRS) if split == "heldout" else every


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle, star or cross of circumradius `radius`, rotated by `angle`."""
    if shape == "square":
        points = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        scale = radius / math.sqrt(2)
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        scale = radius
    elif shape == "star":
        points = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in ((k, -math.pi / 2 + k * math.pi / 5) for k in range(10))
        ]
        scale = radius
    else:  # cross: a plus sign with arms a third of its width
        t = 1 / 3
        points = [
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
        ]
        scale = radius / math.hypot(1, t)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in points]


def _background(rng: np.random.Generator, size: int, avoid: tuple[int, int, int]) -> np.ndarray:
    """(size, size, 3) float: a base colour far from `avoid`, with pixel noise, blotches or stripes."""
    for _ in range(100):
        base = rng.uniform(0, 255, 3)
        if np.linalg.norm(base - avoid) > 150:  # "a different colour": well outside the shape's colour
            break
    kind = rng.integers(3)
    if kind == 0:  # pixel noise
        texture = rng.normal(0, rng.uniform(10, 35), (size, size, 3))
    elif kind == 1:  # blotches: coarse noise, upsampled
        cells = int(rng.integers(3, 9))
        coarse = rng.normal(0, 30, (cells, cells, 3))
        texture = np.kron(coarse, np.ones((-(-size // cells), -(-size // cells), 1)))[:size, :size]
    else:  # stripes at a random angle and period
        y, x = np.mgrid[0:size, 0:size]
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 16) * size / 64
        wave = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
        texture = (wave * rng.uniform(15, 35))[..., None] * np.ones(3)
    return base + texture


class SyntheticShapes(torch.utils.data.Dataset):
    """Map-style dataset of `num_samples` items `(image, caption)`; see the module doc.

    The image is `transform(PIL image)`, or a uint8 tensor [3, image_size, image_size] without a
    transform. `attributes(i)` gives item i's colour, shape, position, size, class index and caption
    without drawing it.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        *,
        seed: int = 0,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        extra_colours: bool = False,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.num_samples, self.image_size, self.seed, self.split = num_samples, image_size, seed, split
        if extra_colours and split != "train":
            raise ValueError(f"extra_colours is for split='train' only (no evaluation class names them), got {split!r}")
        self.transform, self.extra_colours = transform, bool(extra_colours)
        self._pairs = _pairs_of(split, self.extra_colours)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def _draw_attributes(self, rng: np.random.Generator) -> dict[str, Any]:
        # Drawn first, from the same generator the image then uses: attributes() and [] always agree.
        colour, shape = self._pairs[rng.integers(len(self._pairs))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        caption = _AN.sub(
            r"\1n \2", template.format(colour=colour, shape=shape, size=size, where=POSITIONS[position][2])
        )
        return {
            "colour": colour,
            "shape": shape,
            "position": position,
            "size": size,
            "class_index": class_index(colour, shape),
            "caption": caption,
        }

    def attributes(self, index: int) -> dict[str, Any]:
        """Item `index`'s colour, shape, position, size, class_index (into `class_names()`) and caption."""
        return self._draw_attributes(self._rng(index))

    def label_of(self, index: int) -> int:
        """Item `index`'s class index into `class_names()`."""
        return self.attributes(index)["class_index"]

    def render(self, index: int) -> tuple[Image.Image, str]:
        """Item `index` as an RGB PIL image and its caption."""
        rng = self._rng(index)
        attributes = self._draw_attributes(rng)
        side = self.image_size
        rgb = {**COLOURS, **EXTRA_COLOURS}[attributes["colour"]]
        colour = np.clip(np.array(rgb) + rng.integers(-15, 16, 3), 0, 255)
        background = _background(rng, side, rgb)
        x, y, _ = POSITIONS[attributes["position"]]
        radius = SIZES[attributes["size"]] * rng.uniform(0.85, 1.15) * side
        cx, cy = (x + rng.uniform(-0.05, 0.05)) * side, (y + rng.uniform(-0.05, 0.05)) * side
        # A coverage mask drawn at 2x then averaged down, so that edges are antialiased.
        big = side * _SUPERSAMPLE
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        s = _SUPERSAMPLE
        if attributes["shape"] == "circle":
            draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=255)
        else:
            angle = rng.uniform(-0.35, 0.35)  # a small tilt: still clearly the named shape
            draw.polygon(
                [(px * s, py * s) for px, py in _polygon(attributes["shape"], cx, cy, radius, angle)], fill=255
            )
        alpha = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0  # (side, side, 1)
        pixels = background * (1.0 - alpha) + colour * alpha
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return image, attributes["caption"]

    def __getitem__(self, index: int) -> tuple[Any, str]:
        image, caption = self.render(index)
        if self.transform is not None:
            return self.transform(image), caption
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous(), caption

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes({self.num_samples}, image_size={self.image_size}, seed={self.seed}, "
            f"split={self.split!r}, {len(self._pairs)} colour-shape pairs"
            + (", extra colours)" if self.extra_colours else ")")
        )

"""`ImageFolder`: the images under a folder, with one sub-folder per class or without classes.

    root/cat/1.jpg, root/dog/2.png   -> classes ["cat", "dog"], targets [0, 1]  (sorted sub-folder names)
    root/1.jpg, root/2.png           -> classes None, targets None             (predictions only)

Files are found recursively inside each class folder; a folder with images both at its top level and in
class sub-folders is ambiguous and raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastclip.data.transforms import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


class ImageFolder(torch.utils.data.Dataset):
    """Dataset of (transformed image, target) pairs; the target is -1 when the folder has no classes."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {os.fspath(root)!r} does not exist or is not a directory")
        self.transform = transform
        top_level = sorted(p for p in self.root.iterdir() if is_image_file(p))
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = [(d.name, _images_under(d)) for d in class_dirs]
        per_class = [(name, files) for name, files in per_class if files]
        if top_level and per_class:
            raise ValueError(
                f"image folder {os.fspath(root)!r} has images both at its top level and in sub-folders "
                f"({', '.join(name for name, _ in per_class[:3])}, ...): use one sub-folder per class, or none"
            )
        if per_class:
            self.classes: list[str] | None = [name for name, _ in per_class]
            self.paths = [path for _, files in per_class for path in files]
            self.targets: list[int] | None = [i for i, (_, files) in enumerate(per_class) for _ in files]
        else:
            self.classes, self.targets, self.paths = None, None, top_level
        if not self.paths:
            raise ValueError(
                f"image folder {os.fspath(root)!r} contains no images (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, (self.targets[index] if self.targets is not None else -1)

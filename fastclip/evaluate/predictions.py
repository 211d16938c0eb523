"""Per-image prediction views: the top-5 labels with probabilities and the rank of the true label.

The CLIP paper shows predictions this way (its figure 21): each image beside a bar chart of its five most
probable labels, the true label in green, with "correct label: X, ranked N out of C" above it.
`format_prediction` writes the same thing as text for the terminal; `save_gallery` draws the PNG.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastclip.data.transforms import load_image


@dataclasses.dataclass
class Prediction:
    image: Path
    labels: list[str]  # the top-k labels, most probable first
    probabilities: list[float]  # their probabilities
    target: str | None  # the true label, None when unknown
    rank: int | None  # 1-based rank of the true label among all classes (1 = predicted), None when unknown
    num_classes: int

    @property
    def correct(self) -> bool:
        return self.rank == 1

    def to_dict(self, root: str | os.PathLike | None = None) -> dict[str, Any]:
        image = self.image.relative_to(root) if root is not None and self.image.is_relative_to(root) else self.image
        out: dict[str, Any] = {
            "image": os.fspath(image),
            "top_k": [{"label": label, "probability": p} for label, p in zip(self.labels, self.probabilities)],
        }
        if self.target is not None:
            out.update(target=self.target, rank=self.rank, num_classes=self.num_classes)
        return out


def top_predictions(
    probabilities: torch.Tensor,
    classnames: Sequence[str],
    images: Sequence[str | os.PathLike],
    targets: Sequence[int] | torch.Tensor | None = None,
    *,
    k: int = 5,
) -> list[Prediction]:
    """One `Prediction` per row of `probabilities` [N, C] (class probabilities of image N).

    The rank counts the classes strictly more probable than the true one, plus one.
    """
    probabilities = torch.as_tensor(probabilities).float().cpu()
    if probabilities.dim() != 2 or probabilities.shape[1] != len(classnames):
        raise ValueError(
            f"probabilities must be [N, {len(classnames)}] (one column per class name), "
            f"got {tuple(probabilities.shape)}"
        )
    if len(images) != probabilities.shape[0]:
        raise ValueError(f"images must name one file per row ({probabilities.shape[0]}), got {len(images)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values, indices = probabilities.topk(min(k, len(classnames)), dim=1)  # (N, k)
    ranks = None
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.int64).cpu()
        if targets.shape != (probabilities.shape[0],):
            raise ValueError(f"targets must be [{probabilities.shape[0]}], got {tuple(targets.shape)}")
        true = probabilities.gather(1, targets[:, None])  # (N, 1)
        ranks = ((probabilities > true).sum(1) + 1).tolist()
    return [
        Prediction(
            image=Path(images[i]),
            labels=[classnames[j] for j in indices[i].tolist()],
            probabilities=values[i].tolist(),
            target=classnames[int(targets[i])] if targets is not None else None,
            rank=ranks[i] if ranks is not None else None,
            num_classes=len(classnames),
        )
        for i in range(probabilities.shape[0])
    ]


def format_prediction(prediction: Prediction, root: str | os.PathLike | None = None, bar_width: int = 20) -> str:
    """Text view: the image, the true label and its rank, then one line per top label with a bar."""
    name = prediction.to_dict(root)["image"]
    lines = [
        name
        if prediction.target is None
        else f"{name}  correct label: {prediction.target}, ranked {prediction.rank} out of {prediction.num_classes}"
    ]
    width = max(len(label) for label in prediction.labels)
    for i, (label, p) in enumerate(zip(prediction.labels, prediction.probabilities), start=1):
        bar = "#" * round(p * bar_width)
        mark = "  <- correct" if label == prediction.target else ""
        lines.append(f"  {i}. {label:<{width}} {100 * p:5.1f}% {bar}{mark}".rstrip())
    return "\n".join(lines)


def pick_gallery(predictions: Sequence[Prediction], count: int, seed: int = 0) -> list[Prediction]:
    """Up to `count` predictions spread over the true classes (round-robin, random within a class)."""
    by_class: dict[str | None, list[Prediction]] = {}
    for prediction in predictions:
        by_class.setdefault(prediction.target, []).append(prediction)
    rng = random.Random(seed)
    queues = []
    for target in sorted(by_class, key=str):
        members = list(by_class[target])
        rng.shuffle(members)
        queues.append(members)
    chosen: list[Prediction] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def save_gallery(
    predictions: Sequence[Prediction], path: str | os.PathLike, *, columns: int = 2, title: str | None = None
) -> Path:
    """Save a PNG grid: each image beside a horizontal bar chart of its top labels; returns the path."""
    if not predictions:
        raise ValueError("save_gallery needs at least one prediction")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(columns, len(predictions))
    rows = -(-len(predictions) // columns)
    figure = Figure(figsize=(4.6 * columns, 1.9 * rows + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, 2 * columns, width_ratios=[1.0, 1.5] * columns, wspace=0.35, hspace=0.75)
    for n, prediction in enumerate(predictions):
        row, column = divmod(n, columns)
        image_axes = figure.add_subplot(grid[row, 2 * column])
        bar_axes = figure.add_subplot(grid[row, 2 * column + 1])
        _draw_image(image_axes, prediction)
        _draw_bars(bar_axes, prediction)
    if title:
        figure.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path


def _draw_image(axes: Any, prediction: Prediction) -> None:
    try:
        pixels = np.asarray(load_image(prediction.image))
    except ValueError:  # the file changed since it was encoded: draw a blank tile rather than fail the run
        pixels = np.full((8, 8, 3), 255, dtype=np.uint8)
    # Small images (digits, icons) stay crisp instead of being smoothed into blurs.
    axes.imshow(pixels, interpolation="nearest" if max(pixels.shape[:2]) < 128 else "antialiased")
    axes.set_xticks([])
    axes.set_yticks([])
    if prediction.target is not None:
        colour = "tab:green" if prediction.correct else "tab:red"
        axes.set_title(
            f"{prediction.target}\nrank {prediction.rank}/{prediction.num_classes}", fontsize=8, color=colour
        )


def _draw_bars(axes: Any, prediction: Prediction) -> None:
    positions = np.arange(len(prediction.labels))
    colours = ["tab:green" if label == prediction.target else "tab:blue" for label in prediction.labels]
    percents = [100 * p for p in prediction.probabilities]
    axes.barh(positions, percents, color=colours, height=0.7)
    for position, percent in zip(positions, percents):
        axes.text(min(percent, 70) + 2, position, f"{percent:.1f}%", va="center", fontsize=6)
    axes.set_yticks(positions, [_shorten(label) for label in prediction.labels], fontsize=7)
    axes.invert_yaxis()  # the most probable label on top
    axes.set_xlim(0, 100)
    axes.set_xticks([0, 50, 100], ["0", "50", "100%"], fontsize=7)
    axes.spines[["top", "right"]].set_visible(False)


def _shorten(label: str, limit: int = 22) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"

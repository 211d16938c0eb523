"""Image-caption pairs: open_clip's CSV/TSV dataset, and the collate function that batches pairs.

A sample is `(image: float tensor [3, R, R], caption: str)`, or `(image, caption, label: int)` for
label-aware training (the pair's integer class id), or None when the image or the caption is
unreadable or empty: datasets never raise for bad data, because one broken file out of millions must
not stop a training run. `collate_pairs` drops the Nones and reports how many in `PairBatch.skipped`,
which the training loop sums (this also counts samples dropped inside DataLoader workers).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fastclip.data.transforms import load_image

logger = logging.getLogger(__name__)
_MAX_SKIP_WARNINGS = 10  # per process: enough to diagnose a bad dataset without flooding the log
_skip_warnings = 0

Sample = tuple[torch.Tensor, str] | tuple[torch.Tensor, str, int]


def warn_skipped(reason: str) -> None:
    """Log why a sample was skipped, for the first few skipped samples of this process only."""
    global _skip_warnings
    if _skip_warnings < _MAX_SKIP_WARNINGS:
        _skip_warnings += 1
        suffix = " (further skipped samples are not logged)" if _skip_warnings == _MAX_SKIP_WARNINGS else ""
        logger.warning("skipping sample: %s%s", reason, suffix)


class PairBatch(NamedTuple):
    """A batch of pairs; B = 0 (images [0, 3, 0, 0]) when every sample of the batch was skipped."""

    images: torch.Tensor  # (B, 3, R, R) float
    tokens: torch.Tensor  # (B, context_length) int64
    skipped: int  # samples of this batch dropped as unreadable (None)
    labels: torch.Tensor | None = None  # (B,) int64 class ids, when the samples carry labels


def _is_label(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def collate_pairs(samples: Sequence[Sample | None], tokenizer: Callable[[list[str]], torch.Tensor]) -> PairBatch:
    """Stack the images and tokenize the captions of `samples`, dropping (and counting) the Nones.

    Samples `(image, caption, label)` also give `PairBatch.labels`; a batch must not mix the two kinds."""
    kept = [sample for sample in samples if sample is not None]
    for sample in kept:
        if not (isinstance(sample, (tuple, list)) and len(sample) in (2, 3) and isinstance(sample[0], torch.Tensor)
                and isinstance(sample[1], str) and (len(sample) == 2 or _is_label(sample[2]))):
            raise TypeError(f"samples must be (image tensor, caption str) pairs or None, or (image, caption, int label) "
                            f"triples, got {type(sample).__name__}")
    if len({len(sample) for sample in kept}) > 1:
        raise TypeError("samples of one batch must all be pairs or all (image, caption, label) triples")
    tokens = tokenizer([sample[1] for sample in kept])  # (B, context_length), B may be 0
    images = torch.stack([sample[0] for sample in kept]) if kept else torch.empty(0, 3, 0, 0)
    labels = None
    if kept and len(kept[0]) == 3:
        labels = torch.tensor([sample[2] for sample in kept], dtype=torch.long)
    return PairBatch(images, tokens, len(samples) - len(kept), labels)


def make_collate(tokenizer: Callable[[list[str]], torch.Tensor]) -> Callable[[Sequence[Sample | None]], PairBatch]:
    """`collate_fn` for a DataLoader: a picklable partial of `collate_pairs`, so worker processes can use it."""
    return functools.partial(collate_pairs, tokenizer=tokenizer)


def _separator_for(path: Path, separator: str | None) -> str:
    if separator is not None:
        if len(separator) != 1:
            raise ValueError(f"separator must be one character, got {separator!r}")
        return separator
    return "\t" if path.suffix.lower() == ".tsv" else ","


class CaptionCsvDataset(torch.utils.data.Dataset):
    """open_clip's CSV format: a header row, one image path and one caption per row.

    Image paths are relative to `root`, by default the CSV file's folder (absolute paths stay as they
    are). `separator` None picks a tab for `.tsv` files and a comma otherwise. Item i is
    `(transform(image), caption)`, or None when the image is missing or unreadable or the caption empty.

    With `label_key`, that column holds each pair's integer class id and item i is
    `(transform(image), caption, label)`. Labels are read when the file is opened, and a missing or
    non-integer one is an error naming the file, the row (its line number) and the column: a wrong
    class id would silently teach wrong positives, unlike an unreadable image, which is only skipped.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable[[Any], torch.Tensor], *,
                 image_key: str = "filepath", caption_key: str = "title", separator: str | None = None,
                 root: str | os.PathLike | None = None, label_key: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file {os.fspath(path)!r} does not exist or is not a file")
        if not callable(transform):
            raise TypeError(f"transform must be callable (image -> tensor), got {type(transform).__name__}")
        self.transform = transform
        self.root = Path(root) if root is not None else self.path.parent
        delimiter = _separator_for(self.path, separator)
        try:
            rows = self._read(delimiter, image_key, caption_key, label_key)
        except (UnicodeDecodeError, csv.Error) as error:  # a binary file, or a line csv cannot parse
            raise ValueError(f"caption file {os.fspath(path)!r} is not a readable UTF-8 CSV/TSV file: {error}") from error
        if not rows:
            raise ValueError(f"caption file {os.fspath(path)!r} has a header but no rows")
        self.images = [row[0] for row in rows]
        self.captions = [row[1] for row in rows]
        self.labels: list[int] | None = [row[2] for row in rows] if label_key is not None else None

    def _read(self, delimiter: str, image_key: str, caption_key: str, label_key: str | None = None) -> list[tuple]:
        """(image path, caption) of every non-blank row, and its integer label with `label_key`."""
        path = self.path
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would rename column 1.
        with open(self.path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"caption file {os.fspath(path)!r} is empty (expected a header row)")
            header = [name.strip() for name in header]
            keys = [(image_key, "image_key"), (caption_key, "caption_key")]
            if label_key is not None:
                keys.append((label_key, "label_key"))
            for key, argument in keys:
                if key not in header:
                    raise ValueError(
                        f"caption file {os.fspath(path)!r} has no column {key!r} ({argument}); columns present: "
                        f"{header} (separator {delimiter!r}; pass separator= if the file uses another one)"
                    )
            image_col, caption_col = header.index(image_key), header.index(caption_key)
            if label_key is None:
                return [(row[image_col] if image_col < len(row) else "", row[caption_col] if caption_col < len(row) else "")
                        for row in reader if row]
            label_col, rows = header.index(label_key), []
            for row in reader:
                if not row:
                    continue
                value = row[label_col].strip() if label_col < len(row) else ""
                try:
                    label = int(value)
                except ValueError:
                    what = "no value" if not value else f"{value!r}, not an integer class id"
                    raise ValueError(
                        f"caption file {os.fspath(path)!r} row {len(rows) + 1} (line {reader.line_num}) has {what} "
                        f"in label column {label_key!r} (label_key)"
                    ) from None
                rows.append((row[image_col] if image_col < len(row) else "", row[caption_col] if caption_col < len(row) else "",
                             label))
            return rows

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample | None:
        caption = self.captions[index].strip()
        if not caption:
            warn_skipped(f"{self.path.name} item {index}: empty caption")
            return None
        if not self.images[index].strip():
            warn_skipped(f"{self.path.name} item {index}: empty image path")
            return None
        try:
            image = load_image(self.root / self.images[index].strip())
        except ValueError as error:  # missing, truncated or not an image: load_image names the file
            warn_skipped(str(error))
            return None
        if self.labels is not None:
            return self.transform(image), caption, self.labels[index]
        return self.transform(image), caption

    def __repr__(self) -> str:
        return f"CaptionCsvDataset({os.fspath(self.path)!r}, {len(self)} rows, root={os.fspath(self.root)!r})"

"""Image-caption pairs: open_clip's CSV/TSV dataset, and the collate function that batches pairs.

A sample is `(image: float tensor [3, R, R], caption: str)`, or `(image, caption, label: int)` for
label-aware training (the pair's integer class id), or None when the image or the caption is
unreadable or empty: datasets never raise for bad data, because one broken file out of millions must
not stop a training run. `collate_pairs` drops the Nones and reports how many in `PairBatch.skipped`,
which the training loop sums (this also counts samples dropped inside DataLoader workers).

Why a sample was skipped travels with its batch: a dataset notes the reason (`skip_sample`, in whatever
process reads the sample) and `collate_pairs`, which runs in that same process right after the reads,
moves the notes into `PairBatch.skip_reasons`. The consumer of the batches logs them (the training loop
logs each file once), because DataLoader workers are new processes every epoch and could not remember
what they already reported.
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
_MAX_SKIP_WARNINGS = 10  # distinct reasons logged: enough to diagnose a bad dataset without flooding the log
# Reasons noted since the last collate in this process; bounded so that a dataset indexed directly,
# without a collate to take them, cannot grow it without end.
_MAX_PENDING_REASONS = 1024
_pending_reasons: list[str] = []
# Without a separator, the one (tab or comma) that splits the header line into the wanted columns is used.
SNIFFED_SEPARATORS = ("\t", ",")
SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ","}  # spellings a shell passes easily

Sample = tuple[torch.Tensor, str] | tuple[torch.Tensor, str, int]


class SkipLog:
    """Logs why samples were skipped: each distinct reason (it names the file) once, the first `limit` of them."""

    def __init__(self, limit: int = _MAX_SKIP_WARNINGS, log: logging.Logger = logger) -> None:
        self.limit, self.log = limit, log
        self.seen: set[str] = set()  # bounded by `limit`: past it nothing more is logged, so nothing is kept

    def add(self, reason: str) -> None:
        if reason in self.seen or len(self.seen) >= self.limit:
            return
        self.seen.add(reason)
        last = len(self.seen) == self.limit
        suffix = " (further unreadable samples are counted, not logged)" if last else ""
        self.log.warning("skipping sample: %s%s", reason, suffix)


_process_log = SkipLog()


def warn_skipped(reason: str) -> None:
    """Log why a sample was skipped, once per distinct reason and for the first few of this process only."""
    _process_log.add(reason)


def skip_sample(reason: str) -> None:
    """Note why a dataset item is None; the batch that holds it carries the note (`PairBatch.skip_reasons`)."""
    if len(_pending_reasons) < _MAX_PENDING_REASONS:
        _pending_reasons.append(reason)


def take_skip_reasons() -> tuple[str, ...]:
    """The reasons noted in this process since the last call (the last batch's), and forget them."""
    reasons = tuple(_pending_reasons)
    _pending_reasons.clear()
    return reasons


class PairBatch(NamedTuple):
    """A batch of pairs; B = 0 (images [0, 3, 0, 0]) when every sample of the batch was skipped."""

    images: torch.Tensor  # (B, 3, R, R) float
    tokens: torch.Tensor  # (B, context_length) int64
    skipped: int  # samples of this batch dropped as unreadable (None)
    labels: torch.Tensor | None = None  # (B,) int64 class ids, when the samples carry labels
    skip_reasons: tuple[
        str, ...
    ] = ()  # why samples were dropped (as noted by the dataset), to be logged by the consumer


def _is_label(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def collate_pairs(samples: Sequence[Sample | None], tokenizer: Callable[[list[str]], torch.Tensor]) -> PairBatch:
    """Stack the images and tokenize the captions of `samples`, dropping (and counting) the Nones.

    Samples `(image, caption, label)` also give `PairBatch.labels`; a batch must not mix the two kinds."""
    kept = [sample for sample in samples if sample is not None]
    for sample in kept:
        if not (
            isinstance(sample, (tuple, list))
            and len(sample) in (2, 3)
            and isinstance(sample[0], torch.Tensor)
            and isinstance(sample[1], str)
            and (len(sample) == 2 or _is_label(sample[2]))
        ):
            raise TypeError(
                f"samples must be (image tensor, caption str) pairs or None, or (image, caption, int label) "
                f"triples, got {type(sample).__name__}"
            )
    if len({len(sample) for sample in kept}) > 1:
        raise TypeError("samples of one batch must all be pairs or all (image, caption, label) triples")
    tokens = tokenizer([sample[1] for sample in kept])  # (B, context_length), B may be 0
    images = torch.stack([sample[0] for sample in kept]) if kept else torch.empty(0, 3, 0, 0)
    labels = None
    if kept and len(kept[0]) == 3:
        labels = torch.tensor([sample[2] for sample in kept], dtype=torch.long)
    return PairBatch(images, tokens, len(samples) - len(kept), labels, take_skip_reasons())


def make_collate(tokenizer: Callable[[list[str]], torch.Tensor]) -> Callable[[Sequence[Sample | None]], PairBatch]:
    """`collate_fn` for a DataLoader: a picklable partial of `collate_pairs`, so worker processes can use it."""
    return functools.partial(collate_pairs, tokenizer=tokenizer)


def normalize_separator(separator: str) -> str:
    """One column-separator character from `separator`: itself, or a tab for "tab" and a typed "\\t"."""
    separator = SEPARATOR_NAMES.get(separator, separator) if isinstance(separator, str) else separator
    if not isinstance(separator, str) or len(separator) != 1:
        raise ValueError(f"separator must be one character, got {separator!r} (or 'tab' for a tab)")
    return separator


def sniff_separator(header: str, wanted: Sequence[str]) -> str:
    """The separator of a header line: the one of tab and comma that yields every `wanted` column, else the
    more frequent one (the missing column is then reported with the separator used)."""
    for candidate in SNIFFED_SEPARATORS:
        names = {name.strip() for name in next(csv.reader([header], delimiter=candidate), [])}
        if all(key in names for key in wanted):
            return candidate
    return "\t" if header.count("\t") > header.count(",") else ","


class CaptionCsvDataset(torch.utils.data.Dataset):
    """open_clip's CSV format: a header row, one image path and one caption per row.

    A relative image path is looked up in `root` (by default the CSV file's folder), then in the working
    directory when the dataset was made (open_clip's rule); absolute paths stay as they are. `separator`
    None reads it from the header line: tab or comma, whichever splits it into the key columns. Item i is
    `(transform(image), caption)`, or None when the image is missing or unreadable or the caption empty.

    With `label_key`, that column holds each pair's integer class id and item i is
    `(transform(image), caption, label)`. Labels are read when the file is opened, and a missing or
    non-integer one is an error naming the file, the row (its line number) and the column: a wrong
    class id would silently teach wrong positives, unlike an unreadable image, which is only skipped.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable[[Any], torch.Tensor],
        *,
        image_key: str = "filepath",
        caption_key: str = "title",
        separator: str | None = None,
        root: str | os.PathLike | None = None,
        label_key: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file {os.fspath(path)!r} does not exist or is not a file")
        if not callable(transform):
            raise TypeError(f"transform must be callable (image -> tensor), got {type(transform).__name__}")
        self.transform = transform
        self.root = Path(root) if root is not None else self.path.parent
        self.cwd = Path.cwd()  # fixed now: the second place relative image paths are looked up
        try:
            delimiter = self._separator(separator, [image_key, caption_key] + ([label_key] if label_key else []))
            rows = self._read(delimiter, image_key, caption_key, label_key)
        except (UnicodeDecodeError, csv.Error) as error:  # a binary file, or a line csv cannot parse
            raise ValueError(
                f"caption file {os.fspath(path)!r} is not a readable UTF-8 CSV/TSV file: {error}"
            ) from error
        if not rows:
            raise ValueError(f"caption file {os.fspath(path)!r} has a header but no rows")
        self.images = [row[0] for row in rows]
        self.captions = [row[1] for row in rows]
        self.labels: list[int] | None = [row[2] for row in rows] if label_key is not None else None

    def _separator(self, separator: str | None, keys: list[str]) -> str:
        """`separator` checked, or the header line's (sniffed)."""
        if separator is not None:
            return normalize_separator(separator)
        with open(self.path, newline="", encoding="utf-8-sig") as file:
            return sniff_separator(file.readline(), keys)

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
                        f"{header} (separator {delimiter!r}; pass separator= in Python, --csv-separator to "
                        f"fastclip train, if the file uses another one)"
                    )
            image_col, caption_col = header.index(image_key), header.index(caption_key)
            if label_key is None:
                return [
                    (row[image_col] if image_col < len(row) else "", row[caption_col] if caption_col < len(row) else "")
                    for row in reader
                    if row
                ]
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
                rows.append(
                    (
                        row[image_col] if image_col < len(row) else "",
                        row[caption_col] if caption_col < len(row) else "",
                        label,
                    )
                )
            return rows

    def image_path(self, index: int) -> Path | None:
        """Where item `index`'s image is: `root`/path, else the working directory's; None when neither exists."""
        relative = Path(self.images[index].strip())
        first = self.root / relative  # an absolute path stays itself
        if first.exists() or relative.is_absolute():
            return first
        second = self.cwd / relative
        return second if second.exists() else None

    def describe_lookup(self) -> str:
        """How relative image paths are resolved, for messages about missing images."""
        where = "root" if self.root != self.path.parent else "the CSV file's folder"
        places = [f"{os.fspath(self.root.absolute())} ({where})"]
        if self.cwd.resolve() != self.root.resolve():
            places.append(f"{os.fspath(self.cwd)} (the working directory)")
        return "relative image paths are looked up in " + ", then in ".join(places)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample | None:
        caption = self.captions[index].strip()
        if not caption:
            skip_sample(f"{self.path.name} item {index}: empty caption")
            return None
        if not self.images[index].strip():
            skip_sample(f"{self.path.name} item {index}: empty image path")
            return None
        path = self.image_path(index)
        if path is None:
            places = " nor in ".join(dict.fromkeys(os.fspath(p.absolute()) for p in (self.root, self.cwd)))
            skip_sample(f"{self.path.name} item {index}: image {self.images[index].strip()!r} not found in {places}")
            return None
        try:
            image = load_image(path)
        except ValueError as error:  # truncated or not an image: load_image names the file
            skip_sample(str(error))
            return None
        if self.labels is not None:
            return self.transform(image), caption, self.labels[index]
        return self.transform(image), caption

    def __repr__(self) -> str:
        return f"CaptionCsvDataset({os.fspath(self.path)!r}, {len(self)} rows, root={os.fspath(self.root)!r})"

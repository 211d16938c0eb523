"""`TarShardDataset`: image-caption pairs streamed from webdataset-style tar shards, resumable exactly.

A shard is a tar file whose members are grouped by key, as img2dataset writes them:
`00000.jpg, 00000.txt, 00000.json, 00001.jpg, ...` (key = the name up to its first dot; members of a
key are consecutive). Each key is one raw *entry*; it becomes a sample `(transform(image), caption)`
from its `jpg`/`jpeg`/`png`/`webp` and `txt` members, or None when the image is corrupt, the image or
caption is missing, or the caption is empty. A shard that cannot be read (not a tar, truncated,
corrupt) ends with one None entry. Nothing in the data raises: `collate_pairs` counts the Nones.
With `label_extension="cls"` (webdataset's convention: a `cls` member holding the integer class id as
text) a sample is `(image, caption, label)`, and an entry whose label is missing or not an integer is
skipped (None, its reason noted for the batch) like any other broken entry.

Splitting. Every epoch the shard list is permuted from (seed, epoch) (when `shuffle`), then shard i of
that order goes to rank i % world_size, and shard j of a rank's list to DataLoader worker j % W. Each
worker reads its shards in order through a shuffle buffer of raw entries (seeded from seed, epoch,
rank and worker), and batches its own stream; each sample's augmentation runs under a torch seed
derived from (seed, epoch, shard, entry), so a sample is the same whatever the number of workers.

Exact resume, `set_position(epoch, batches_done, batch_size)`. The DataLoader sends batch requests to
its workers round-robin, starting with worker 0, and returns batches in request order; so with
D = batches_done = q * W + r, the worker that produced batch b is b % W, and worker w has produced
q + (w < r) batches of `batch_size` raw entries each (Nones included: collate batches them). A
resumed iterator starts asking worker 0 again, so worker w takes over the shards and the stream
position of worker (w + r) % W, which skips its first q + ((w + r) % W < r) batches: batch D of the
uninterrupted run is then the first batch of the resumed one, and so on in the same order. Skipped
entries are read but not decoded. This holds while every worker still has data at batch D; near the
end of an epoch with uneven shards, where a worker ran out earlier, the resumed tail can differ.
It needs the DataLoader's defaults `in_order=True` and `persistent_workers=False` (workers must get
a fresh copy of the dataset, with its position, at each `iter(loader)`). The position stays until
changed: call `set_position`, or `set_epoch(epoch)`, before each epoch.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastclip.data.pairs import Sample, skip_sample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tried in this order when a key has several
CAPTION_EXTENSION = "txt"
# webdataset's rule: key = path up to the first dot of the file name, extension = the rest.
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # truncated / corrupt tar or gzip


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion: `a{00..02}b` -> a00b a01b a02b (zero padding kept), `{x,y}` -> x y; nested too."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        start, stop = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).lstrip("-").startswith("0") else 0
        step = 1 if stop >= start else -1
        choices = [str(n).zfill(width) for n in range(start, stop + step, step)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def expand_shards(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a path, a brace pattern, a glob, `::`-separated patterns, or a list of these."""
    if isinstance(shards, (str, os.PathLike)):
        patterns = [os.fspath(shards)]
    elif isinstance(shards, Iterable) and not isinstance(shards, (bytes, bytearray)):
        patterns = list(shards)
        bad = [p for p in patterns if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise TypeError(f"shards must be paths or patterns (str), got {type(bad[0]).__name__} {bad[0]!r}")
        patterns = [os.fspath(p) for p in patterns]
    else:
        raise TypeError(f"shards must be a path, a pattern or a list of them, got {type(shards).__name__}")
    paths: list[str] = []
    for pattern in (part for p in patterns for part in p.split("::") if part):
        for expanded in expand_braces(pattern):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"shards: pattern {expanded!r} matches no file")
                paths.extend(matches)
            else:
                paths.append(expanded)
    if not paths:
        raise ValueError(f"shards: no shard given ({shards!r})")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"shards: {len(missing)} of {len(paths)} shard files do not exist (or are not files), e.g. {missing[:3]}"
        )
    return paths


@dataclass
class _Entry:
    """One raw entry of a shard: the members of one key, or a read error (which becomes a None sample)."""

    shard: int  # the shard's index in the dataset's shard list
    index: int  # entry number within the shard
    key: str
    files: dict[str, bytes]
    error: str | None = None


def read_shard(path: str, shard: int = 0) -> Iterator[_Entry]:
    """The raw entries of one tar shard, in order; a read error ends the shard with one error entry."""
    index, key, files = 0, None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                match = _KEY_AND_EXT.match(member.name)
                if not member.isfile() or match is None:
                    continue  # directories, and names without an extension, are not sample members
                if match.group(1) != key:
                    if key is not None:
                        yield _Entry(shard, index, key, files)
                        index += 1
                    key, files = match.group(1), {}
                files[match.group(2).lower()] = tar.extractfile(member).read()
    except _READ_ERRORS as error:
        # The key being read when the error struck is lost with the rest of the shard: one None for both.
        yield _Entry(shard, index, key or "", {}, error=f"cannot read shard {path!r} after {index} entries: {error}")
        return
    if key is not None:
        yield _Entry(shard, index, key, files)


def _shuffled(entries: Iterator[_Entry], size: int, rng: np.random.Generator) -> Iterator[_Entry]:
    """A shuffle buffer: once `size` entries are held, each new one replaces (and emits) a random one."""
    buffer: list[_Entry] = []
    for entry in entries:
        if len(buffer) < size:
            buffer.append(entry)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = entry
    rng.shuffle(buffer)
    yield from buffer


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # decodes now, so a truncated image fails here


def _seed(*parts: int) -> int:
    """A 64-bit seed that mixes all `parts` (numpy's SeedSequence: no collisions like seed + epoch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class TarShardDataset(torch.utils.data.IterableDataset):
    """Samples `(image, caption)` or None from tar shards, split across ranks and workers; see the module doc."""

    def __init__(
        self,
        shards: str | list[str],
        transform: Callable[[Any], torch.Tensor],
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        label_extension: str | None = None,
    ) -> None:
        super().__init__()
        if label_extension is not None and (
            not isinstance(label_extension, str)
            or not label_extension
            or "." in label_extension
            or "/" in label_extension
        ):
            raise ValueError(f"label_extension must be a member extension such as 'cls', got {label_extension!r}")
        self.label_extension = label_extension.lower() if label_extension is not None else None
        self.shards = expand_shards(shards)
        if not callable(transform):
            raise TypeError(f"transform must be callable (image -> tensor), got {type(transform).__name__}")
        self.transform = transform
        self.shuffle = bool(shuffle)
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {rank}")
        if len(self.shards) < self.world_size:
            raise ValueError(
                f"{len(self.shards)} shards cannot be split across world_size={self.world_size} ranks: "
                f"every rank needs at least one shard"
            )
        self.shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 0) if self.shuffle else 0
        self.epoch, self.batches_done, self.batch_size = 0, 0, 1

    def set_position(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """The next iteration yields `epoch` after its first `batches_done` DataLoader batches of `batch_size`."""
        self.epoch = _check_int("epoch", epoch, 0)
        self.batches_done = _check_int("batches_done", batches_done, 0)
        self.batch_size = _check_int("batch_size", batch_size, 1)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields `epoch` from its start."""
        self.set_position(epoch, 0, 1)

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices into `self.shards` in the order of `epoch`, before splitting across ranks."""
        if not self.shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def __iter__(self) -> Iterator[Sample | None]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        rank_shards = self.epoch_shards(self.epoch)[self.rank :: self.world_size]
        if len(rank_shards) < workers:
            raise ValueError(
                f"rank {self.rank} gets {len(rank_shards)} of the {len(self.shards)} shards "
                f"(world_size={self.world_size}), "
                f"fewer than its {workers} DataLoader workers: use num_workers <= "
                f"{len(self.shards) // self.world_size} (or more shards)"
            )
        rounds, extra = divmod(self.batches_done, workers)
        role = (worker + extra) % workers  # the worker of the uninterrupted run whose stream this one continues
        skip = (rounds + (role < extra)) * self.batch_size
        entries = itertools.chain.from_iterable(read_shard(self.shards[s], s) for s in rank_shards[role::workers])
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, role, 1])
            entries = _shuffled(entries, self.shuffle_buffer, rng)
        for entry in itertools.islice(entries, skip, None):  # skipped entries are read, never decoded
            yield self._sample(entry)

    def _sample(self, entry: _Entry) -> Sample | None:
        if entry.error is not None:
            skip_sample(entry.error)
            return None
        where = f"shard {self.shards[entry.shard]!r} key {entry.key!r}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in entry.files), None)
        caption = entry.files.get(CAPTION_EXTENSION)
        if image_ext is None or caption is None:
            skip_sample(f"{where}: no {'image' if image_ext is None else 'caption'} member")
            return None
        try:
            text = caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if not text:
            skip_sample(f"{where}: empty or undecodable caption")
            return None
        label = None
        if self.label_extension is not None:
            raw = entry.files.get(self.label_extension)
            try:
                label = int(raw.decode("utf-8").strip()) if raw is not None else None
            except (UnicodeDecodeError, ValueError):
                skip_sample(f"{where}: {self.label_extension} member {raw[:40]!r} is not an integer class id")
                return None
            if label is None:
                skip_sample(f"{where}: no {self.label_extension} member (the class id)")
                return None
        try:
            image = _decode_image(entry.files[image_ext])
        except Exception as error:  # corrupt images raise many types inside Pillow; one bad file must not stop training
            skip_sample(f"{where}: cannot decode {image_ext}: {error}")
            return None
        with torch.random.fork_rng(devices=[]):  # a per-entry seed: the same augmentation after a resume
            torch.manual_seed(_seed(self.seed, self.epoch, entry.shard, entry.index))
            image = self.transform(image)
        return (image, text) if label is None else (image, text, label)

    def __repr__(self) -> str:
        return (
            f"TarShardDataset({len(self.shards)} shards, shuffle={self.shuffle}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )

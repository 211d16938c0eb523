"""The training data for `fastclip train`: dataset, augmentation, sampler and loader, resumable.

Exact resume needs each sample to be the same whatever happened before it, so map-style datasets run
their augmentation under a random seed derived from (seed, epoch, index) rather than the worker's
running RNG: the same index in the same epoch always yields the same crop and jitter, with any number
of workers and after any restart.

With `use_labels` every sample also carries its integer class id, `(image, caption, label)`, and each
batch its `labels`: the synthetic shapes' colour-shape class, a CSV column (`csv_label_key`), or the
`cls` member of each shard sample (webdataset's convention).

Unreadable samples are skipped, never fatal one by one; `DataHealth` logs each one's reason once (per
file, however many epochs revisit it) and stops the run when the data as a whole cannot be read: no
sample in a whole epoch, or more than `max_skip_fraction` of the first batches' samples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from fastclip.data.augment import TrainTransform
from fastclip.data.pairs import PairBatch, SkipLog, make_collate, take_skip_reasons
from fastclip.data.sampler import ResumableSampler
from fastclip.train.config import TrainConfig

EARLY_BATCHES = 10  # micro-batches after which the share of unreadable samples is judged
logger = logging.getLogger("fastclip.train")


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a map-style dataset: item i of epoch e is produced under torch seed f(seed, e, i)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % (2**63))
            return self.dataset[index]


class LabelledSynthetic(torch.utils.data.Dataset):
    """SyntheticShapes items with their class index: `(image, caption, label_of(i))` for training, or
    `(image, label_of(i))` with `captions=False` for zero-shot accuracy."""

    def __init__(self, dataset, captions: bool = True) -> None:
        self.dataset, self.captions = dataset, captions

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        image, caption = self.dataset[index]
        label = self.dataset.label_of(index)
        return (image, caption, label) if self.captions else (image, label)


@dataclass
class TrainData:
    """A loader whose next iteration starts at a given (epoch, micro-batches consumed) position."""

    loader: torch.utils.data.DataLoader
    batch_size: int
    sampler: ResumableSampler | None = None
    seeded: SeededSamples | None = None
    lookup: str = ""  # how sample paths are found, for errors about unreadable data

    def iterate(self, epoch: int, batches_done: int):
        """The micro-batches of `epoch` after the first `batches_done` ones."""
        if self.sampler is not None:
            self.seeded.set_epoch(epoch)
            self.sampler.set_position(epoch, batches_done * self.batch_size)
        else:  # tar shards: the dataset skips inside each worker
            self.loader.dataset.set_position(epoch, batches_done, self.batch_size)
        return iter(self.loader)


class DataHealth:
    """Watches the unreadable samples of a run's batches: logs each reason (each file) once, and raises
    ValueError when the data cannot be read at all or mostly not, naming the first failure.

    Reasons are held back until the first batches pass the check, so data that cannot be read gives one
    error, not a page of warnings before it."""

    def __init__(self, max_skip_fraction: float, lookup: str = "") -> None:
        self.max_skip_fraction, self.lookup = max_skip_fraction, lookup
        self.log = SkipLog(log=logger)
        self.held: list[str] = []  # reasons seen before the judgement, at most what the log would show
        self.first: str | None = None
        self.read = self.skipped = self.batches = 0
        self.judged = False  # whether the first batches' share was checked

    def add(self, batch: PairBatch) -> None:
        """Account for one micro-batch."""
        for reason in batch.skip_reasons:
            self.first = self.first or reason
            if self.judged:
                self.log.add(reason)
            elif reason not in self.held and len(self.held) < self.log.limit:
                self.held.append(reason)
        self.read += batch.images.shape[0]
        self.skipped += batch.skipped
        self.batches += 1
        if not self.judged and self.batches >= EARLY_BATCHES:
            self._judge_share()

    def end_epoch(self, read_in_epoch: int) -> None:
        """Account for a finished epoch, of which `read_in_epoch` samples were readable."""
        if read_in_epoch == 0:
            raise ValueError(self._message("no training sample of a whole epoch could be read"))
        if not self.judged:  # an epoch shorter than EARLY_BATCHES
            self._judge_share()

    def _judge_share(self) -> None:
        seen = self.read + self.skipped
        if seen and self.read == 0:
            raise ValueError(self._message(f"none of the first {seen} training samples could be read"))
        if seen and self.skipped / seen > self.max_skip_fraction:
            raise ValueError(
                self._message(
                    f"{self.skipped} of the first {seen} training samples could not be read (more than "
                    f"max_skip_fraction={self.max_skip_fraction:g}; --max-skip-fraction 1 trains on what can be read)"
                )
            )
        self.judged = True
        self.flush()

    def flush(self) -> None:
        """Log the reasons held back so far."""
        for reason in self.held:
            self.log.add(reason)
        self.held.clear()

    def _message(self, what: str) -> str:
        first = f"; the first: {self.first}" if self.first else ""
        lookup = f"; {self.lookup}" if self.lookup else ""
        return what + first + lookup


def _own_process_group(worker_id: int) -> None:
    """DataLoader worker init: leave the terminal's process group, so a Ctrl-C (or a SIGTERM sent to the
    group) reaches only the main process, which finishes its step and saves, instead of killing the
    workers it still needs. Workers still end with the main process (their watchdog notices)."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted here (e.g. already a group leader): signals then reach the worker as before
        pass


def build_train_data(config: TrainConfig, image_size: int, tokenizer, *, rank: int, world_size: int) -> TrainData:
    take_skip_reasons()  # reasons noted by reads before this run (a dataset indexed by hand) are not its own
    transform = TrainTransform(image_size, scale=(config.crop_scale, 1.0), jitter=config.jitter)
    collate = make_collate(tokenizer)
    loader_options = dict(
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_own_process_group if config.workers > 0 else None,
    )
    if config.dataset == "shards":
        from fastclip.data.shards import TarShardDataset

        dataset = TarShardDataset(
            config.train_data,
            transform,
            shuffle=True,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
            label_extension="cls" if config.use_labels else None,
        )
        lookup = "each sample is a key's jpg/jpeg/png/webp and txt members in the tar shards"
        return TrainData(torch.utils.data.DataLoader(dataset, **loader_options), config.batch_size, lookup=lookup)
    dataset, lookup = _map_style_dataset(config, image_size, transform)
    seeded = SeededSamples(dataset, config.seed)
    sampler = ResumableSampler(
        len(dataset), shuffle=True, seed=config.seed, rank=rank, world_size=world_size, drop_last=True
    )
    if len(sampler) < config.batch_size:
        raise ValueError(f"each rank gets {len(sampler)} samples per epoch, fewer than batch_size={config.batch_size}")
    loader = torch.utils.data.DataLoader(seeded, sampler=sampler, **loader_options)
    return TrainData(loader, config.batch_size, sampler, seeded, lookup)


def _map_style_dataset(
    config: TrainConfig, image_size: int, transform: TrainTransform
) -> tuple[torch.utils.data.Dataset, str]:
    """(the csv or synthetic training dataset, how its sample paths are found: "" for synthetic)."""
    if config.dataset == "csv":
        from fastclip.data.pairs import CaptionCsvDataset

        label_key = config.csv_label_key if config.use_labels else None
        dataset = CaptionCsvDataset(
            config.train_data,
            transform,
            image_key=config.csv_image_key,
            caption_key=config.csv_caption_key,
            separator=config.csv_separator,
            label_key=label_key,
        )
        return dataset, dataset.describe_lookup()
    from fastclip.data.synthetic import SyntheticShapes

    dataset = SyntheticShapes(
        config.synthetic_samples,
        image_size,
        seed=config.seed,
        split="train",
        transform=transform,
        extra_colours=config.synthetic_extra_colours,
    )
    return (LabelledSynthetic(dataset) if config.use_labels else dataset), ""

"""The training data for `fastclip train`: dataset, augmentation, sampler and loader, resumable.

Exact resume needs each sample to be the same whatever happened before it, so map-style datasets run
their augmentation under a random seed derived from (seed, epoch, index) rather than the worker's
running RNG: the same index in the same epoch always yields the same crop and jitter, with any number
of workers and after any restart.

With `use_labels` every sample also carries its integer class id, `(image, caption, label)`, and each
batch its `labels`: the synthetic shapes' colour-shape class, a CSV column (`csv_label_key`), or the
`cls` member of each shard sample (webdataset's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastclip.data.augment import TrainTransform
from fastclip.data.pairs import make_collate
from fastclip.data.sampler import ResumableSampler
from fastclip.train.config import TrainConfig


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
    """SyntheticShapes items with their class index: `(image, caption, label_of(i))`."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, caption = self.dataset[index]
        return image, caption, self.dataset.label_of(index)


@dataclass
class TrainData:
    """A loader whose next iteration starts at a given (epoch, micro-batches consumed) position."""

    loader: torch.utils.data.DataLoader
    batch_size: int
    sampler: ResumableSampler | None = None
    seeded: SeededSamples | None = None

    def iterate(self, epoch: int, batches_done: int):
        """The micro-batches of `epoch` after the first `batches_done` ones."""
        if self.sampler is not None:
            self.seeded.set_epoch(epoch)
            self.sampler.set_position(epoch, batches_done * self.batch_size)
        else:  # tar shards: the dataset skips inside each worker
            self.loader.dataset.set_position(epoch, batches_done, self.batch_size)
        return iter(self.loader)


def build_train_data(config: TrainConfig, image_size: int, tokenizer, *, rank: int, world_size: int) -> TrainData:
    transform = TrainTransform(image_size, jitter=config.jitter)
    collate = make_collate(tokenizer)
    loader_options = dict(batch_size=config.batch_size, num_workers=config.workers, collate_fn=collate,
                          drop_last=True, pin_memory=torch.cuda.is_available())
    if config.dataset == "shards":
        from fastclip.data.shards import TarShardDataset

        dataset = TarShardDataset(config.train_data, transform, shuffle=True, seed=config.seed, rank=rank, world_size=world_size,
                                  label_extension="cls" if config.use_labels else None)
        return TrainData(torch.utils.data.DataLoader(dataset, **loader_options), config.batch_size)
    if config.dataset == "csv":
        from fastclip.data.pairs import CaptionCsvDataset

        dataset = CaptionCsvDataset(config.train_data, transform, image_key=config.csv_image_key, caption_key=config.csv_caption_key,
                                    label_key=config.csv_label_key if config.use_labels else None)
    else:
        from fastclip.data.synthetic import SyntheticShapes

        dataset = SyntheticShapes(config.synthetic_samples, image_size, seed=config.seed, split="train", transform=transform)
        if config.use_labels:
            dataset = LabelledSynthetic(dataset)
    seeded = SeededSamples(dataset, config.seed)
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=config.seed, rank=rank, world_size=world_size, drop_last=True)
    if len(sampler) < config.batch_size:
        raise ValueError(f"each rank gets {len(sampler)} samples per epoch, fewer than batch_size={config.batch_size}")
    loader = torch.utils.data.DataLoader(seeded, sampler=sampler, **loader_options)
    return TrainData(loader, config.batch_size, sampler, seeded)

"""`ResumableSampler`: DistributedSampler's epoch permutations, plus a start position for exact resume."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Indices of a map-style dataset for one rank, epoch after epoch.

    Epoch e's order is a permutation of range(num_samples) drawn from (seed, e) (or range itself when
    not `shuffle`), cut (`drop_last`) or padded with its own first indices (otherwise) to a multiple
    of `world_size`; rank r takes every world_size-th index from position r, so the ranks' indices
    are disjoint (without padding) and together cover the epoch. `len()` is one rank's full epoch.

    `set_position(epoch, index)`: the next `iter()` yields that epoch from position `index` (samples
    of this rank already consumed); each later `iter()` yields the next epoch from its start.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if self.drop_last and self.num_samples < self.world_size:
            raise ValueError(
                f"num_samples={num_samples} < world_size={world_size}: with drop_last every rank gets nothing"
            )
        per_rank = self.num_samples // self.world_size if self.drop_last else -(-self.num_samples // self.world_size)
        self.per_rank = per_rank
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.per_rank

    def set_position(self, epoch: int, index: int) -> None:
        """The next `iter()` yields epoch `epoch` of this rank from its `index`-th sample on."""
        self.epoch = _check_int("epoch", epoch, 0)
        self.start = _check_int("index", index, 0)
        if self.start > self.per_rank:
            raise ValueError(f"index must be <= {self.per_rank} (this rank's samples per epoch), got {index}")

    def set_epoch(self, epoch: int) -> None:
        """The next `iter()` yields epoch `epoch` from its start (DistributedSampler's method)."""
        self.set_position(epoch, 0)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's full order for `epoch`: LongTensor [len(self)]."""
        if self.shuffle:
            generator = torch.Generator()
            # (seed, epoch) mixed by SeedSequence: seed + epoch would repeat orders across seeds.
            generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:  # pad by repeating the order (more than once if world_size > num_samples)
            order = order.repeat(-(-total // self.num_samples))
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0  # the iterator after this one starts the next epoch
        return iter(self.epoch_indices(epoch)[start:].tolist())

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(num_samples={self.num_samples}, shuffle={self.shuffle}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last})"
        )

"""Exact resume of the data stream: the sampler's order is a function of (seed, epoch) and each sample's
augmentation of (seed, epoch, index), so a resumed run skips the batches it already did and sees the very same data.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    """Yields (index, epoch): a permutation of the dataset seeded by (seed, epoch); set_epoch picks the epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order __iter__ yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)).tolist()
        return iter([(i, self.epoch) for i in order])

    def __len__(self) -> int:
        return self.n


class SeededAugment(Dataset):
    """Wraps a dataset: item (index, epoch) is transformed under a torch seed made of (seed, epoch, index).

    The augmentation then depends neither on the worker nor on what came before: resuming is exact.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % (2**63 - 1))
            return self.dataset[i]

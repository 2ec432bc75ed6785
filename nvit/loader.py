"""Training batches at speed, and the same batches whatever the workers, ranks or restarts.

A phase's batches are fixed by (seed, phase, iteration): the global batch of iteration ``i`` is a slice
of a permutation drawn from (seed, phase, epoch), and every sample's random augmentation is drawn from
(seed, phase, i, its position in the global batch). Rank ``r`` of ``W`` loads positions
``[r·B/W, (r+1)·B/W)`` of that global batch. So

- 0 or N DataLoader workers give the same tensors (each sample seeds its own transform);
- 1 rank with batch B and 2 ranks with B/2 each see the same global batch, sample for sample;
- a resumed run starts the sampler at its iteration and continues exactly.

Loading runs in a ``torch.utils.data.DataLoader`` (workers, pinned memory, prefetching).
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

PHASES = {"pretrain": 0, "prune": 1, "finetune": 2}


def mix(*xs: int) -> int:
    """A 63-bit seed from integers (order matters)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2**63 - 1)


class GlobalBatchSampler(Sampler):
    """Yields, for iterations start, start+1, …, the (dataset index, sample seed) pairs of this rank's
    share of each global batch. Drops the last partial batch when the dataset holds more than one."""

    def __init__(self, n: int, global_batch: int, seed: int, phase: str, *, rank: int = 0, world: int = 1,
                 start: int = 0, iterations: int | None = None):
        if n <= 0:
            raise ValueError("the training set is empty")
        if global_batch < 1 or global_batch % world:
            raise ValueError(f"the global batch ({global_batch}) must be a positive multiple of the "
                             f"world size ({world})")
        self.n, self.batch, self.seed, self.phase = n, global_batch, seed, PHASES[phase]
        self.rank, self.world, self.start, self.iterations = rank, world, start, iterations
        self.per_epoch = max(1, n // global_batch)
        self.local = global_batch // world

    def global_indices(self, i: int) -> torch.Tensor:
        epoch, j = divmod(i, self.per_epoch)
        g = torch.Generator().manual_seed(mix(self.seed, self.phase, 0, epoch))
        return torch.randperm(self.n, generator=g)[j * self.batch:(j + 1) * self.batch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        i = self.start
        while self.iterations is None or i < self.iterations:
            idx = self.global_indices(i)
            lo = self.rank * self.local
            yield [(int(idx[p]), mix(self.seed, self.phase, 1, i, p)) for p in range(lo, min(lo + self.local, len(idx)))]
            i += 1

    def __len__(self) -> int:
        if self.iterations is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.iterations - self.start)


class SeededSamples(Dataset):
    """`dataset[(index, seed)]`: the sample with torch's, Python's and numpy's RNGs seeded by `seed` first,
    so random transforms (timm's or :func:`pad_crop_flip`) draw the same whatever process loads it.
    `transform` (optional) applies to the sample's input after the dataset's own transform."""

    def __init__(self, dataset: Dataset, transform: Callable | None = None):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        x, y = self.dataset[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y)


def pad_crop_flip(pad: int, flip: bool, fill: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop of a [C, H, W] tensor padded by `pad` pixels of `fill`, then a random horizontal flip:
    the augmentation for small images (e.g. 28-px grayscale), where random-resized-crop destroys them."""
    def f(x: torch.Tensor) -> torch.Tensor:
        if pad > 0:
            H, W = x.shape[-2:]
            xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
            dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
            x = xp[..., dy:dy + H, dx:dx + W]
        if flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x.contiguous()
    return f


def train_loader(dataset: Dataset, *, global_batch: int, seed: int, phase: str, rank: int = 0, world: int = 1,
                 start: int = 0, iterations: int | None = None, workers: int = 0, pin_memory: bool = False,
                 transform: Callable | None = None) -> DataLoader:
    """This rank's batches of `phase` from iteration `start` on (see the module docstring)."""
    sampler = GlobalBatchSampler(len(dataset), global_batch, seed, phase, rank=rank, world=world, start=start,
                                 iterations=iterations)
    return DataLoader(SeededSamples(dataset, transform), batch_sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                      persistent_workers=False)


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous, nearly equal shard of range(n) for evaluation (no padding: every sample once)."""
    per, extra = divmod(n, world)
    lo = rank * per + min(rank, extra)
    return range(lo, lo + per + (1 if rank < extra else 0))

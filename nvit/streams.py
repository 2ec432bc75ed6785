"""A run's training batches, on the device: map-style datasets through nvit.loader (each batch fixed by
(seed, phase, iteration, position), so a resumed run reads exactly what the uninterrupted one read),
streaming ones (timm's IterableImageDataset) epoch after epoch."""
from __future__ import annotations

import os

from .engine import Processes
from .inputs import is_streaming
from .loader import train_loader
from .settings import RunError


class TrainBatches:
    def __init__(self, settings: dict, procs: Processes, train_set, transform, workers: int):
        self.settings, self.procs, self.train_set, self.transform = settings, procs, train_set, transform
        self.device, self.workers = procs.device, workers
        self.streaming = is_streaming(train_set)

    def per_epoch(self) -> int:
        """Iterations per epoch of the global batch (a streaming dataset's length is this rank's share:
        timm shards it over the ranks)."""
        n_train = len(self.train_set) * (self.procs.world if self.streaming else 1)
        return max(1, n_train // self.settings["batch_size"])

    def __call__(self, phase: str, start: int):
        """This rank's (x, y) of iterations start, start+1, … of `phase`, on the device."""
        if self.streaming:
            yield from self._stream(start)
            return
        s, p = self.settings, self.procs
        loader = train_loader(self.train_set, global_batch=s["batch_size"], seed=s["seed"], phase=phase,
                              rank=p.rank, world=p.world, start=start, workers=self.workers,
                              pin_memory=self.device.type == "cuda", transform=self.transform)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _stream(self, start: int):
        """A streaming dataset, epoch after epoch (timm reshuffles by seed and epoch); a resumed run replays
        the stream up to `start`, which is exact for the same world size and worker count."""
        from torch.utils.data import DataLoader

        local, epoch, skip = self.settings["batch_size"] // self.procs.world, 0, start
        while True:
            self.train_set.set_epoch(epoch)
            loader = DataLoader(self.train_set, batch_size=local, num_workers=self.workers, drop_last=True,
                                pin_memory=self.device.type == "cuda")
            n = 0
            for x, y in loader:
                n += 1
                if skip:
                    skip -= 1
                    continue
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if n == 0:
                raise RunError(f"--data {self.settings['data']}: this rank's share of the stream holds less than "
                               f"one batch of {local}")
            epoch += 1


def default_workers(s: dict, procs: Processes) -> int:
    """0 for the embedded tensors (nothing to decode), else up to 8 per rank from the cores there are."""
    if not s["data"]:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, procs.world) - 1))

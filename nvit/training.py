"""Training pieces shared by pretraining, pruning and fine-tuning: tensor augmentation, the warmup+cosine
schedule, knowledge distillation, evaluation, and a resumable batch order.

Reproducibility: every random draw of iteration `i` of a phase comes from generators seeded by
(seed, phase, i) and the batch order of an epoch from (seed, phase, epoch), so a run resumed at any
iteration sees exactly the batches and augmentations an uninterrupted one would.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from .datasets import EMBEDDED_MEAN, EMBEDDED_STD, make_loader


def augment(x: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True,
            background: float = (0.0 - EMBEDDED_MEAN) / EMBEDDED_STD) -> torch.Tensor:
    """Per-sample random crop after padding `pad` pixels of `background` (default: a black pixel of the
    embedded data, normalised), and random horizontal flip. x: [B, C, H, W]."""
    B, C, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), value=background)
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        rows = (dy[:, None] + torch.arange(H))[:, None, :, None]  # [B, 1, H, 1]
        cols = (dx[:, None] + torch.arange(W))[:, None, None, :]  # [B, 1, 1, W]
        x = xp[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
    if flip:
        m = torch.rand(B, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to `min_ratio` (a LambdaLR factor per step)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int = 500, progress: bool = False,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    loader = make_loader(dataset, batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(dataset)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                      temperature: float, weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 − weight)·CE(student, target) + weight·T²·KL(softmax(teacher/T) ‖ softmax(student/T)).

    T² keeps the soft term's gradient scale independent of T (Hinton et al.)."""
    ce = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    if weight == 0.0:
        return ce
    T = temperature
    kl = F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                  reduction="batchmean", log_target=True) * (T * T)
    return (1.0 - weight) * ce + weight * kl


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2**63 - 1)


PHASES = {"pretrain": 0, "prune": 1, "finetune": 2}


class BatchStream:
    """Batches of a dataset in an order fixed by (seed, phase, epoch); `batch(i)` is the i-th batch of
    the phase, whatever happened before (so a resumed run continues exactly). Drops the last partial
    batch when the dataset holds more than one batch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, phase: str):
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.phase = dataset, batch_size, seed, PHASES[phase]
        n = len(dataset)
        if n == 0:
            raise ValueError("the training set is empty")
        self.per_epoch = max(1, n // batch_size)
        self._perm_epoch, self._perm = -1, None
        self._tensors = getattr(dataset, "tensors", None)  # TensorDataset: slice without a loader

    def generator(self, i: int) -> torch.Generator:
        """The generator for iteration i's random draws (augmentation)."""
        return torch.Generator().manual_seed(_mix(self.seed, self.phase, 1, i))

    def seed_globals(self, i: int) -> None:
        """Seed torch's and Python's global RNGs for iteration i (transforms that use them)."""
        s = _mix(self.seed, self.phase, 2, i)
        torch.manual_seed(s)
        random.seed(s)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, self.phase, 0, epoch))
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g), epoch
        idx = self._perm[j * self.batch_size:(j + 1) * self.batch_size]
        if self._tensors is not None:
            x, y = self._tensors
            return x[idx], y[idx]
        self.seed_globals(i)
        items = [self.dataset[int(k)] for k in idx]
        return torch.stack([t[0] for t in items]), torch.as_tensor([int(t[1]) for t in items])

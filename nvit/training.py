"""Small training pieces used outside the engine: the warmup+cosine schedule and a one-process
top-1 evaluation (the engine's, for callers without processes)."""
from __future__ import annotations

import math

import torch


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to `min_ratio` (a LambdaLR factor per step)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def evaluate(model: torch.nn.Module, dataset, batch_size: int = 500, progress: bool = False,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent (one process)."""
    from .engine import Processes, evaluate as engine_evaluate

    return engine_evaluate(model, dataset, Processes(device=torch.device(device)), batch_size=batch_size,
                           progress=progress)

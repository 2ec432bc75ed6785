"""The pruning loop the end-to-end Pruner tests share (one model, one fixed batch)."""
from __future__ import annotations

import torch.nn.functional as F


def prune_until_done(pruner, model, x, y, units_per_step: int) -> None:
    """Saliency of one cross-entropy batch, then a prune step, until the pruner's target is met."""
    while not pruner.done:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()
        pruner.prune_step(units_per_step)

"""The uniform baseline allocation (Pruner(allocation="uniform")): every bucket keeps the same share."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import torch

from .kinds import FLOOR, prunable


class UniformAllocation:
    """Baseline allocation: every (kind, block, head) bucket keeps the same fraction of its dense units
    (the lowest-scored go), so all blocks keep the same shape; the fraction shrinks by n_units of the
    whole model per step, and the last step stops at the largest kept ratio that meets the target.

    The kept ratio r keeps ceil(r · dense size) units (≥ FLOOR) per bucket, so the plan only changes at
    ratios j/n (n a bucket's dense size): the step bisects exactly over those. Its "last group" is the
    slice between two neighbouring ratios -- one unit from each bucket whose count changes there (the
    ratio is common to all buckets, so a slice is one unit of every bucket of that size: one layer of
    the uniform shape, the smallest step uniform allocation can take). Its exact cost, measured on the
    config with the slice still in (above the target), is "last_group_cost"; a step that reaches the
    target lands in (target − last_group_cost, target]. Group sizes are not applied here (the baseline
    removes single units).

    buckets: the pruner's buckets (the unit ids of each (kind, block, head), dense), kinds: each
    bucket's kind; buckets of a kind the family cannot prune are left whole."""

    def __init__(self, buckets: list[list[int]], kinds: list[int], num_units: int, qk_prunable: bool):
        self.buckets = [us for us, k in zip(buckets, kinds) if prunable(k, qk_prunable)]
        self.num_units = num_units
        self.sizes = sorted({len(us) for us in self.buckets})

    def choose(self, sal: torch.Tensor, alive: torch.Tensor, n_units: int, frac0: float, target: float | None,
               probe: Callable[[list[int]], float]) -> tuple[list[int], float | None]:
        """(the units this step removes, its last slice's exact cost or None). frac0: the target
        fraction now; probe(units): the exact target fraction with `units` also removed."""
        order = [sorted((u for u in us if alive[u]), key=lambda u: (float(sal[u]), u)) for us in self.buckets]

        def plan(keep: Fraction) -> list[int]:  # units to remove so each bucket keeps ceil(keep · dense size)
            out = []
            for us, live in zip(self.buckets, order):
                n_keep = max(FLOOR, math.ceil(keep * len(us)))
                out += live[: max(0, len(live) - n_keep)]
            return out

        # the ratios where the plan changes, from the step's full-size ratio up to 1 (nothing removed)
        keep = Fraction(max(0, int(alive.sum()) - n_units), self.num_units)
        ratios = sorted({Fraction(j, n) for n in self.sizes for j in range(1, n + 1) if Fraction(j, n) >= keep})
        chosen, last_cost = plan(keep), None
        if target is not None and frac0 <= target:
            chosen = []  # already there
        elif target is not None and chosen:
            f_lo = probe(chosen)
            if f_lo <= target:  # the target lies within this step: the largest ratio that meets it
                lo, hi, f_hi = 0, len(ratios) - 1, frac0  # plan(ratios[-1] = 1) removes nothing
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    fm = probe(plan(ratios[mid]))
                    if fm <= target:
                        lo, f_lo = mid, fm
                    else:
                        hi, f_hi = mid, fm
                chosen, last_cost = plan(ratios[lo]), f_hi - f_lo
            elif len(ratios) > 1:  # not there yet: the cost of this step's last slice
                last_cost = probe(plan(ratios[1])) - f_lo
        return chosen, last_cost

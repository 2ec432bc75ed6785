"""Where a global prune step with a target stops: the exact landing below the target, found cheaply."""
from __future__ import annotations

from typing import Callable

from .spec import Masks


class ExactStop:
    """The stopping rule of one global prune step with a target t (see Pruner.prune_step).

    Removal groups go in rank order until the EXACT fraction f (the target metric of the resulting
    config / the dense model's) is ≤ t. A step that reaches t lands at

        t − last_group_cost  <  f  ≤  t,

    where last_group_cost is the exact cost (fraction of dense) of the step's last removal group,
    measured on the config just before that group's removal (which was still above t). A step that
    stops short of t (its unit budget spent, or no allowed group left) has the same last_group_cost:
    its last group's exact cost, also measured before its removal.

    Speed: the exact fraction is not computed per group. Each group's first-order cost (its units' ΔC
    for the masks at the step's start, which misjudges interacting removals: embedding × MLP, a head ×
    its dims, a branch × its contents, a latency table's cross terms) drives a running estimate,
    rescaled by what the last exact measurement showed. The exact fraction is measured whenever the
    estimate has covered half the remaining distance to t since the last measurement (near t: after
    every group). A measurement at or below t means the crossing lies among the groups removed since
    the last measurement above t: those are bisected exactly for the shortest prefix at or below t, and
    the rest are put back.

    The step owns the masks; the rule sees them through measure() (the exact fraction of the current
    masks), snapshot() (a copy of them) and probe(masks, groups) (the exact fraction of `masks` with
    `groups` removed, nothing changed)."""

    def __init__(self, t: float, frac0: float, measure: Callable[[], float], snapshot: Callable[[], Masks],
                 probe: Callable[[Masks, list], float]):
        self.t, self.measure, self.snapshot, self.probe = t, measure, snapshot, probe
        # exact checkpoints (groups applied then, masks then, exact fraction then), all above t
        self.snaps: list[tuple[int, Masks, float]] = [(0, snapshot(), frac0)]
        self.n, self.drop, self.scale = 0, 0.0, 1.0  # groups removed; estimated drop since the checkpoint; its scale
        self.frac, self.reached = frac0, frac0 <= t
        self.measured = True  # whether `frac` is exact for the current masks

    def removed(self, cost: float) -> None:
        """A group of first-order cost `cost` was just removed: measure when the estimate says so."""
        self.n += 1
        self.measured = False
        self.drop += cost
        f_snap = self.snaps[-1][2]
        if self.scale * self.drop >= (f_snap - self.t) / 2:  # the estimate covered half the way (or crossed)
            self.frac, self.measured = self.measure(), True
            if self.frac <= self.t:
                self.reached = True
            else:
                if self.drop > 0:  # how far the first-order estimate was off, for the next stretch
                    self.scale = min(max((f_snap - self.frac) / self.drop, 0.05), 20.0)
                self.snaps.append((self.n, self.snapshot(), self.frac))
                self.drop = 0.0

    def finish(self, applied: list, replay: Callable[[Masks, list], None]) -> tuple[int, float]:
        """After the walk (`applied`: the groups removed, in order, at least one): (how many of them stay,
        last_group_cost). Where the crossing lies before the last group, replay(masks, groups) is told
        to set the masks to a checkpoint with the groups that stay after it."""
        t = self.t
        if not self.measured:
            self.frac = self.measure()
            self.reached = self.frac <= t
        i0, m0, f_lo = self.snaps[-1]
        if self.reached:  # f(applied[:i0]) > t ≥ f(applied): bisect applied[i0:] for the first crossing
            batch = applied[i0:]
            lo, hi, f_hi = 0, len(batch), self.frac
            while hi - lo > 1:
                mid = (lo + hi) // 2
                fm = self.probe(m0, batch[:mid])
                if fm <= t:
                    hi, f_hi = mid, fm
                else:
                    lo, f_lo = mid, fm
            if hi < len(batch):
                replay(m0, batch[:hi])
            return i0 + hi, f_lo - f_hi
        # short of t: the exact fraction just before the last group, from the latest checkpoint before it
        n = len(applied)
        i, m, f_prev = next(sn for sn in reversed(self.snaps) if sn[0] <= n - 1)
        if i < n - 1:
            f_prev = self.probe(m, applied[i:n - 1])
        return n, f_prev - self.frac

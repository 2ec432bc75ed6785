"""Global, latency-aware Hessian pruning of a ViT (NViT).

Usage::

    pruner = Pruner(model, granularity="aligned", target=Target("flops", 0.4))
    for step, (x, y) in enumerate(loader):
        loss(model(x), y).backward()
        pruner.accumulate()                 # one fused kernel call: scores += (Σ w·g)² per structure
        optimizer.step(); optimizer.zero_grad()
        pruner.apply_masks()                # keep pruned weights at zero
        if step % K == 0 and not pruner.done:
            pruner.prune_step(n_units)      # remove the N lowest-ranked structures, globally
    nvit_model = pruner.convert()           # exact: computes what the masked model computed

Ranking. Every structure of every kind and block is in one pool. The saliency I_S (averaged over the
batches since the last prune step, then an EMA across prune steps) estimates the loss increase of
removing S. With ``normalize="cost"`` (default) structures are ranked by I_S / ΔC_S: the estimated
loss increase per unit of the target's cost (FLOPs, params or modelled latency) that removing S saves,
as a fraction of the dense model's — the greedy rule for "least loss for the budget", and it needs no
per-kind divisors. ``normalize="none"`` ranks by I_S alone (the paper). With a latency table and
η > 0, η·ΔLat_S/Lat_dense is subtracted (the paper's latency-aware term, here relative to the dense
latency so η is unit-free).

Parts. The Pruner ranks and steps (rank_groups, Pruner.prune_step). What a target metric costs and
what removing a unit saves: nvit.cost_model.CostModel. What a removed unit takes with it, the floors
and what may go at all: nvit.kinds (the same rules for the mask edits, the cost deltas and the
guards). The saliency's sums and averages: nvit.scores.SaliencyScores. Where a step with a target
stops, exactly: nvit.stopping.ExactStop. The uniform baseline (allocation="uniform"):
nvit.uniform.UniformAllocation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import kinds
from .cost_model import METRICS, CostModel
from .kinds import GRANULARITIES, KIND_NAMES
from .model import NViT, NViTConfig
from .scores import NoSaliencyError, SaliencyScores
from .spec import Family
from .stopping import ExactStop
from .structures import Adapter, Masks
from .uniform import UniformAllocation

__all__ = ["METRICS", "NoSaliencyError", "PruneStepInfo", "Pruner", "Target", "TargetUnreachableError"]


class TargetUnreachableError(RuntimeError):
    """The target cannot be met without removing a structure the guards keep."""


@dataclass
class Target:
    """Prune until `metric` (latency | flops | params) is at most `fraction` of the dense model's."""

    metric: str
    fraction: float

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"nvit: target metric must be one of {METRICS}, got {self.metric!r}")
        if not (0.0 < self.fraction < 1.0):
            raise ValueError(f"nvit: target fraction must be in (0, 1), got {self.fraction}")


@dataclass
class PruneStepInfo:
    removed: dict[str, int]
    fraction: float  # current metric / dense metric (exact: the metric of the resulting config)
    done: bool
    step: int
    # Exact cost (fraction of dense) of the last removal group of the step, measured on the config
    # just before its removal; None when the step removed nothing. See Pruner.prune_step.
    last_group_cost: float | None = None


@dataclass
class _Group:
    units: list[int]
    kind: int
    block: int
    head: int
    cost: float = 0.0


def _group_sizes(granularity: str, criterion: str, allocation: str, normalize: str, target: Target | None,
                 eta: float, latency_table, group_size: dict[str, int] | None) -> dict[str, int]:
    """The Pruner's option checks; returns the group size of every kind (default 1)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"nvit: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if criterion not in ("hessian", "magnitude"):
        raise ValueError(f"nvit: criterion must be 'hessian' or 'magnitude', got {criterion!r}")
    if allocation not in ("global", "uniform"):
        raise ValueError(f"nvit: allocation must be 'global' or 'uniform', got {allocation!r}")
    if normalize not in ("cost", "none"):
        raise ValueError(f"nvit: normalize must be 'cost' or 'none', got {normalize!r}")
    if target is not None and target.metric == "latency" and latency_table is None:
        raise ValueError("nvit: a latency target needs a latency_table (nvit.latency.LatencyTable)")
    if eta and latency_table is None:
        raise ValueError("nvit: eta > 0 needs a latency_table")
    gs = {k: 1 for k in KIND_NAMES}
    for k, v in (group_size or {}).items():
        if k not in gs or int(v) < 1:
            raise ValueError(f"nvit: group_size keys are {KIND_NAMES} with values ≥1, got {k}={v}")
        gs[k] = int(v)
    return gs


def rank_groups(sal: torch.Tensor, dc: torch.Tensor, lat: torch.Tensor, alive: torch.Tensor,
                unit_bucket: torch.Tensor, unit_group_size: torch.Tensor, cost_norm: bool):
    """Candidate groups, ranked: per bucket the alive units sorted by their own rank and cut into
    groups of the kind's group size (the lowest-ranked remainder first, so dims stay multiples of
    the size); each group ranked as a whole. Vectorised.
    unit_bucket, unit_group_size: per unit, its bucket id (kind, block, head) and its kind's group
    size; cost_norm: rank by saliency / cost (else saliency alone).
    Returns (unit ids sorted into groups, each group's start offset among them, group costs, group
    ids in rank order)."""
    unit_rank = (sal / dc.clamp_min(1e-12) if cost_norm else sal) - lat
    units = alive.nonzero().flatten()
    if units.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.float64), empty
    # sort by (bucket, unit rank, unit id): stable sorts from the last key to the first
    units = units[torch.argsort(unit_rank[units], stable=True)]
    units = units[torch.argsort(unit_bucket[units], stable=True)]
    bucket = unit_bucket[units]
    n = units.numel()
    new_bucket = torch.ones(n, dtype=torch.bool)
    new_bucket[1:] = bucket[1:] != bucket[:-1]
    first = torch.nonzero(new_bucket).flatten()
    size = torch.diff(torch.cat([first, torch.tensor([n])]))
    pos = torch.arange(n) - torch.repeat_interleave(first, size)    # position within the bucket
    bsize = torch.repeat_interleave(size, size)
    g = unit_group_size[units]
    # The lowest-ranked (alive % g) units form a leading partial group, so every removal leaves a
    # multiple of g alive (dims stay multiples of the group size even when the dense one is not).
    r = bsize % g
    slot = torch.where(pos < r, torch.zeros_like(pos), (pos - r) // g + (r > 0).long())
    starts = torch.ones(units.numel(), dtype=torch.bool)               # a group starts at a new bucket
    starts[1:] = (bucket[1:] != bucket[:-1]) | (slot[1:] != slot[:-1])
    gid = torch.cumsum(starts.long(), 0) - 1
    n_groups = int(gid[-1]) + 1 if gid.numel() else 0
    gsal = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, sal[units].double())
    gcost = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, dc[units].double())
    glat = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, lat[units].double())
    grank = (gsal / gcost.clamp_min(1e-12) if cost_norm else gsal) - glat
    gstart = torch.nonzero(starts).flatten()
    first_unit = units[gstart]
    order = torch.argsort(first_unit, stable=True)                    # ties: lower first unit id first
    order = order[torch.argsort(grank[order], stable=True)]
    return units, gstart, gcost, order


class _Through:
    """A Pruner attribute kept by one of its parts, read and written through (pruner.ema = … sets the
    saliency's EMA)."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj, value):
        setattr(getattr(obj, self.part), self.name, value)


class Pruner:
    """Global Hessian-saliency pruner for timm ViT/DeiT models (and NViT models).

    granularity: "aligned" (QK/V dims removed from every head of a block at once, the paper) or
    "per-head" (each head keeps its own QK and V dims). group_size: units removed together per
    kind (dims stay multiples of it: hardware-friendly rounding), e.g. {"mlp": 16, "qk": 8}.
    branches: also rank each block's whole attention and MLP branch (layer skipping, as in UVC) in
    the same pool; a removed branch is absent from the converted model. family: the model's structure
    declaration (a nvit.spec.Family subclass) where it is none of nvit.families.FAMILIES.
    """

    # the saliency's state (nvit.scores.SaliencyScores), read and written through
    params, device, plan, scores, n_batches, ema, ema_momentum, criterion, deterministic = (
        _Through("saliency") for _ in range(9))

    def __init__(self, model: nn.Module, target: Target | None = None, *, granularity: str = "aligned",
                 normalize: str = "cost", eta: float = 0.0, latency_table=None,
                 group_size: dict[str, int] | None = None, ema_momentum: float = 0.9,
                 deterministic: bool = False, criterion: str = "hessian", allocation: str = "global",
                 branches: bool = False, family: type[Family] | None = None):
        self.group_size = _group_sizes(granularity, criterion, allocation, normalize, target, eta, latency_table,
                                       group_size)
        self.model, self.target, self.granularity = model, target, granularity
        self.normalize, self.eta, self.table = normalize, float(eta), latency_table
        self.allocation, self.branches = allocation, bool(branches)
        self.adapter = Adapter(model, family(model) if family is not None else None)
        self.masks = self.adapter.full_masks()
        self.adapter.install_norms(self.masks)
        self._unit_ids = self.adapter.units(granularity, branches=self.branches)
        pairs, self.units = self.adapter.saliency_maps(granularity, units=self._unit_ids)
        self.saliency = SaliencyScores(pairs, self.units.num_units, criterion=criterion, ema_momentum=ema_momentum,
                                       deterministic=deterministic)
        self.steps = 0
        self.history: list[dict] = []
        self._pm = self.adapter.prepared_param_masks(self.masks)
        self._fraction_cache: dict[str, float] = {}
        buckets = self._index_units()
        self.dense_config = self.config()
        self.cost = CostModel(self.adapter, latency_table, self.units, self.dense_config, self.group_size,
                              self.branches)
        self.dense_cost = self.cost.dense_cost
        self._uniform = None if allocation != "uniform" else UniformAllocation(
            buckets, [self._unit_rows[us[0]][0] for us in buckets], self.units.num_units, self.adapter.qk_prunable)
        if target is not None:
            floor = self.cost.fraction(target.metric, self.cost.smallest_config())
            if floor > target.fraction:
                raise TargetUnreachableError(
                    f"nvit: target {target.metric} ≤ {target.fraction:.3f} of dense is unreachable: the smallest "
                    f"model the guards allow has {floor:.3f}")

    def _index_units(self) -> list[list[int]]:
        """Per unit, once: its bucket (kind, block, head: the units a group is cut from) as an integer
        id, its group size and its (kind, block, head, index) row. Returns each bucket's unit ids."""
        U = self.units
        _, self._unit_bucket = torch.unique(torch.stack([U.kind, U.block, U.head], 1), dim=0, return_inverse=True)
        self._unit_group_size = torch.tensor([self.group_size[KIND_NAMES[int(k)]] for k in U.kind.tolist()])
        # (kind, block, head, index) per unit as Python ints: _remove runs once per removed unit
        self._unit_rows = list(zip(U.kind.tolist(), U.block.tolist(), U.head.tolist(), U.index.tolist()))
        order = torch.argsort(self._unit_bucket, stable=True)
        return [t.tolist() for t in torch.split(order, torch.bincount(self._unit_bucket).tolist())]

    # ---- costs (nvit.cost_model) and removal rules (nvit.kinds), for the current masks -----------
    def config(self) -> NViTConfig:
        """The architecture the current masks describe (what convert() will build)."""
        return self.adapter.nvit_config(self.masks)

    def fraction(self, metric: str | None = None) -> float:
        """Current metric / dense metric; cached until the masks change (training loops ask often)."""
        metric = metric or self.target.metric
        if metric not in self._fraction_cache:
            self._fraction_cache[metric] = self.cost.fraction(metric, self.config())
        return self._fraction_cache[metric]

    @property
    def done(self) -> bool:
        return self.target is not None and self.fraction() <= self.target.fraction

    def _probe(self, units: list[int], masks: Masks | None = None) -> float:
        """The exact target fraction of `masks` (default: the current ones, left as they are) less `units`."""
        masks = (self.masks if masks is None else masks).clone()
        for u in units:
            kinds.remove(masks, *self._unit_rows[u])
        return self.cost.fraction(self.target.metric, self.adapter.nvit_config(masks))

    def _delta(self, metric: str, cfg: NViTConfig, kind: int, block: int, head: int) -> float:
        return self.cost.delta(metric, cfg, kind, block, head)

    def _rank_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔC per unit in the target metric (FLOPs without a target) as a fraction of dense, η·ΔLat/Lat_dense)."""
        return self.cost.rank_terms(self.target.metric if self.target else "flops", self.eta, self.masks)

    def _remove(self, u: int) -> None:
        kinds.remove(self.masks, *self._unit_rows[u])

    def _allowed(self, g: _Group) -> bool:
        """The guards (nvit.kinds.allowed) for removing group `g` from the current masks."""
        return kinds.allowed(self.masks, g.kind, g.block, g.head, [self._unit_rows[u][3] for u in g.units],
                             self.adapter.qk_prunable)

    # ---- saliency (nvit.scores) and masks -------------------------------------------------------
    def accumulate(self) -> None:
        """Add this mini-batch's (Σ g·w)² of every structure into the score buffer (after backward)."""
        self.saliency.accumulate()

    @property
    def has_saliency(self) -> bool:
        """Whether a prune step can rank now: a batch was accumulated since the last step, or an earlier
        step left an EMA. When False, prune_step() raises NoSaliencyError (and changes nothing)."""
        return self.saliency.has_saliency

    def step_scores(self) -> torch.Tensor:
        """Saliency per unit for ranking (see SaliencyScores.step_scores); NoSaliencyError when none yet."""
        return self.saliency.step_scores()

    def apply_masks(self) -> None:
        """Zero pruned weights (after each optimizer step)."""
        self.adapter.apply_masks(self.masks, self._pm)

    def unit_alive(self) -> torch.Tensor:
        """Whether each unit is still in the model (an aligned QK/V unit: in any alive head)."""
        return kinds.alive(self.masks, self._unit_ids.tables, self.granularity, self.units.num_units)

    # ---- ranking and stepping ----------------------------------------------------------------
    def _replay(self, masks: Masks, groups: list[_Group]) -> None:
        """Set the masks to `masks` (a checkpoint, copied) with `groups` removed in order."""
        self.masks = masks.clone()
        for u in (u for g in groups for u in g.units):
            self._remove(u)

    def prune_step(self, n_units: int) -> PruneStepInfo:
        """Remove up to `n_units` lowest-ranked units, group by group (fewer if the target is reached).

        A removal group is the set of units removed together: `group_size[kind]` units of one (kind,
        block, head) bucket (e.g. 16 MLP channels of a block, one head, one QK or V dim group, a branch),
        with what they take (nvit.kinds.TAKES: a head its QK/V dims, a branch its contents).

        Stopping rule, with a target t: groups go in rank order until the EXACT fraction f (the target
        metric of the resulting config / the dense model's) is ≤ t, or `n_units` units are gone, or no
        allowed group remains; a step that reaches t lands at t − last_group_cost < f ≤ t (how, and
        cheaply: nvit.stopping.ExactStop). history[-1] records "fraction" (f, exact), "last_group_cost"
        (also in the returned info), "last_group" (its kind, block, head, units), "target", "metric",
        "fraction_before" and "reached" (f ≤ t), so the bound can be checked afterwards. Without a
        target, n_units go. allocation="uniform": nvit.uniform.UniformAllocation chooses instead.
        """
        if n_units < 1:
            raise ValueError("nvit: n_units must be ≥1")
        sal = self.step_scores()
        alive = self.unit_alive()
        t = self.target.fraction if self.target else None
        frac0 = self.fraction() if self.target else 1.0
        if self._uniform is not None:
            chosen, last_cost = self._uniform.choose(sal, alive, n_units, frac0, t, self._probe)
            for u in chosen:
                self._remove(u)
            return self._finish(chosen, frac0, last_cost, None if last_cost is None else {"kind": "uniform slice"},
                                lambda f: f"nvit: uniform pruning cannot go below {f:.3f} of {self.target.metric}")
        dc, lat = self._rank_terms()
        units, gstart, gcost, order = rank_groups(sal, dc, lat, alive, self._unit_bucket, self._unit_group_size,
                                                  self.normalize == "cost")
        units_l, starts = units.tolist(), gstart.tolist() + [units.numel()]
        gcost_l, rows = gcost.tolist(), self._unit_rows
        applied: list[_Group] = []  # the groups removed, in order
        stop = None if t is None else ExactStop(t, frac0, lambda: self._probe([]), lambda: self.masks.clone(),
                                                lambda m, gs: self._probe([u for g in gs for u in g.units], m))
        count = 0
        for gi in order.tolist():  # visits only the groups it removes or the guards skip
            if (stop is not None and stop.reached) or count >= n_units:
                break
            us = units_l[starts[gi]:starts[gi + 1]]
            k, b, h, _ = rows[us[0]]
            g = _Group(us, k, b, h, gcost_l[gi])
            if not self._allowed(g):
                continue
            for u in g.units:
                self._remove(u)
            applied.append(g)
            count += len(g.units)
            if stop is not None:
                stop.removed(g.cost)
        last_cost = None
        if stop is not None and applied:
            n, last_cost = stop.finish(applied, self._replay)
            applied = applied[:n]
        last = applied[-1] if applied else None
        return self._finish([u for g in applied for u in g.units], frac0, last_cost,
                            None if last is None else {"kind": KIND_NAMES[last.kind], "block": last.block,
                                                       "head": last.head, "units": len(last.units)},
                            lambda f: f"nvit: no structure can be removed any more and {self.target.metric} is still "
                                      f"{f:.3f} > target {self.target.fraction}")

    def _finish(self, units: list[int], frac0: float, last_cost: float | None, last_group: dict | None,
                unreachable) -> PruneStepInfo:
        """A step's end (`units` removed): the masks installed, the step counted and recorded in history
        (what went, the exact fraction before and after, the exact cost of the last removal group: the
        tolerance of a step that reaches the target). Removing nothing short of the target raises
        TargetUnreachableError(unreachable(fraction))."""
        removed = {k: 0 for k in KIND_NAMES}
        for u in units:
            removed[KIND_NAMES[self._unit_rows[u][0]]] += 1
        self._refresh()
        self.steps += 1
        tgt = self.target
        frac = self.fraction() if tgt else 1.0
        if not units and tgt and frac > tgt.fraction:
            raise TargetUnreachableError(unreachable(frac))
        self.history.append({
            "step": self.steps, "removed": removed, "fraction": frac,
            "metric": None if tgt is None else tgt.metric, "target": None if tgt is None else tgt.fraction,
            "fraction_before": frac0, "reached": tgt is not None and frac <= tgt.fraction,
            "last_group_cost": last_cost, "last_group": last_group})
        return PruneStepInfo(removed, frac, self.done, self.steps, last_cost)

    def prune_to_target(self, n_per_step: int = 64) -> list[PruneStepInfo]:
        """One-shot: repeat prune steps on the saliency gathered so far until the target is met."""
        if self.target is None:
            raise ValueError("nvit: prune_to_target needs a target")
        infos = []
        while not self.done:
            infos.append(self.prune_step(n_per_step))
        return infos

    def _refresh(self) -> None:
        self._fraction_cache.clear()
        self.adapter.install_norms(self.masks)
        self._pm = self.adapter.prepared_param_masks(self.masks)
        self.apply_masks()

    def set_masks(self, masks: Masks) -> None:
        self.masks = masks.clone()
        self._refresh()

    # ---- conversion and state ----------------------------------------------------------------
    def convert(self, provenance: dict | None = None) -> NViT:
        prov = {"granularity": self.granularity, "prune_steps": self.steps, "branches": self.branches,
                "target": None if self.target is None else {"metric": self.target.metric,
                                                            "fraction": self.target.fraction}}
        prov.update(provenance or {})
        return self.adapter.convert(self.masks, prov)

    def state_dict(self) -> dict:
        return {"masks": {k: v.clone() for k, v in self.masks.state_dict().items()},
                "ema": None if self.ema is None else self.ema.clone(), "scores": self.scores.detach().cpu().clone(),
                "n_batches": self.n_batches, "steps": self.steps, "history": list(self.history)}

    def load_state_dict(self, d: dict) -> None:
        self.set_masks(Masks.from_state_dict(d["masks"]))
        self.ema = None if d["ema"] is None else d["ema"].double()
        self.scores.copy_(d["scores"].to(self.scores.device))
        self.n_batches, self.steps, self.history = int(d["n_batches"]), int(d["steps"]), list(d["history"])


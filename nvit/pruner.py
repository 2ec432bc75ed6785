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
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from nvit_kernels.saliency import SaliencyPlan, saliency_accumulate

from .model import BlockConfig, NViT, NViTConfig
from .spec import Family
from .spec import ATTN_BRANCH, EMBED, GRANULARITIES, HEAD, KIND_NAMES, MLP, MLP_BRANCH, QK, V
from .structures import Adapter, Masks

METRICS = ("latency", "flops", "params")


class TargetUnreachableError(RuntimeError):
    """The target cannot be met without removing a structure the guards keep."""


class NoSaliencyError(RuntimeError):
    """A prune step was asked for before any saliency was accumulated (no accumulate() since the
    pruner was made, and no EMA from an earlier step). Nothing was changed: accumulate the saliency of
    at least one batch and call prune_step() again (a training loop may simply postpone the step;
    ``Pruner.has_saliency`` says beforehand whether a step can rank)."""


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


def _reshaped(b: BlockConfig, qk: list[int], v: list[int], mlp: int, scales: list[float]) -> BlockConfig:
    """`b` with other dims, of the same config class (a family's block config may carry more, e.g. a
    Swin block its stage, which its cost reads); rotary source indices are dropped (costs ignore them)."""
    return dataclasses.replace(b, qk_dims=qk, v_dims=v, mlp=mlp, scales=scales, qk_index=None)


class Pruner:
    """Global Hessian-saliency pruner for timm ViT/DeiT models (and NViT models).

    granularity: "aligned" (QK/V dims removed from every head of a block at once, the paper) or
    "per-head" (each head keeps its own QK and V dims). group_size: units removed together per
    kind (dims stay multiples of it: hardware-friendly rounding), e.g. {"mlp": 16, "qk": 8}.
    branches: also rank each block's whole attention and MLP branch (layer skipping, as in UVC) in
    the same pool; a removed branch is absent from the converted model. family: the model's structure
    declaration (a nvit.spec.Family subclass) where it is none of nvit.families.FAMILIES.
    """

    def __init__(self, model: nn.Module, target: Target | None = None, *, granularity: str = "aligned",
                 normalize: str = "cost", eta: float = 0.0, latency_table=None,
                 group_size: dict[str, int] | None = None, ema_momentum: float = 0.9,
                 deterministic: bool = False, criterion: str = "hessian", allocation: str = "global",
                 branches: bool = False, family: type[Family] | None = None):
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
        self.model, self.target, self.granularity = model, target, granularity
        self.normalize, self.eta, self.table = normalize, float(eta), latency_table
        self.ema_momentum, self.deterministic = ema_momentum, deterministic
        self.criterion, self.allocation, self.branches = criterion, allocation, bool(branches)
        gs = {k: 1 for k in KIND_NAMES}
        for k, v in (group_size or {}).items():
            if k not in gs or int(v) < 1:
                raise ValueError(f"nvit: group_size keys are {KIND_NAMES} with values ≥1, got {k}={v}")
            gs[k] = int(v)
        self.group_size = gs

        self.adapter = Adapter(model, family(model) if family is not None else None)
        self.masks = self.adapter.full_masks()
        self.adapter.install_norms(self.masks)
        self._unit_ids = self.adapter.units(granularity, branches=self.branches)
        pairs, self.units = self.adapter.saliency_maps(granularity, units=self._unit_ids)
        self.params = [p for p, _ in pairs]
        self.device = self.params[0].device
        self.plan = SaliencyPlan.build([t for _, t in pairs], self.units.num_units, device=self.device)
        self.scores = torch.zeros(self.units.num_units, dtype=torch.float32, device=self.device)
        self.n_batches = 0
        self.ema: torch.Tensor | None = None
        self.steps = 0
        self.history: list[dict] = []
        self._pm = self.adapter.prepared_param_masks(self.masks)
        self._fraction_cache: dict[str, float] = {}
        self._index_units()
        self.dense_config = self.config()
        if self.table is not None and not self.table.covers(self.dense_config):
            raise ValueError(f"nvit: this latency table does not model {self.dense_config.family} blocks "
                             f"(LatencyTable: ViT blocks; SwinLatencyTables: a Swin's stages); prune to a FLOPs "
                             f"or params target")
        self.dense_cost = {m: self._metric(m, self.dense_config) for m in METRICS if m != "latency" or self.table}
        if target is not None:
            floor = self._metric(target.metric, self._smallest_config()) / self.dense_cost[target.metric]
            if floor > target.fraction:
                raise TargetUnreachableError(
                    f"nvit: target {target.metric} ≤ {target.fraction:.3f} of dense is unreachable: the smallest "
                    f"model the guards allow has {floor:.3f}")

    def _index_units(self) -> None:
        """Per unit, once: its cost key (kind, block, head; a head unit's head is its index) and its
        bucket (kind, block, head: the units a group is cut from), as integer ids."""
        U = self.units
        head_of = torch.where(U.kind == HEAD, U.index, U.head)
        key_t = torch.stack([U.kind, U.block, head_of], 1)
        keys, self._unit_key = torch.unique(key_t, dim=0, return_inverse=True)
        self._keys = [tuple(int(v) for v in row) for row in keys.tolist()]
        bucket_t = torch.stack([U.kind, U.block, U.head], 1)
        _, self._unit_bucket = torch.unique(bucket_t, dim=0, return_inverse=True)
        self._unit_group_size = torch.tensor([self.group_size[KIND_NAMES[int(k)]] for k in U.kind.tolist()])
        # (kind, block, head, index) per unit as Python ints: _remove runs once per removed unit
        self._unit_rows = list(zip(U.kind.tolist(), U.block.tolist(), U.head.tolist(), U.index.tolist()))

    # ---- costs -----------------------------------------------------------------------------------
    def config(self) -> NViTConfig:
        """The architecture the current masks describe (what convert() will build)."""
        return self.adapter.nvit_config(self.masks)

    def _metric(self, metric: str, cfg: NViTConfig) -> float:
        if metric == "latency":
            return float(self.table.model_latency(cfg))
        return self.adapter.family.cost(metric, cfg)

    def fraction(self, metric: str | None = None) -> float:
        """Current metric / dense metric; cached until the masks change (training loops ask often)."""
        metric = metric or self.target.metric
        if metric not in self._fraction_cache:
            self._fraction_cache[metric] = self._metric(metric, self.config()) / self.dense_cost[metric]
        return self._fraction_cache[metric]

    @property
    def done(self) -> bool:
        return self.target is not None and self.fraction() <= self.target.fraction

    def _smallest_config(self) -> NViTConfig:
        """The smallest architecture the guards and group sizes allow: every bucket keeps the fewest
        units it can (≥1, and the removed count a multiple of the kind's group size), QK dims stay
        whole where they cannot be pruned (q/k norm)."""
        c, gs = self.dense_config, self.group_size

        def floor(n: int, kind: str) -> int:  # removals leave multiples of g alive, never none
            g = gs[kind]
            return g if n >= g else n

        blocks = []
        for b in c.blocks:  # uneven dims (a re-pruned NViT model): the smallest heads, a lower bound
            heads = floor(len(b.qk_dims), "head")
            if self.adapter.qk_prunable:
                w = self.adapter.qk_width  # dims per QK unit
                qk = [min(floor(q // w, "qk") * w for q in b.qk_dims)] * heads
            else:
                qk = sorted(b.qk_dims)[:heads]
            v = [min(floor(d, "v") for d in b.v_dims)] * heads
            blocks.append(_reshaped(b, [], [], 0, []) if self.branches
                          else _reshaped(b, qk, v, floor(b.mlp, "mlp"), b.scales[:heads]))
        fam = self.adapter.family
        return fam.with_embed_widths(dataclasses.replace(c, blocks=blocks),
                                     [floor(w, "embed") for w in fam.embed_widths(c)])

    def _block_metric(self, metric: str, cfg: NViTConfig, blk: BlockConfig) -> float:
        """The part of `metric` one block contributes (every metric is a sum over blocks plus terms
        that depend on the embedding width alone)."""
        if metric == "latency":
            return float(self.table.config_block_latency(cfg, blk))
        return self.adapter.family.block_cost(metric, cfg, blk)

    def _delta(self, metric: str, cfg: NViTConfig, kind: int, block: int, head: int) -> float:
        """Exact cost saved by removing one unit of `kind` at (block, head position) from `cfg`
        (head < 0: a QK/V unit shared by all heads). Block kinds recount only their block."""
        if kind == EMBED:  # an embedding unit's block is its stage (-1: the one stream)
            fam, stage = self.adapter.family, max(block, 0)
            widths = fam.embed_widths(cfg)
            if widths[stage] <= 1:
                return 0.0  # not removable; guarded elsewhere
            widths[stage] -= 1
            return self._metric(metric, cfg) - self._metric(metric, fam.with_embed_widths(cfg, widths))
        b = cfg.blocks[block]
        qk, v, sc, mlp = list(b.qk_dims), list(b.v_dims), list(b.scales), b.mlp
        if kind in (ATTN_BRANCH, MLP_BRANCH):
            rest = _reshaped(b, [], [], mlp, []) if kind == ATTN_BRANCH else _reshaped(b, qk, v, 0, sc)
            return self._block_metric(metric, cfg, b) - self._block_metric(metric, cfg, rest)
        if kind == HEAD:
            del qk[head], v[head], sc[head]
        elif kind in (QK, V):
            dims = qk if kind == QK else v
            for i in (range(len(dims)) if head < 0 else [head]):
                dims[i] -= self.adapter.qk_width if kind == QK else 1
        else:
            mlp -= 1
        if not qk or min(qk + v + [mlp]) < 1:
            return 0.0
        return self._block_metric(metric, cfg, b) - self._block_metric(metric, cfg, _reshaped(b, qk, v, mlp, sc))

    def _unit_deltas(self, metric: str) -> torch.Tensor:
        """ΔC per unit (float64, CPU) of `metric`, for the current masks: one exact delta per
        (kind, block, head) key, spread to the units by index (no loop over units)."""
        cfg = self.config()
        alive_pos = [m.nonzero().flatten().tolist() for m in self.masks.heads]
        per_key = torch.zeros(len(self._keys), dtype=torch.float64)
        for i, (k, b, h) in enumerate(self._keys):
            hp = h
            if h >= 0:  # the original head index → its position among the alive heads
                if h not in alive_pos[b]:
                    continue
                hp = alive_pos[b].index(h)
            per_key[i] = self._delta(metric, cfg, k, b, hp)
        return per_key[self._unit_key]

    # ---- saliency ------------------------------------------------------------------------------
    def accumulate(self) -> None:
        """Add this mini-batch's (Σ g·w)² of every structure into the score buffer (after backward)."""
        if self.criterion == "magnitude":  # baseline: (Σ w²)² per unit, no gradient needed
            w = [p.detach() for p in self.params]
            saliency_accumulate(w, w, self.plan, self.scores, deterministic=self.deterministic)
            self.n_batches += 1
            return
        grads = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                raise RuntimeError(f"nvit: parameter #{i} (shape {tuple(p.shape)}) has no gradient; "
                                   "call accumulate() after loss.backward()")
            grads.append(p.grad)
        saliency_accumulate([p.detach() for p in self.params], grads, self.plan, self.scores,
                            deterministic=self.deterministic)
        self.n_batches += 1

    def apply_masks(self) -> None:
        """Zero pruned weights (after each optimizer step)."""
        self.adapter.apply_masks(self.masks, self._pm)

    def unit_alive(self) -> torch.Tensor:
        """Whether each unit is still in the model (an aligned QK/V unit: in any alive head)."""
        alive = torch.zeros(self.units.num_units, dtype=torch.bool)
        for (kind, block), ids in self._unit_ids.tables.items():
            live = self.masks.table(kind, block)
            if self.granularity == "aligned" and kind in (QK, V):  # one row of ids shared by every head
                ids, live = ids[:1], live.any(0, keepdim=True)
            ok = ids >= 0
            alive[ids[ok]] = live[ok]
        return alive

    def _remove(self, u: int) -> None:
        k, b, h, i = self._unit_rows[u]
        M = self.masks
        if k == EMBED:  # the block of an embedding unit is its stage
            M.embed_of(b)[i] = False
        elif k == ATTN_BRANCH:  # the whole branch: every head goes with it
            M.attn_on[b] = False
            M.heads[b][:] = False
            M.qk[b][:] = False
            M.v[b][:] = False
        elif k == MLP_BRANCH:
            M.mlp_on[b] = False
            M.mlp[b][:] = False
        elif k == HEAD:  # a head unit's head is its index
            M.heads[b][i] = False
            M.qk[b][i] = False
            M.v[b][i] = False
        elif k == MLP:
            M.mlp[b][i] = False
        else:
            mm = M.qk[b] if k == QK else M.v[b]
            if h < 0:
                mm[:, i] = False
            else:
                mm[h, i] = False

    @property
    def has_saliency(self) -> bool:
        """Whether a prune step can rank now: a batch was accumulated since the last step, or an earlier
        step left an EMA. When False, prune_step() raises NoSaliencyError (and changes nothing)."""
        return self.n_batches > 0 or self.ema is not None

    def step_scores(self) -> torch.Tensor:
        """Saliency per unit used for ranking: batch average since the last step, EMA across steps.
        Raises NoSaliencyError (a RuntimeError) when there is none yet (see has_saliency)."""
        if self.n_batches == 0:
            if self.ema is None:
                raise NoSaliencyError("nvit: no saliency accumulated yet; call accumulate() after backward first")
            return self.ema
        avg = (self.scores / self.n_batches).double().cpu()
        m = self.ema_momentum
        self.ema = avg if self.ema is None else m * self.ema + (1 - m) * avg
        self.scores.zero_()
        self.n_batches = 0
        return self.ema

    def _rank_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔC per unit in the target metric as a fraction of dense, η·ΔLat/Lat_dense per unit).

        A unit whose removal saves nothing in the target metric (a flat stretch of a measured latency
        table: the grid is coarser than one unit) is costed by the FLOPs it saves, as a fraction of the
        dense FLOPs -- the metric's best local proxy -- rather than ranked as infinitely expensive."""
        metric = self.target.metric if self.target else "flops"
        dc = self._unit_deltas(metric) / self.dense_cost[metric]
        if metric != "flops" and bool((dc <= 0).any()):
            flat = dc <= 0
            dc[flat] = self._unit_deltas("flops")[flat] / self.dense_cost["flops"]
        lat = torch.zeros_like(dc)
        if self.eta:
            lat = self.eta * self._unit_deltas("latency") / self.dense_cost["latency"]
        return dc, lat

    def _groups(self, sal: torch.Tensor, dc: torch.Tensor, lat: torch.Tensor, alive: torch.Tensor):
        """Candidate groups, ranked: per bucket the alive units sorted by their own rank and cut into
        groups of the kind's group size (the lowest-ranked remainder first, so dims stay multiples of
        the size); each group ranked as a whole. Vectorised.
        Returns (unit ids sorted into groups, each group's start offset among them, group costs, group
        ids in rank order)."""
        cost_norm = self.normalize == "cost"
        unit_rank = (sal / dc.clamp_min(1e-12) if cost_norm else sal) - lat
        units = alive.nonzero().flatten()
        if units.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0, dtype=torch.float64), empty
        # sort by (bucket, unit rank, unit id): stable sorts from the last key to the first
        units = units[torch.argsort(unit_rank[units], stable=True)]
        units = units[torch.argsort(self._unit_bucket[units], stable=True)]
        bucket = self._unit_bucket[units]
        n = units.numel()
        new_bucket = torch.ones(n, dtype=torch.bool)
        new_bucket[1:] = bucket[1:] != bucket[:-1]
        first = torch.nonzero(new_bucket).flatten()
        size = torch.diff(torch.cat([first, torch.tensor([n])]))
        pos = torch.arange(n) - torch.repeat_interleave(first, size)    # position within the bucket
        bsize = torch.repeat_interleave(size, size)
        g = self._unit_group_size[units]
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

    def _allowed(self, g: _Group) -> bool:
        """Guards: never remove the last head, QK dim, V dim, MLP channel of a block (of a head in
        per-head granularity), nor the last embedding channel of a stage; only a branch unit removes a whole
        branch."""
        M, n = self.masks, len(g.units)
        if g.kind == QK and not self.adapter.qk_prunable:
            return False  # q/k norm: removing a QK dim changes the other dims' normalisation
        if g.kind == EMBED:  # per stage
            return int(M.embed_of(g.block).sum()) - n >= 1
        b = g.block
        if g.kind == ATTN_BRANCH:
            return bool(M.attn_on[b])
        if g.kind == MLP_BRANCH:
            return bool(M.mlp_on[b])
        if g.kind == HEAD:
            return (all(bool(M.heads[b][self._unit_rows[u][3]]) for u in g.units)
                    and int(M.heads[b].sum()) - n >= 1)
        if g.kind == MLP:
            return int(M.mlp[b].sum()) - n >= 1
        mm = (M.qk[b] if g.kind == QK else M.v[b]) & M.heads[b][:, None]
        if g.head >= 0:
            if not bool(M.heads[b][g.head]):
                return False
            return int(mm[g.head].sum()) - n >= 1
        return int(mm.any(0).sum()) - n >= 1

    def _exact_fraction(self) -> float:
        """The target metric of the current masks' config / dense, uncached (the masks change mid-step)."""
        m = self.target.metric
        return self._metric(m, self.config()) / self.dense_cost[m]

    def _replay(self, masks: Masks, groups: list[_Group]) -> None:
        """Set the masks to `masks` (a checkpoint, copied) with `groups` removed in order."""
        self.masks = masks.clone()
        for g in groups:
            for u in g.units:
                self._remove(u)

    def prune_step(self, n_units: int) -> PruneStepInfo:
        """Remove up to `n_units` lowest-ranked units, group by group (fewer if the target is reached).

        A removal group is the set of units removed together: `group_size[kind]` units of one (kind,
        block, head) bucket (e.g. 16 MLP channels of a block), one head (its QK/V dims go with it),
        one QK or V dim group, one whole branch (its contents go with it).

        Stopping rule, with a target t: groups go in rank order until the EXACT fraction f (the target
        metric of the resulting config / the dense model's) is ≤ t, or `n_units` units are gone, or no
        allowed group remains. A step that reaches t lands at

            t − last_group_cost  <  f  ≤  t,

        where last_group_cost is the exact cost (fraction of dense) of the step's last removal group,
        measured on the config just before that group's removal (which was still above t). history[-1]
        records "fraction" (f, exact), "last_group_cost" (also in the returned info), "last_group" (its
        kind, block, head, units), "target", "metric", "fraction_before" and "reached" (f ≤ t), so the
        bound can be checked afterwards. A step that does not reach t records the same quantities
        (last_group_cost: the last group's exact cost, also measured before its removal).

        Speed: the exact fraction is not computed per group. Each group's first-order cost (its units'
        ΔC for the masks at the step's start, which misjudges interacting removals: embedding × MLP, a
        head × its dims, a branch × its contents, a latency table's cross terms) drives a running
        estimate, rescaled by what the last exact measurement showed. The exact fraction is measured
        whenever the estimate has covered half the remaining distance to t since the last measurement
        (near t: after every group). A measurement at or below t means the crossing lies among the
        groups removed since the last measurement above t: those are bisected exactly for the
        shortest prefix at or below t, and the rest are put back. Without a target, n_units go.
        """
        if n_units < 1:
            raise ValueError("nvit: n_units must be ≥1")
        sal = self.step_scores()
        alive = self.unit_alive()
        if self.allocation == "uniform":
            return self._uniform_step(sal, alive, n_units)
        dc, lat = self._rank_terms()
        units, gstart, gcost, order = self._groups(sal, dc, lat, alive)
        units_l, starts = units.tolist(), gstart.tolist() + [units.numel()]
        gcost_l, rows = gcost.tolist(), self._unit_rows
        t = self.target.fraction if self.target else None
        frac0 = frac = self.fraction() if self.target else 1.0
        applied: list[_Group] = []  # the groups removed, in order
        # exact checkpoints (groups applied then, masks then, exact fraction then), all above t
        snaps: list[tuple[int, Masks, float]] = [(0, self.masks.clone(), frac0)] if t is not None else []
        count, drop, scale = 0, 0.0, 1.0  # units removed; estimated drop since the last checkpoint; its scale
        reached = t is not None and frac0 <= t
        measured = True  # whether `frac` is exact for the current masks
        for gi in order.tolist():  # visits only the groups it removes or the guards skip
            if reached or count >= n_units:
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
            if t is None:
                continue
            measured = False
            drop += g.cost
            f_snap = snaps[-1][2]
            if scale * drop >= (f_snap - t) / 2:  # the estimate covered half the way (or crossed): measure
                frac, measured = self._exact_fraction(), True
                if frac <= t:
                    reached = True
                else:
                    if drop > 0:  # how far the first-order estimate was off, for the next stretch
                        scale = min(max((f_snap - frac) / drop, 0.05), 20.0)
                    snaps.append((len(applied), self.masks.clone(), frac))
                    drop = 0.0
        last_cost = None
        if t is not None and applied:
            if not measured:
                frac = self._exact_fraction()
                reached = frac <= t
            i0, m0, f_lo = snaps[-1]
            if reached:  # f(applied[:i0]) > t ≥ f(applied): bisect applied[i0:] for the first crossing
                batch = applied[i0:]
                lo, hi, f_hi, cur = 0, len(batch), frac, len(batch)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    self._replay(m0, batch[:mid])
                    cur, fm = mid, self._exact_fraction()
                    if fm <= t:
                        hi, f_hi = mid, fm
                    else:
                        lo, f_lo = mid, fm
                if cur != hi:
                    self._replay(m0, batch[:hi])
                applied = applied[:i0 + hi]
                frac, last_cost = f_hi, f_lo - f_hi
            else:  # the exact fraction just before the last group, from the latest checkpoint before it
                n = len(applied)
                i, m, f_prev = next(sn for sn in reversed(snaps) if sn[0] <= n - 1)
                if i < n - 1:
                    now = self.masks
                    self._replay(m, applied[i:n - 1])
                    f_prev = self._exact_fraction()
                    self.masks = now
                last_cost = f_prev - frac
        removed = {k: 0 for k in KIND_NAMES}
        for g in applied:
            removed[KIND_NAMES[g.kind]] += len(g.units)
        self._refresh()
        self.steps += 1
        frac = self.fraction() if self.target else 1.0
        if not applied and self.target and frac > self.target.fraction:
            raise TargetUnreachableError(
                f"nvit: no structure can be removed any more and {self.target.metric} is still "
                f"{frac:.3f} > target {self.target.fraction}")
        last = applied[-1] if applied else None
        self._record(removed, frac, frac0, last_cost,
                     None if last is None else {"kind": KIND_NAMES[last.kind], "block": last.block,
                                                "head": last.head, "units": len(last.units)})
        return PruneStepInfo(removed, frac, self.done, self.steps, last_cost)

    def _record(self, removed: dict[str, int], frac: float, frac0: float, last_cost: float | None,
                last_group: dict | None) -> None:
        """The step's entry in history: what went, the exact fraction before and after, and the exact
        cost of the last removal group (the tolerance of a step that reaches the target)."""
        tgt = self.target
        self.history.append({
            "step": self.steps, "removed": removed, "fraction": frac,
            "metric": None if tgt is None else tgt.metric, "target": None if tgt is None else tgt.fraction,
            "fraction_before": frac0, "reached": tgt is not None and frac <= tgt.fraction,
            "last_group_cost": last_cost, "last_group": last_group})

    def _uniform_step(self, sal: torch.Tensor, alive: torch.Tensor, n_units: int) -> PruneStepInfo:
        """Baseline allocation: every (kind, block) bucket keeps the same fraction of its dense units
        (the lowest-scored go), so all blocks keep the same shape; the fraction shrinks by n_units of
        the whole model per step, and the last step stops at the largest kept ratio that meets the target.

        The kept ratio r keeps ceil(r · dense size) units (≥1) per bucket, so the plan only changes at
        ratios j/n (n a bucket's dense size): the step bisects exactly over those. Its "last group" is
        the slice between two neighbouring ratios -- one unit from each bucket whose count changes there
        (the ratio is common to all buckets, so a slice is one unit of every bucket of that size: one
        layer of the uniform shape, the smallest step uniform allocation can take). Its exact cost,
        measured on the config with the slice still in (above the target), is "last_group_cost"; a step
        that reaches the target lands in (target − last_group_cost, target]. Group sizes are not applied
        here (the baseline removes single units)."""
        from fractions import Fraction

        U = self.units
        kind, block, head = U.kind.tolist(), U.block.tolist(), U.head.tolist()
        buckets: dict[tuple, list[int]] = {}
        for u in range(U.num_units):
            buckets.setdefault((kind[u], block[u], head[u]), []).append(u)
        order = {key: sorted((u for u in us if alive[u]), key=lambda u: (float(sal[u]), u))
                 for key, us in buckets.items() if not (key[0] == QK and not self.adapter.qk_prunable)}

        def plan(keep: Fraction) -> list[int]:  # units to remove so each bucket keeps ceil(keep · dense size)
            out = []
            for key, live in order.items():
                n_keep = max(1, math.ceil(keep * len(buckets[key])))
                out += live[: max(0, len(live) - n_keep)]
            return out

        def frac_after(units: list[int]) -> float:
            saved = self.masks.clone()
            for u in units:
                self._remove(u)
            f = self._exact_fraction()  # not fraction(): its cache is for the real masks
            self.masks = saved
            return f

        # the ratios where the plan changes, from the step's full-size ratio up to 1 (nothing removed)
        keep = Fraction(max(0, int(alive.sum()) - n_units), U.num_units)
        sizes = {len(buckets[key]) for key in order}
        ratios = sorted({Fraction(j, n) for n in sizes for j in range(1, n + 1) if Fraction(j, n) >= keep})
        chosen, last_cost = plan(keep), None
        frac0 = self.fraction() if self.target else 1.0
        if self.target and frac0 <= self.target.fraction:
            chosen = []  # already there
        elif self.target and chosen:
            t, f_lo = self.target.fraction, frac_after(chosen)
            if f_lo <= t:  # the target lies within this step: the largest ratio that meets it
                lo, hi, f_hi = 0, len(ratios) - 1, frac0  # plan(ratios[-1] = 1) removes nothing
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    fm = frac_after(plan(ratios[mid]))
                    if fm <= t:
                        lo, f_lo = mid, fm
                    else:
                        hi, f_hi = mid, fm
                chosen, last_cost = plan(ratios[lo]), f_hi - f_lo
            elif len(ratios) > 1:  # not there yet: the cost of this step's last slice
                last_cost = frac_after(plan(ratios[1])) - f_lo
        removed = {k: 0 for k in KIND_NAMES}
        for u in chosen:
            self._remove(u)
            removed[KIND_NAMES[kind[u]]] += 1
        self._refresh()
        self.steps += 1
        frac = self.fraction() if self.target else 1.0
        if not chosen and self.target and frac > self.target.fraction:
            raise TargetUnreachableError(f"nvit: uniform pruning cannot go below {frac:.3f} of {self.target.metric}")
        self._record(removed, frac, frac0, last_cost, None if last_cost is None else {"kind": "uniform slice"})
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


"""What a pruning target measures: the metrics of converted architectures, and exactly what removing
one unit saves in them.

The metrics are "flops" and "params" (the family's counts) and "latency" (a latency table's model).
Every metric is a sum over blocks plus terms that depend on the embedding widths alone, so removing a
unit of a block recounts that block only; removing an embedding channel recounts the model. What a
removal takes with it, and where the floors forbid it, is nvit.kinds' (block_after).
"""
from __future__ import annotations

import dataclasses

import torch

from .kinds import EMBED, FLOOR, HEAD, QK, prunable
from .kinds import block_after
from .model import BlockConfig, NViTConfig
from .spec import Masks, UnitIndex
from .structures import Adapter

METRICS = ("latency", "flops", "params")


def _reshaped(b: BlockConfig, qk: list[int], v: list[int], mlp: int, scales: list[float]) -> BlockConfig:
    """`b` with other dims, of the same config class (a family's block config may carry more, e.g. a
    Swin block its stage, which its cost reads); rotary source indices are dropped (costs ignore them)."""
    return dataclasses.replace(b, qk_dims=qk, v_dims=v, mlp=mlp, scales=scales, qk_index=None)


class CostModel:
    """The metrics of one model's converted architectures (dense: `dense_config`, `dense_cost`) and
    the exact cost each unit's removal saves.

    adapter: the model's nvit.structures.Adapter; table: a latency table (None: no "latency" metric);
    units: the pruner's unit index (each unit's cost is that of its (kind, block, head) key);
    group_size, branches: the pruner's, for the smallest architecture it can reach."""

    def __init__(self, adapter: Adapter, table, units: UnitIndex, dense_config: NViTConfig,
                 group_size: dict[str, int], branches: bool):
        self.adapter, self.family, self.table = adapter, adapter.family, table
        self.dense_config, self.group_size, self.branches = dense_config, group_size, branches
        if table is not None and not table.covers(dense_config):
            raise ValueError(f"nvit: this latency table does not model {dense_config.family} blocks "
                             f"(LatencyTable: ViT blocks; SwinLatencyTables: a Swin's stages); prune to a FLOPs "
                             f"or params target")
        self.dense_cost = {m: self.metric(m, dense_config) for m in METRICS if m != "latency" or table}
        # per unit, once: its cost key (kind, block, head; a head unit's head is its index)
        head_of = torch.where(units.kind == HEAD, units.index, units.head)
        keys, self._unit_key = torch.unique(torch.stack([units.kind, units.block, head_of], 1), dim=0,
                                            return_inverse=True)
        self._keys = [tuple(int(v) for v in row) for row in keys.tolist()]

    def metric(self, metric: str, cfg: NViTConfig) -> float:
        if metric == "latency":
            return float(self.table.model_latency(cfg))
        return self.family.cost(metric, cfg)

    def fraction(self, metric: str, cfg: NViTConfig) -> float:
        """`metric` of `cfg` / the dense model's (exact, uncached)."""
        return self.metric(metric, cfg) / self.dense_cost[metric]

    def block_metric(self, metric: str, cfg: NViTConfig, blk: BlockConfig) -> float:
        """The part of `metric` one block contributes."""
        if metric == "latency":
            return float(self.table.config_block_latency(cfg, blk))
        return self.family.block_cost(metric, cfg, blk)

    def smallest_config(self) -> NViTConfig:
        """The smallest architecture the guards and group sizes allow: every bucket keeps the fewest
        units it can (≥ FLOOR, and the removed count a multiple of the kind's group size), QK dims stay
        whole where they cannot be pruned (q/k norm), blocks lose both branches where branches are ranked."""
        c, gs = self.dense_config, self.group_size

        def floor(n: int, kind: str) -> int:  # removals leave multiples of g alive, never fewer than FLOOR
            g = gs[kind]
            return max(g, FLOOR) if n >= g else n

        blocks = []
        for b in c.blocks:  # uneven dims (a re-pruned NViT model): the smallest heads, a lower bound
            heads = floor(len(b.qk_dims), "head")
            if prunable(QK, self.adapter.qk_prunable):
                w = self.adapter.qk_width  # dims per QK unit
                qk = [min(floor(q // w, "qk") * w for q in b.qk_dims)] * heads
            else:
                qk = sorted(b.qk_dims)[:heads]
            v = [min(floor(d, "v") for d in b.v_dims)] * heads
            blocks.append(_reshaped(b, [], [], 0, []) if self.branches
                          else _reshaped(b, qk, v, floor(b.mlp, "mlp"), b.scales[:heads]))
        fam = self.family
        return fam.with_embed_widths(dataclasses.replace(c, blocks=blocks),
                                     [floor(w, "embed") for w in fam.embed_widths(c)])

    def delta(self, metric: str, cfg: NViTConfig, kind: int, block: int, head: int) -> float:
        """Exact cost saved by removing one unit of `kind` at (block, head position) from `cfg`
        (head < 0: a QK/V unit shared by all heads); 0 where the floors forbid the removal."""
        if kind == EMBED:  # an embedding unit's block is its stage (-1: the one stream)
            stage = max(block, 0)
            widths = self.family.embed_widths(cfg)
            if widths[stage] - 1 < FLOOR:
                return 0.0  # not removable; guarded elsewhere
            widths[stage] -= 1
            return self.metric(metric, cfg) - self.metric(metric, self.family.with_embed_widths(cfg, widths))
        b = cfg.blocks[block]
        after = block_after(b.qk_dims, b.v_dims, b.scales, b.mlp, kind, head, self.adapter.qk_width)
        if after is None:
            return 0.0
        qk, v, scales, mlp = after
        return self.block_metric(metric, cfg, b) - self.block_metric(metric, cfg, _reshaped(b, qk, v, mlp, scales))

    def unit_deltas(self, metric: str, masks: Masks) -> torch.Tensor:
        """ΔC per unit (float64, CPU) of `metric` for `masks`: one exact delta per (kind, block, head)
        key, spread to the units by index (no loop over units)."""
        cfg = self.adapter.nvit_config(masks)
        alive_pos = [m.nonzero().flatten().tolist() for m in masks.heads]
        per_key = torch.zeros(len(self._keys), dtype=torch.float64)
        for i, (k, b, h) in enumerate(self._keys):
            hp = h
            if h >= 0:  # the original head index → its position among the alive heads
                if h not in alive_pos[b]:
                    continue
                hp = alive_pos[b].index(h)
            per_key[i] = self.delta(metric, cfg, k, b, hp)
        return per_key[self._unit_key]

    def rank_terms(self, metric: str, eta: float, masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔC per unit in `metric` as a fraction of dense, η·ΔLat/Lat_dense per unit).

        A unit whose removal saves nothing in the target metric (a flat stretch of a measured latency
        table: the grid is coarser than one unit) is costed by the FLOPs it saves, as a fraction of the
        dense FLOPs -- the metric's best local proxy -- rather than ranked as infinitely expensive."""
        dc = self.unit_deltas(metric, masks) / self.dense_cost[metric]
        if metric != "flops" and bool((dc <= 0).any()):
            flat = dc <= 0
            dc[flat] = self.unit_deltas("flops", masks)[flat] / self.dense_cost["flops"]
        lat = torch.zeros_like(dc)
        if eta:
            lat = eta * self.unit_deltas("latency", masks) / self.dense_cost["latency"]
        return dc, lat

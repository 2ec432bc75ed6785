"""What a prunable structure *is*, declared once per model family and derived everywhere else.

Data flow (one read, top to bottom)::

    model ──Family.slices()──▶ [Slice]          which positions of which parameter each structure owns
          ──Units.build()────▶ unit ids         one id per structure (kind, block, head, index)
    [Slice] + unit ids ──saliency_maps()──▶ segment maps for the fused saliency kernel (nvit_kernels)
    kernel ──▶ scores per unit ──Pruner──▶ Masks (what is kept)
    [Slice] + Masks ──keep_masks()──▶ which rows/columns are zero in the masked model
    [Slice] + Masks ──sliced_state()──▶ the kept rows/columns, in the converted model's order
          ──Family.config()/convert_state()──▶ the converted NViT model

A family (``nvit/families/*.py``) declares, for one model instance: its dims (heads, per-head QK and
V units, MLP width, embedding width), every :class:`Slice` (parameter, axis, which structure each
position belongs to, and whether the slice *writes* the structure's gated output -- the only slices
whose w·g enters the structure's saliency), the embedding LayerNorms, its guards (modules it cannot
prune exactly), the converted architecture (an :class:`~nvit.model.NViTConfig`, whose params/FLOPs
nvit.cost counts) and how the sliced parameters are named there. Everything else -- saliency maps,
zeroing masks, conversion slicing, unit bookkeeping -- is derived here, the same for every family.

All of this bookkeeping (slice indices, unit tables, masks) lives on the CPU whatever device the model's
parameters are on and whatever the default device is: a model built under ``with torch.device("meta")``
(shapes only) or with a CUDA default device gets the same slices, units and masks, with real values.

Kinds (the method's structures)::

    embed        one embedding channel (shared by every block through the residual stream); a hierarchical
                 model (Swin) has one embedding per stage: its units and slices carry the stage in `block`
                 (a single-stream model's one embedding has block -1)
    head         one attention head of a block
    qk / v       one QK (V) unit of a head (per-head granularity) or of every head of a block (aligned);
                 a QK unit is `Family.qk_width` dims (2 for rotary embeddings: a rotated pair)
    mlp          one MLP channel of a block
    attn_branch / mlp_branch   a block's whole attention / MLP branch (layer skipping)

The kinds and the rules of removing a unit -- what it takes with it (a head its QK/V units, a branch
its contents), the floors (never the last head, QK/V unit, MLP or embedding channel), what may go at
all -- are declared once in :mod:`nvit.kinds`, and the masks below, the Pruner's removals, its cost
deltas (nvit.cost_model) and its guards all read them there.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from nvit_kernels.saliency import TensorMap

from .kinds import (ATTN_BRANCH, EMBED, GRANULARITIES, HEAD, KIND_NAMES, MLP, MLP_BRANCH, QK,  # noqa: F401
                    TAKES, V)


class UnsupportedModelError(ValueError):
    """The model has modules nvit cannot prune exactly."""


# --------------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------------
@dataclass
class Slice:
    """The positions along one axis of one parameter that belong to structures of one kind.

    axis: 0 (rows: the output features of a Linear, the channels of a vector) or -1 (the last axis:
    a Linear's input features, a token's channels). Per position, `head` and `index` name the
    structure, as units do: (head=-1, index=h) for a head, (head=h, index=j) for QK/V unit j of head
    h, (-1, c) for an embedding or MLP channel, (-1, 0) for a branch; index -1: the position belongs to
    no structure of this kind. writes: a multiplicative gate on the structure scales this slice's
    output, so Σ w·g over the slice is a term of the gate's derivative (the saliency). Slices that
    merely read a structure's output, or feed it (fc1 rows before the nonlinearity), are removed with
    it but add nothing to its saliency. order: the conversion's sort key per position (default: the
    position), so kept rows can be regrouped (e.g. timm's [q | k | v] sections into per-head [q_h k_h v_h]).
    """

    param: str
    axis: int
    kind: int
    block: int
    index: torch.Tensor
    head: torch.Tensor | None = None
    writes: bool = False
    order: torch.Tensor | None = None

    def __post_init__(self):
        if self.axis not in (0, -1):
            raise ValueError(f"nvit: slice of {self.param}: axis must be 0 or -1, got {self.axis}")
        self.index = self.index.long()
        self.head = torch.full_like(self.index, -1) if self.head is None else self.head.long()
        if self.head.shape != self.index.shape:
            raise ValueError(f"nvit: slice of {self.param}: head and index differ in length")
        # Where the owned positions sit in the (kind, block) tables of Units and Masks: row, column.
        self.owned = self.index >= 0
        rows = self.head.clamp_min(0) if self.kind in (QK, V) else torch.zeros_like(self.index)
        self.table_at = (rows[self.owned], self.index[self.owned])


@dataclass
class BlockDims:
    """One block's prunable units: per head, its QK units and V dims; the MLP width."""

    qk_units: list[int]
    v_dims: list[int]
    mlp: int

    @property
    def heads(self) -> int:
        return len(self.qk_units)


@dataclass
class Dims:
    """embed: the embedding width (one residual stream), or one width per stage (hierarchical models,
    whose stage s's stream is linked to stage s+1's by a downsampling layer)."""

    embed: int | list[int]
    blocks: list[BlockDims]

    def embed_stages(self) -> list[tuple[int, int]]:
        """(block key of the EMBED slices/units, width) per embedding: [(-1, D)] for one stream, else
        [(s, D_s)] per stage."""
        return list(enumerate(self.embed)) if isinstance(self.embed, (list, tuple)) else [(-1, self.embed)]


# --------------------------------------------------------------------------------------------------
# Units: one id per structure
# --------------------------------------------------------------------------------------------------
@dataclass
class UnitIndex:
    """What each unit id is: kind, block (an embedding unit's: its stage, -1 in a single-stream model),
    head (-1 where the unit spans heads or is a head) and index within its head/block/embedding."""

    kind: torch.Tensor
    block: torch.Tensor
    head: torch.Tensor
    index: torch.Tensor

    @property
    def num_units(self) -> int:
        return int(self.kind.numel())


class Units:
    """Unit ids of every structure of a model for one granularity (and with or without branch units).

    Each (kind, block) has an id table [rows, n]: rows are heads for QK/V (in "aligned" granularity
    every row holds the same ids: one unit per dim index, shared by all heads), one row otherwise."""

    def __init__(self, dims: Dims, granularity: str, branches: bool):
        if granularity not in GRANULARITIES:
            raise ValueError(f"nvit: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        rows: list[tuple[int, int, int, int]] = []
        self.tables: dict[tuple[int, int], torch.Tensor] = {}

        def take(kind, block, head, n):
            start = len(rows)
            rows.extend((kind, block, head, i) for i in range(n))
            return torch.arange(start, start + n, device="cpu")

        for key, width in dims.embed_stages():
            self.tables[(EMBED, key)] = take(EMBED, key, -1, width)[None]
        for b, bd in enumerate(dims.blocks):
            H = bd.heads
            self.tables[(HEAD, b)] = take(HEAD, b, -1, H)[None]
            for kind, per_head in ((QK, bd.qk_units), (V, bd.v_dims)):
                width = max(per_head)
                t = torch.full((H, width), -1, dtype=torch.long, device="cpu")
                if granularity == "aligned":
                    if len(set(per_head)) > 1:
                        raise ValueError(f"nvit: block {b} has uneven head dims; 'aligned' needs equal dims per head")
                    t[:] = take(kind, b, -1, width)
                else:
                    for h in range(H):
                        t[h, : per_head[h]] = take(kind, b, h, per_head[h])
                self.tables[(kind, b)] = t
            self.tables[(MLP, b)] = take(MLP, b, -1, bd.mlp)[None]
            if branches:
                self.tables[(ATTN_BRANCH, b)] = take(ATTN_BRANCH, b, -1, 1)[None]
                self.tables[(MLP_BRANCH, b)] = take(MLP_BRANCH, b, -1, 1)[None]
        t = torch.tensor(rows, dtype=torch.int64, device="cpu").reshape(-1, 4)
        self.index = UnitIndex(*(t[:, i].contiguous() for i in range(4)))

    def ids(self, s: Slice) -> torch.Tensor | None:
        """Unit id per position of a slice (-1: none); None when the kind has no units here."""
        t = self.tables.get((s.kind, s.block))
        if t is None:
            return None
        out = torch.full_like(s.index, -1)
        out[s.owned] = t[s.table_at]
        return out


# --------------------------------------------------------------------------------------------------
# Masks: what is kept
# --------------------------------------------------------------------------------------------------
@dataclass
class Masks:
    """Keep-masks (bool) of every structure, always stored per head.

    embed [D] (a hierarchical model: one [D_s] per stage, a list); per block: heads [H], qk [H, QK units],
    v [H, dv], mlp [M]; attn_on / mlp_on [depth]:
    whether each block keeps its attention / MLP branch. What a removed unit takes with it
    (nvit.kinds.TAKES: a head its QK and V entries, a branch all its heads or MLP channels) is False
    too. In "aligned" granularity the qk/v rows of all alive heads are equal.
    """

    embed: torch.Tensor | list[torch.Tensor]
    heads: list[torch.Tensor]
    qk: list[torch.Tensor]
    v: list[torch.Tensor]
    mlp: list[torch.Tensor]
    attn_on: torch.Tensor | None = None
    mlp_on: torch.Tensor | None = None

    def __post_init__(self):
        if self.attn_on is None:
            self.attn_on = torch.ones(len(self.heads), dtype=torch.bool, device="cpu")
        if self.mlp_on is None:
            self.mlp_on = torch.ones(len(self.heads), dtype=torch.bool, device="cpu")

    @classmethod
    def full(cls, dims: Dims) -> "Masks":
        def per_head(n: list[int]) -> torch.Tensor:
            t = torch.zeros(len(n), max(n), dtype=torch.bool, device="cpu")
            for h, k in enumerate(n):
                t[h, :k] = True
            return t

        ones = functools.partial(torch.ones, dtype=torch.bool, device="cpu")
        embed = [ones(w) for _, w in dims.embed_stages()]
        return cls(embed if isinstance(dims.embed, (list, tuple)) else embed[0], [ones(b.heads) for b in dims.blocks],
                   [per_head(b.qk_units) for b in dims.blocks], [per_head(b.v_dims) for b in dims.blocks],
                   [ones(b.mlp) for b in dims.blocks])

    @property
    def staged(self) -> bool:
        """One embedding mask per stage (a hierarchical model), rather than one."""
        return isinstance(self.embed, (list, tuple))

    @property
    def embeds(self) -> list[torch.Tensor]:
        """The embedding mask of every stage (one for a single-stream model)."""
        return list(self.embed) if self.staged else [self.embed]

    def embed_of(self, block: int) -> torch.Tensor:
        """The embedding mask that EMBED slices/units with this `block` key (the stage; -1: the one
        stream) refer to."""
        return self.embeds[max(block, 0)]

    def clone(self) -> "Masks":
        embed = [t.clone() for t in self.embeds]
        return Masks(embed if self.staged else embed[0], [t.clone() for t in self.heads],
                     [t.clone() for t in self.qk], [t.clone() for t in self.v], [t.clone() for t in self.mlp],
                     self.attn_on.clone(), self.mlp_on.clone())

    def table(self, kind: int, block: int) -> torch.Tensor:
        """Alive flags in the layout of Units.tables (rows: heads for QK/V, else one row)."""
        if kind == EMBED:
            return self.embed_of(block)[None]
        if kind == HEAD:
            return self.heads[block][None]
        if kind in TAKES[HEAD]:  # QK / V: alive while their head is
            return (self.qk if kind == QK else self.v)[block] & self.heads[block][:, None]
        if kind == MLP:
            return self.mlp[block][None]
        return (self.attn_on if kind == ATTN_BRANCH else self.mlp_on)[block].reshape(1, 1)

    def alive(self, s: Slice, tables: dict | None = None) -> torch.Tensor:
        """Per position of a slice: kept (positions the slice does not own count as kept). `tables`
        caches the (kind, block) tables across the slices of one pass."""
        key = (s.kind, s.block)
        if tables is None or key not in tables:
            t = self.table(*key)
            if tables is not None:
                tables[key] = t
        else:
            t = tables[key]
        out = torch.ones_like(s.index, dtype=torch.bool)
        out[s.owned] = t[s.table_at]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        # one stream: "embed" (the layout of every masks file so far); per stage: "embed.0", "embed.1", …
        d = {f"embed.{s}": t for s, t in enumerate(self.embed)} if self.staged else {"embed": self.embed}
        d.update({"attn_on": self.attn_on, "mlp_on": self.mlp_on})
        for i in range(len(self.heads)):
            d.update({f"heads.{i}": self.heads[i], f"qk.{i}": self.qk[i], f"v.{i}": self.v[i],
                      f"mlp.{i}": self.mlp[i]})
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "Masks":
        n = sum(1 for k in d if k.startswith("heads."))
        g = lambda k: [d[f"{k}.{i}"].bool() for i in range(n)]  # noqa: E731
        on = lambda k: d[k].bool() if k in d else None  # noqa: E731  (masks saved before branches existed)
        embed = d["embed"].bool() if "embed" in d else \
            [d[f"embed.{s}"].bool() for s in range(sum(1 for k in d if k.startswith("embed.")))]
        return cls(embed, g("heads"), g("qk"), g("v"), g("mlp"), on("attn_on"), on("mlp_on"))

    def equal(self, other: "Masks") -> bool:
        a, b = self.state_dict(), other.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# A family's declaration
# --------------------------------------------------------------------------------------------------
def _on_cpu(declare):
    """`declare` run with the CPU as the default device (see Family.__init_subclass__)."""
    @functools.wraps(declare)
    def run(*args, **kwargs):
        if torch.empty(0).device.type == "cpu":  # already the default: no device mode on every torch call
            return declare(*args, **kwargs)
        with torch.device("cpu"):
            return declare(*args, **kwargs)

    return run


class Family:
    """One model family's structures. Subclasses (nvit/families/) override the methods below; the
    rest of nvit derives everything from them. A family instance describes one model.

    A subclass's dims() and slices() run with the CPU as the default device, so the tensors they make
    with torch.arange & co. (slice indices, orders) are CPU bookkeeping with real values even when the
    caller's default device is another one: under ``with torch.device("meta")`` they would otherwise
    be meta tensors -- no values, and no boolean indexing (nonzero) on them."""

    name = "family"
    qk_width = 1  # dims per QK unit

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("dims", "slices"):
            if name in cls.__dict__:
                setattr(cls, name, _on_cpu(cls.__dict__[name]))

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def problems(self) -> list[str]:
        """Modules this family cannot prune exactly (each named); empty when the model is supported."""
        return []

    def dims(self) -> Dims:
        raise NotImplementedError

    def slices(self, dims: Dims) -> list[Slice]:
        """Every slice of every structure, branch slices included (the caller drops them when
        branches are not ranked)."""
        raise NotImplementedError

    def embed_norms(self) -> list[tuple]:
        """(parent, attribute) of every LayerNorm over the embedding (normalised over kept channels);
        in a hierarchical model (parent, attribute, stage), the norm's width a multiple of the stage's
        (a patch-merging norm over k neighbours' channels: position j·D_s + c is channel c)."""
        return []

    def qk_prunable(self) -> bool:
        """False where removing a QK dim would change the other dims' values (q/k norm)."""
        return True

    def scales(self) -> list[list[float]]:
        """Softmax scale per head of each block (kept through pruning)."""
        raise NotImplementedError

    def config(self, masks: Masks, provenance: dict | None = None):
        """The converted model's architecture for these masks: a dataclass with `embed_dim`, `blocks`
        (nvit.model.BlockConfig per block) and `family` (an NViTConfig for the built-in families)."""
        raise NotImplementedError

    def embed_widths(self, config) -> list[int]:
        """The embedding width of every stage of a converted architecture (one for a single stream)."""
        return [config.embed_dim]

    def with_embed_widths(self, config, widths: list[int]):
        """`config` with these embedding widths (what embed_widths reads)."""
        import dataclasses

        return dataclasses.replace(config, embed_dim=widths[0])

    def cost(self, metric: str, config) -> float:
        """Params or FLOPs ("params" | "flops", FlopCounterMode's convention) of the converted model
        (default: the built-in converted architectures' counts, nvit.io.count)."""
        from .io import count

        return float(count(metric, config))

    def block_cost(self, metric: str, config, block) -> float:
        """The part of cost(metric, config) that one block (a BlockConfig) contributes."""
        from .cost import config_block_flops, config_block_params

        return float(config_block_flops(config, block) if metric == "flops" else config_block_params(config, block))

    def build(self, config) -> nn.Module:
        """An empty converted model of that architecture."""
        raise NotImplementedError

    def convert_state(self, sliced: dict[str, torch.Tensor], masks: Masks, config) -> dict[str, torch.Tensor]:
        """The converted model's state dict from the kept slices of every source parameter (by source
        name, kept rows already in the converted order). Default: the same names."""
        return sliced


# --------------------------------------------------------------------------------------------------
# Derived: saliency maps, keep masks, sliced state
# --------------------------------------------------------------------------------------------------
def _view(p: torch.Tensor, slices: list[Slice]) -> tuple[int, int]:
    """The [rows, cols] view of a parameter: rows are dim 0 when a slice owns dim 0, else all leading
    dims (tokens: [1, N, D] → [N, D])."""
    if p.dim() <= 1:
        return p.numel(), 1
    if any(s.axis == 0 for s in slices):
        if p.dim() > 2 and any(s.axis == -1 for s in slices):
            raise ValueError("nvit: a parameter of more than 2 dims is sliced along both axes")
        return p.shape[0], p.numel() // p.shape[0]
    return p.numel() // p.shape[-1], p.shape[-1]


def _axis_len(p: torch.Tensor, axis: int) -> int:
    return p.shape[0] if axis == 0 or p.dim() == 1 else p.shape[-1]


def group_by_param(slices: list[Slice], params: dict[str, torch.Tensor]) -> dict[str, list[Slice]]:
    """Slices by parameter, in declaration order; checks each slice against its parameter."""
    out: dict[str, list[Slice]] = {}
    for s in slices:
        if s.param not in params:
            raise UnsupportedModelError(f"nvit: the spec names parameter {s.param!r}, which the model lacks")
        n = _axis_len(params[s.param], s.axis)
        if s.index.numel() != n:
            raise ValueError(f"nvit: slice of {s.param} (axis {s.axis}) has {s.index.numel()} positions, "
                             f"the parameter {n}")
        out.setdefault(s.param, []).append(s)
    return out


def saliency_maps(by_param: dict[str, list[Slice]], params: dict[str, torch.Tensor], units: Units
                  ) -> list[tuple[torch.Tensor, TensorMap]]:
    """(parameter, segment map) for every parameter some structure's saliency reads: each writing
    slice becomes one row or column map of unit ids."""
    out = []
    for name, ss in by_param.items():
        p = params[name]
        rows, cols = _view(p, ss)
        row_maps, col_maps = [], []
        for s in ss:
            ids = units.ids(s) if s.writes else None
            if ids is None or bool((ids < 0).all()):
                continue
            (row_maps if s.axis == 0 or p.dim() <= 1 else col_maps).append(ids.to(torch.int32))
        if row_maps or col_maps:
            out.append((p, TensorMap(rows, cols, row_maps, col_maps)))
    return out


def keep_masks(by_param: dict[str, list[Slice]], params: dict[str, torch.Tensor], masks: Masks
               ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(parameter, row keep mask or None, last-axis keep mask or None): a position is kept when every
    structure owning it is."""
    out, tables = [], {}
    for name, ss in by_param.items():
        p = params[name]
        keep = {0: None, -1: None}
        for s in ss:
            ax = 0 if p.dim() <= 1 else s.axis
            a = masks.alive(s, tables)
            keep[ax] = a if keep[ax] is None else keep[ax] & a
        out.append((p, keep[0], keep[-1]))
    return out


def sliced_state(by_param: dict[str, list[Slice]], params: dict[str, torch.Tensor], masks: Masks
                 ) -> dict[str, torch.Tensor]:
    """Every parameter's kept rows/columns (rows sorted by the slices' order keys), by source name;
    parameters no structure owns are copied whole."""
    out = {}
    for name, p in params.items():
        t = p.detach()
        ss = by_param.get(name, [])
        for ax in (0, -1):
            axis_slices = [s for s in ss if (0 if p.dim() <= 1 else s.axis) == ax]
            if not axis_slices:
                continue
            keep = torch.ones(_axis_len(p, ax), dtype=torch.bool, device="cpu")
            order = None
            for s in axis_slices:
                keep &= masks.alive(s)
                if s.order is not None:
                    order = s.order
            idx = keep.nonzero().flatten()
            if order is not None:
                idx = idx[torch.argsort(order[idx], stable=True)]
            t = t.index_select(0 if ax == 0 else t.dim() - 1, idx.to(t.device))
        out[name] = t.clone()
    return out

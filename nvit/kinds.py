"""The kinds of prunable structure, and the rules of removing one unit -- declared once.

The rules (used alike by the mask edit that removes a unit, :func:`remove`; the exact cost of
removing it from a converted architecture, :func:`block_after`; and the pruner's guards, :func:`allowed`):

- ``TAKES``: what a removed unit takes with it. A head takes its QK and V units (in a converted
  architecture: its entries of the per-head lists, scale included); an attention branch takes every
  head (so their QK/V units); an MLP branch takes its MLP channels.
- ``FLOOR``: the alive units a removal must leave: never the last head of a block, the last QK or V
  unit of a head (per-head granularity) or of a block (aligned), the last MLP channel of a block, the
  last embedding channel of a stage. Branches have no floor: only a branch unit removes a whole branch.
- :func:`prunable`: what may be removed at all -- QK units only where the family can (no q/k norm,
  whose normalisation over the QK dims would change the kept dims' values).
"""
from __future__ import annotations

import torch

EMBED, HEAD, QK, V, MLP, ATTN_BRANCH, MLP_BRANCH = range(7)
KIND_NAMES = ("embed", "head", "qk", "v", "mlp", "attn_branch", "mlp_branch")
GRANULARITIES = ("aligned", "per-head")

TAKES = {HEAD: (QK, V), ATTN_BRANCH: (HEAD, QK, V), MLP_BRANCH: (MLP,)}
BRANCH_FLAGS = {ATTN_BRANCH: "attn_on", MLP_BRANCH: "mlp_on"}  # the Masks field of each branch kind
FLOOR = 1


def prunable(kind: int, qk_prunable: bool) -> bool:
    """Whether units of `kind` may be removed at all (qk_prunable: the family's Family.qk_prunable())."""
    return kind != QK or qk_prunable


def _table(masks, kind: int, block: int):
    """A block's stored mask of a unit kind: heads [H], qk / v [H, units], mlp [M]."""
    return {HEAD: masks.heads, QK: masks.qk, V: masks.v, MLP: masks.mlp}[kind][block]


def remove(masks, kind: int, block: int, head: int, index: int) -> None:
    """Remove unit (kind, block, head, index) -- a units table row, see nvit.spec.UnitIndex -- from
    `masks` (a nvit.spec.Masks, in place), and what it takes with it."""
    if kind == EMBED:  # an embedding unit's block is its stage
        masks.embed_of(block)[index] = False
        return
    rows = slice(None) if kind in BRANCH_FLAGS else index  # a branch takes every head's rows, a head its own
    for taken in TAKES.get(kind, ()):
        _table(masks, taken, block)[rows] = False
    if kind in BRANCH_FLAGS:
        getattr(masks, BRANCH_FLAGS[kind])[block] = False
    elif kind in (QK, V):  # head -1: an aligned unit, the same dim of every head
        _table(masks, kind, block)[slice(None) if head < 0 else head, index] = False
    else:  # a head unit's head is its index
        _table(masks, kind, block)[index] = False


def alive(masks, tables: dict, granularity: str, num_units: int) -> torch.Tensor:
    """Whether each unit is still alive in `masks` (tables: unit ids per (kind, block), as
    nvit.spec.Units.tables): its mask entry, what a removed unit takes dead with it; an aligned QK/V
    unit (one id shared by every head) while any alive head keeps it."""
    out = torch.zeros(num_units, dtype=torch.bool)
    for (kind, block), ids in tables.items():
        live = masks.table(kind, block)
        if granularity == "aligned" and kind in (QK, V):  # one row of ids shared by every head
            ids, live = ids[:1], live.any(0, keepdim=True)
        ok = ids >= 0
        out[ids[ok]] = live[ok]
    return out


def allowed(masks, kind: int, block: int, head: int, indices: list[int], qk_prunable: bool) -> bool:
    """Whether units `indices` of one (kind, block, head) bucket may go together from `masks`: the kind
    is prunable, they are all still alive, and the floor stays (a branch: while it is there)."""
    if not prunable(kind, qk_prunable):
        return False
    if kind in BRANCH_FLAGS:
        return bool(getattr(masks, BRANCH_FLAGS[kind])[block])
    live = masks.table(kind, block)  # a removed head's QK/V units are dead with it
    live = live[head] if head >= 0 else live.any(0)  # per-head QK/V: its head's row; else the one row
    return bool(live[indices].all()) and int(live.sum()) - len(indices) >= FLOOR


def block_after(qk: list[int], v: list[int], scales: list[float], mlp: int, kind: int, head: int,
                qk_width: int) -> tuple[list[int], list[int], list[float], int] | None:
    """A converted block's (per-head QK dims, V dims, scales, MLP width) after removing one unit of
    `kind` and what it takes; head: the position among the block's heads of a head or per-head QK/V
    unit (-1: an aligned QK/V unit, every head loses the dim). None where the floors forbid it. A QK
    unit is qk_width dims."""
    qk, v, scales = list(qk), list(v), list(scales)
    rows = list(range(len(qk))) if kind in BRANCH_FLAGS or head < 0 else [head]
    taken = TAKES.get(kind, ())
    if kind == HEAD or HEAD in taken:  # the heads' entries go, and with them their QK, V (TAKES[HEAD])
        qk, v, scales = ([x for i, x in enumerate(xs) if i not in rows] for xs in (qk, v, scales))
    if MLP in taken:
        mlp = 0
    if kind in (QK, V):
        dims = qk if kind == QK else v
        for i in rows:
            dims[i] -= qk_width if kind == QK else 1
    elif kind == MLP:
        mlp -= 1
    if kind not in BRANCH_FLAGS and (not qk or min(qk + v + [mlp]) < FLOOR):
        return None
    return qk, v, scales, mlp

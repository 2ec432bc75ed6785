"""Where things sit in the tensors nvit's kernels take: the one definition of two layouts.

**Per-head qkv** (the uneven attention op, the NViT model, export and conversion): a pruned block's
fused qkv Linear writes, per token, its heads back to back and each head as ``[q_h | k_h | v_h]``
(``qk_dims[h]``, ``qk_dims[h]`` and ``v_dims[h]`` channels); the attention's output, which proj reads,
holds the heads' values back to back (``v_dims[h]`` channels each). Head h therefore starts at column
``Σ_{i<h} (2 qk_dims[i] + v_dims[i])`` of qkv and at ``Σ_{i<h} v_dims[i]`` of the output.

**Saliency plan** (:class:`nvit_kernels.saliency.SaliencyPlan`, read by the C++, CUDA and Triton
kernels): the column numbers of the plan's int64 table, its global row and the GPU tile sizes. They
mirror ``csrc/saliency.h`` (keep both in sync; the plan carries :data:`LAYOUT_VERSION` so a kernel can
refuse a table of another layout).

This module imports nothing from the rest of the package (only torch), so every op, Triton file and
nvit module can import it without an import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# ------------------------------------------------------------------------------------- per-head qkv

Q, K, V = 0, 1, 2  # the parts of a head, in the order it stores them


@dataclass(frozen=True)
class HeadSpan:
    """Head h's columns: q, k, v in the packed qkv, and its values in the attention output."""

    q: slice
    k: slice
    v: slice
    out: slice

    @property
    def start(self) -> int:
        """The head's first column in qkv."""
        return self.q.start

    def part(self, p: int) -> slice:
        """The columns of part p (:data:`Q`, :data:`K` or :data:`V`)."""
        return (self.q, self.k, self.v)[p]


def head_width(qk: int, v: int) -> int:
    """Columns one head takes in qkv."""
    return 2 * int(qk) + int(v)


def qkv_width(qk_dims: Sequence[int], v_dims: Sequence[int]) -> int:
    """Columns of the packed qkv (the qkv Linear's out_features): Σ_h 2 qk_dims[h] + v_dims[h]."""
    return sum(head_width(q, v) for q, v in zip(qk_dims, v_dims))


def head_offsets(qk_dims: Sequence[int], v_dims: Sequence[int]) -> tuple[list[int], list[int]]:
    """(start column of each head in qkv, start column of its values in the output)."""
    in_off, out_off, a, b = [], [], 0, 0
    for q, v in zip(qk_dims, v_dims):
        in_off.append(a)
        out_off.append(b)
        a += head_width(q, v)
        b += int(v)
    return in_off, out_off


def head_spans(qk_dims: Sequence[int], v_dims: Sequence[int]) -> list[HeadSpan]:
    """Every head's :class:`HeadSpan`, in head order."""
    in_off, out_off = head_offsets(qk_dims, v_dims)
    out = []
    for a, b, q, v in zip(in_off, out_off, qk_dims, v_dims):
        q, v = int(q), int(v)
        out.append(HeadSpan(slice(a, a + q), slice(a + q, a + 2 * q), slice(a + 2 * q, a + 2 * q + v),
                            slice(b, b + v)))
    return out


def head_major(sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(head, position within the head) of every entry of a vector holding heads' segments back to back
    (``sizes[h]`` entries for head h): the attention output / proj's columns with ``sizes = v_dims``, and
    timm's per-section q or v vectors (q_bias, v_bias)."""
    head = torch.cat([torch.full((int(n),), h) for h, n in enumerate(sizes)])
    dim = torch.cat([torch.arange(int(n)) for n in sizes])
    return head, dim


def packed_rows(qk_dims: Sequence[int], v_dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(part Q/K/V, head, position within the part) of every row of the packed per-head qkv."""
    parts, heads, dims = [], [], []
    for h, (q, v) in enumerate(zip(qk_dims, v_dims)):
        for p, n in ((Q, int(q)), (K, int(q)), (V, int(v))):
            parts.append(torch.full((n,), p))
            heads.append(torch.full((n,), h))
            dims.append(torch.arange(n))
    return torch.cat(parts), torch.cat(heads), torch.cat(dims)


def packed_order(part: torch.Tensor, head: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
    """A sort key that puts rows labelled (part, head, position) -- from any qkv layout -- into the packed
    per-head order: heads major, then q, k, v, then the position."""
    d = int(dim.max()) + 1
    return head * 3 * d + part * d + dim


def pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_dims: Sequence[int], v_dims: Sequence[int],
         dim: int = 0) -> torch.Tensor:
    """Per-head [q_h | k_h | v_h] along `dim` from head-major q, k (``qk_dims``) and v (``v_dims``)."""
    qk = [int(d) for d in qk_dims]
    qs, ks, vs = q.split(qk, dim), k.split(qk, dim), v.split([int(d) for d in v_dims], dim)
    return torch.cat([t for h in range(len(qk)) for t in (qs[h], ks[h], vs[h])], dim)


# ---------------------------------------------------------------------------------- saliency plan
# Columns of a tensor's row in the plan table (csrc/saliency.h: enum Col).
(W_PTR, G_PTR, DTYPE, ROWS, COLS, N_ROW_MAPS, N_COL_MAPS, MAP_OFF, TILE0, N_ROW_TILES, N_COL_TILES,
 ROW_PART_OFF, COL_PART_OFF, ROW_LINE_OFF, COL_LINE_OFF, NUMEL, NUM_COLS) = range(17)
# Columns of the table's last row, the plan's globals (csrc/saliency.h: enum Global).
(G_UNITS, G_TENSORS, G_TILES, G_PARTIALS, G_LINES, G_LINE_TAB_OFF, G_CSR_PTR_OFF, G_CSR_IDX_OFF,
 G_ENTRIES, G_VERSION, G_TILE_ROWS, G_TILE_COLS, G_VEC_TILE) = range(13)
LAYOUT_VERSION = 1  # csrc/saliency.h: kVersion
TILE_ROWS, TILE_COLS, VEC_TILE = 32, 256, 4096  # GPU tiles (CUDA and Triton share the partial layout)

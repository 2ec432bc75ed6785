"""Index maps from the parameters of a ViT to its prunable structures (saliency units).

The fused saliency op reduces w·g over rows and columns of 2-D views of parameters into units; this
module says which rows/columns belong to which unit for the timm ViT/DeiT layout (Attention with a
fused qkv Linear, Mlp with fc1/fc2) and for the NViT layout (qkv packed per head).

Saliency of a structure S is the squared first-order effect of a multiplicative gate m_S on it,
I_S = (dL/dm_S)^2 at m_S = 1, and dL/dm_S = Σ_{p gated by S} w_p·g_p. For each kind the parameters
that enter the sum are exactly those a gate scales:

- head h: a gate on the head's output o_h (before proj). proj is linear, so dL/dm = Σ over the proj
  columns of head h of w·g. (Equivalently the v rows and v bias of h, since softmax rows sum to 1.)
- QK dim j of head h: a gate on the term q_j·k_j of the attention logits. Scaling q row j (weight and
  bias) scales exactly that term, so dL/dm = Σ over q row j (+ its bias) of w·g. (Scaling k row j
  gives the same derivative; counting both would double it.)
- V dim j of head h: a gate on channel j of o_h; dL/dm = Σ over proj column (h, j) of w·g.
- MLP channel j: a gate on the hidden activation after the nonlinearity; dL/dm = Σ over fc2 column
  j of w·g. (fc1 row j is before the nonlinearity, so it is not a gate on the channel.)
- embedding channel c (global, shared by every block through the residual stream): ONE gate m_c
  applied wherever the channel is written into the stream or read from it, so dL/dm_c sums one term
  per site, each counted once:
  writes -- the embedding stage (patch-embedding row c and bias, position-embedding and
  class/dist/register token columns c; with a pre-norm (CLIP) the stream starts at norm_pre's output,
  so its γ_c/β_c instead), each block's attention output (proj row c and bias) and MLP output (fc2 row
  c and bias); reads -- each LayerNorm output that a consumer reads (norm1, norm2 and the final norm /
  fc_norm: γ_c and β_c), or, with no final norm, the classifier's input column c.
  Not added: the consumers' input columns after a norm (qkv/fc1/classifier columns: the same
  first-order term as the norm's γ/β) and LayerScale's γ (the same term as the proj/fc2 row it
  scales) -- counting both would count each site twice.
- whole branch (optional, layer skipping as in UVC): a gate on the attention branch's (MLP branch's)
  output, i.e. what it adds to the stream; dL/dm = Σ over the proj (fc2) weight and bias of w·g.

Granularity "aligned" (the paper): one QK (V) unit per dim index of a block, shared by all heads, so
its sum runs over that dim of every head. "per-head": one unit per (head, dim).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

EMBED, HEAD, QK, V, MLP, ATTN_BRANCH, MLP_BRANCH = 0, 1, 2, 3, 4, 5, 6
KIND_NAMES = ("embed", "head", "qk", "v", "mlp", "attn_branch", "mlp_branch")
GRANULARITIES = ("aligned", "per-head")


@dataclass
class TensorMap:
    """How one parameter (viewed as a contiguous [rows, cols] matrix) feeds units.

    Each row map holds one unit id per row (-1: none), each column map one per column; an element
    (r, c) adds w·g to every unit its row and column maps name.
    """

    rows: int
    cols: int
    row_maps: list[torch.Tensor] = field(default_factory=list)
    col_maps: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        for m in self.row_maps:
            if m.numel() != self.rows:
                raise ValueError(f"nvit: row map has {m.numel()} entries for {self.rows} rows")
        for m in self.col_maps:
            if m.numel() != self.cols:
                raise ValueError(f"nvit: column map has {m.numel()} entries for {self.cols} columns")


@dataclass
class BlockDims:
    """One transformer block: per-head QK and V dims and the MLP width."""

    qk_dims: list[int]
    v_dims: list[int]
    mlp: int
    qkv_bias: bool = True
    layer_scale: bool = False

    @property
    def heads(self) -> int:
        return len(self.qk_dims)


@dataclass
class ViTLayout:
    """The prunable shape of a ViT. `qkv_order` says how the fused qkv rows are laid out:
    "sections" (timm: all q, then all k, then all v, head-major) or "per-head" (NViT: per head
    q_h, k_h, v_h back to back)."""

    embed: int
    blocks: list[BlockDims]
    qkv_order: str = "sections"

    def __post_init__(self):
        if self.qkv_order not in ("sections", "per-head"):
            raise ValueError(f"nvit: qkv_order must be 'sections' or 'per-head', got {self.qkv_order!r}")
        for i, b in enumerate(self.blocks):
            if len(b.qk_dims) != len(b.v_dims) or not b.qk_dims:
                raise ValueError(f"nvit: block {i} needs one QK and one V dim per head (≥1 head)")
            if self.qkv_order == "sections" and (len(set(b.qk_dims)) > 1 or len(set(b.v_dims)) > 1):
                raise ValueError(f"nvit: block {i}: timm's sectioned qkv needs equal dims in all heads")


@dataclass
class UnitIndex:
    """What each unit id is: kind (EMBED..MLP), block (-1 for embedding), head (-1 where the unit
    spans heads) and index within its head/block/embedding."""

    kind: torch.Tensor
    block: torch.Tensor
    head: torch.Tensor
    index: torch.Tensor

    @property
    def num_units(self) -> int:
        return int(self.kind.numel())


class _UnitAlloc:
    def __init__(self):
        self.rows: list[tuple[int, int, int, int]] = []

    def take(self, kind: int, block: int, head: int, n: int) -> torch.Tensor:
        start = len(self.rows)
        self.rows.extend((kind, block, head, i) for i in range(n))
        return torch.arange(start, start + n, dtype=torch.int32)

    def index(self) -> UnitIndex:
        t = torch.tensor(self.rows, dtype=torch.int64).reshape(-1, 4)
        return UnitIndex(*(t[:, i].contiguous() for i in range(4)))


def _none(n: int) -> torch.Tensor:
    return torch.full((n,), -1, dtype=torch.int32)


def block_maps(b: BlockDims, bi: int, embed_units: torch.Tensor, alloc: _UnitAlloc, granularity: str,
               qkv_order: str, prefix: str, branches: bool = False) -> list[tuple[str, TensorMap]]:
    """Maps of one block's parameters (timm names under `prefix`, e.g. "blocks.3.")."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"nvit: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    H, D = b.heads, int(embed_units.numel())
    if granularity == "aligned" and (len(set(b.qk_dims)) > 1 or len(set(b.v_dims)) > 1):
        raise ValueError(f"nvit: block {bi} has uneven head dims; 'aligned' needs equal dims per head")
    head_u = alloc.take(HEAD, bi, -1, H)
    if granularity == "aligned":
        qk_shared, v_shared = alloc.take(QK, bi, -1, b.qk_dims[0]), alloc.take(V, bi, -1, b.v_dims[0])
        qk_u = [qk_shared] * H
        v_u = [v_shared] * H
    else:
        qk_u = [alloc.take(QK, bi, h, b.qk_dims[h]) for h in range(H)]
        v_u = [alloc.take(V, bi, h, b.v_dims[h]) for h in range(H)]
    mlp_u = alloc.take(MLP, bi, -1, b.mlp)
    # Whole-branch units: every output row of proj (fc2) and its bias feeds the branch's unit.
    attn_rows, mlp_rows = [embed_units], [embed_units]
    if branches:
        attn_rows.append(alloc.take(ATTN_BRANCH, bi, -1, 1).repeat(D))
        mlp_rows.append(alloc.take(MLP_BRANCH, bi, -1, 1).repeat(D))

    # qkv rows: only q rows feed a unit (QK dims); k and v rows feed none (see the module docstring).
    if qkv_order == "sections":
        q_rows = torch.cat(qk_u)
        qkv_rows = torch.cat([q_rows, _none(sum(b.qk_dims) + sum(b.v_dims))])
    else:
        qkv_rows = torch.cat([torch.cat([qk_u[h], _none(b.qk_dims[h] + b.v_dims[h])]) for h in range(H)])
    n_qkv = int(qkv_rows.numel())
    proj_head = torch.cat([head_u[h].repeat(b.v_dims[h]) for h in range(H)])
    proj_v = torch.cat(v_u)
    n_v = int(proj_v.numel())

    emb_vec = TensorMap(D, 1, [embed_units])
    p = prefix
    # Embedding terms: the norms' outputs (reads) and the branch outputs (writes); see the docstring.
    maps = [
        (p + "norm1.weight", emb_vec), (p + "norm1.bias", emb_vec),
        (p + "attn.qkv.weight", TensorMap(n_qkv, D, [qkv_rows])),
        (p + "attn.proj.weight", TensorMap(D, n_v, attn_rows, [proj_head, proj_v])),
        (p + "attn.proj.bias", TensorMap(D, 1, attn_rows)),
        (p + "norm2.weight", emb_vec), (p + "norm2.bias", emb_vec),
        (p + "mlp.fc2.weight", TensorMap(D, b.mlp, mlp_rows, [mlp_u])),
        (p + "mlp.fc2.bias", TensorMap(D, 1, mlp_rows)),
    ]
    if b.qkv_bias:
        maps.append((p + "attn.qkv.bias", TensorMap(n_qkv, 1, [qkv_rows])))
    return maps


def vit_maps(layout: ViTLayout, granularity: str = "aligned", *, patch_dim: int, num_pos: int,
             prefix_tokens: Sequence[str | tuple[str, int]] = ("cls_token",), pos_embed: bool = True,
             classifier_heads: Sequence[str] = ("head",), num_classes: int = 1000,
             pre_norm: str | None = None, final_norms: Sequence[str] = ("norm",), branches: bool = False
             ) -> tuple[list[tuple[str, TensorMap]], UnitIndex]:
    """All saliency maps of a ViT, keyed by timm parameter name, and the meaning of each unit.

    patch_dim: in_chans·patch²; num_pos: rows of pos_embed; prefix_tokens: token parameters, as names
    (one token) or (name, tokens) ("reg_token" holds several); classifier_heads: Linear heads reading
    the embedding; pre_norm: the LayerNorm the stream starts with (CLIP's norm_pre), if any;
    final_norms: the LayerNorms between the stream and the classifier (norm or fc_norm); branches:
    add a unit per whole attention / MLP branch of every block.
    Parameters absent from the result enter no saliency sum.
    """
    alloc = _UnitAlloc()
    D = layout.embed
    emb = alloc.take(EMBED, -1, -1, D)
    emb_vec = TensorMap(D, 1, [emb])
    maps: list[tuple[str, TensorMap]] = []
    if pre_norm:  # the stream is written by the pre-norm's output
        maps += [(pre_norm + ".weight", emb_vec), (pre_norm + ".bias", emb_vec)]
    else:  # written by patch embedding + position embedding + tokens
        maps += [("patch_embed.proj.weight", TensorMap(D, patch_dim, [emb])), ("patch_embed.proj.bias", emb_vec)]
        if pos_embed:
            maps.append(("pos_embed", TensorMap(num_pos, D, [], [emb])))
        for tok in prefix_tokens:
            name, rows = (tok, 1) if isinstance(tok, str) else tok
            maps.append((name, TensorMap(rows, D, [], [emb])))
    for bi, b in enumerate(layout.blocks):
        maps += block_maps(b, bi, emb, alloc, granularity, layout.qkv_order, f"blocks.{bi}.", branches)
    for n in final_norms:
        maps += [(n + ".weight", emb_vec), (n + ".bias", emb_vec)]
    if not final_norms:  # the classifier reads the stream itself
        for h in classifier_heads:
            maps.append((h + ".weight", TensorMap(num_classes, D, [], [emb])))
    return maps, alloc.index()


def deit_layout(name: str) -> ViTLayout:
    """Layouts of the DeiT models (for kernel tests and benchmarks on real shapes)."""
    dims = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
    D, H = dims[name]
    return ViTLayout(D, [BlockDims([D // H] * H, [D // H] * H, 4 * D) for _ in range(12)])


def deit_maps(name: str, granularity: str = "aligned"):
    """(maps, unit index) of DeiT-{tiny,small,base} at 224² (196 patches + class token)."""
    return vit_maps(deit_layout(name), granularity, patch_dim=3 * 16 * 16, num_pos=197)

"""NViT models in the form deployment runtimes take: standard operators only, exactly the same function.

The uneven-dims attention (each head its own QK and V dims) is a custom op that ONNX Runtime, TensorRT
and torch.export know nothing of. :func:`exportable` rewrites a converted NViT model's attention into
standard operators without changing what it computes:

- heads are grouped by their (QK, V) dims; the qkv Linear's rows are permuted so that each group's q,
  k and v are contiguous slices ([q of the group's heads | k … | v …], group after group), and proj's
  columns so that they read the groups' outputs in that order -- a permutation, so exact;
- each head's softmax scale is folded into its q rows (q·s)·k = s·(q·k), so every group runs one
  standard scaled-dot-product attention with scale 1 (exact up to one rounding of the folded weights);
- optionally (`pad_heads=N`) every head's QK and V dims are padded with zero rows/columns to a multiple
  of N (zero q/k dims add 0 to the logits, zero v dims give zero outputs that proj's zero columns
  ignore -- exact), so fused attention kernels that want head sizes in multiples of 8 apply and more
  heads share a group.

The result is a plain ``nn.Module`` tree (Linear, LayerNorm, SDPA, reshape, cat) that torch.export and
the ONNX exporter trace like any timm ViT.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import NViT, UnevenAttention


@dataclass(frozen=True)
class HeadGroup:
    heads: int  # how many heads
    qk: int     # QK dims per head (after padding)
    v: int      # V dims per head (after padding)


def _round_up(x: int, n: int | None) -> int:
    return x if not n else -(-x // n) * n


class GroupedAttention(nn.Module):
    """Uneven-dims attention as one SDPA per group of equal-dims heads (see the module docstring)."""

    def __init__(self, attn: UnevenAttention, pad_heads: int | None = None):
        super().__init__()
        if attn.qk_norm:
            raise ValueError("nvit: exporting q/k-normalised attention is not supported yet")
        qk, vd, sc = list(attn.qk_dims), list(attn.v_dims), list(attn.scales)
        dim = attn.qkv.in_features
        W, b = attn.qkv.weight.detach(), None if attn.qkv.bias is None else attn.qkv.bias.detach()
        Wp = attn.proj.weight.detach()
        # Per head: rows of its q, k and v in the packed per-head qkv layout, its proj columns.
        off, rows, cols, o = 0, [], [], 0
        for h in range(len(qk)):
            rows.append((off, off + qk[h], off + 2 * qk[h]))
            cols.append(o)
            off += 2 * qk[h] + vd[h]
            o += vd[h]
        pq = [_round_up(d, pad_heads) for d in qk]
        pv = [_round_up(d, pad_heads) for d in vd]
        order: dict[tuple[int, int], list[int]] = {}
        for h in range(len(qk)):
            order.setdefault((pq[h], pv[h]), []).append(h)
        self.groups = [HeadGroup(len(hs), dq, dv) for (dq, dv), hs in order.items()]
        n_out = sum(g.heads * (2 * g.qk + g.v) for g in self.groups)
        n_v = sum(g.heads * g.v for g in self.groups)
        new_w = W.new_zeros(n_out, dim)
        new_b = None if b is None else W.new_zeros(n_out)
        new_p = Wp.new_zeros(Wp.shape[0], n_v)
        r, c = 0, 0
        for (dq, dv), hs in order.items():
            G = len(hs)
            for part, (width, src_off, scale_q) in enumerate(((dq, 0, True), (dq, 1, False), (dv, 2, False))):
                for j, h in enumerate(hs):
                    start = rows[h][src_off]
                    n = qk[h] if part < 2 else vd[h]
                    dst = r + j * width
                    s = sc[h] if scale_q else 1.0  # the softmax scale folded into q
                    new_w[dst:dst + n] = W[start:start + n] * s
                    if b is not None:
                        new_b[dst:dst + n] = b[start:start + n] * s
                r += G * width
            for j, h in enumerate(hs):
                new_p[:, c + j * dv:c + j * dv + vd[h]] = Wp[:, cols[h]:cols[h] + vd[h]]
            c += G * dv
        self.qkv = nn.Linear(dim, n_out, bias=b is not None)
        self.proj = nn.Linear(n_v, Wp.shape[0], bias=attn.proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(new_w)
            if b is not None:
                self.qkv.bias.copy_(new_b)
            self.proj.weight.copy_(new_p)
            if attn.proj.bias is not None:
                self.proj.bias.copy_(attn.proj.bias)
        self.qkv.to(W.dtype)
        self.proj.to(W.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)
        outs, o = [], 0
        for g in self.groups:
            H, dq, dv = g.heads, g.qk, g.v
            q = qkv[..., o:o + H * dq].reshape(B, N, H, dq).transpose(1, 2)
            k = qkv[..., o + H * dq:o + 2 * H * dq].reshape(B, N, H, dq).transpose(1, 2)
            v = qkv[..., o + 2 * H * dq:o + H * (2 * dq + dv)].reshape(B, N, H, dv).transpose(1, 2)
            o += H * (2 * dq + dv)
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # scales are folded into q
            outs.append(y.transpose(1, 2).reshape(B, N, H * dv))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1))


def exportable(model: NViT, pad_heads: int | None = None) -> nn.Module:
    """A copy of `model` (eval mode) whose attention uses standard operators only (same outputs)."""
    if pad_heads is not None and pad_heads < 1:
        raise ValueError(f"nvit: pad_heads must be ≥1, got {pad_heads}")
    m = copy.deepcopy(model).eval()
    for blk in m.blocks:
        if getattr(blk, "has_attn", True):
            blk.attn = GroupedAttention(blk.attn, pad_heads)
    return m


def attention_groups(model: nn.Module) -> list[list[HeadGroup]]:
    """The head groups of every block of an :func:`exportable` model (for reports and benchmarks)."""
    return [list(blk.attn.groups) if isinstance(getattr(blk, "attn", None), GroupedAttention) else []
            for blk in model.blocks]

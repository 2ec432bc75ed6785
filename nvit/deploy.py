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

NViT-Swin's window attention is lowered the same way; each group's SDPA also takes its heads' relative
position bias (gathered once into a constant [H, N, N]) plus the shifted-window mask as attn_mask.

The result is a plain ``nn.Module`` tree (Linear, LayerNorm, SDPA, reshape, cat) that torch.export and
the ONNX exporter trace like any timm ViT.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvit_kernels.layout import K, Q, V, head_spans

from .model import NViT, UnevenAttention
from .model_swin import NViTSwin, UnevenWindowAttention


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
        if getattr(attn, "qk_norm", False):  # (window attention has neither)
            raise ValueError("nvit: exporting q/k-normalised attention is not supported yet")
        if getattr(attn, "rope_dim", 0):
            raise ValueError("nvit: exporting rotary (EVA-02) attention is not supported yet")
        qk, vd, sc = list(attn.qk_dims), list(attn.v_dims), list(attn.scales)
        spans = head_spans(qk, vd)  # each head's q, k, v rows in the packed per-head qkv, its columns in proj
        order: dict[tuple[int, int], list[int]] = {}
        for h in range(len(qk)):
            order.setdefault((_round_up(qk[h], pad_heads), _round_up(vd[h], pad_heads)), []).append(h)
        self.groups = [HeadGroup(len(hs), dq, dv) for (dq, dv), hs in order.items()]
        self.head_order = [h for hs in order.values() for h in hs]  # source head of each grouped head
        # The new layout as source indices (-1: a zero pad) and per-row factors (the folded q scales).
        rows, scale, cols = [], [], []
        for (dq, dv), hs in order.items():
            for part, width in ((Q, dq), (K, dq), (V, dv)):  # [q of every head | k … | v …]
                for h in hs:
                    src = spans[h].part(part)
                    rows += list(range(src.start, src.stop)) + [-1] * (width - (src.stop - src.start))
                    scale += [sc[h] if part == Q else 1.0] * width
            for h in hs:
                cols += list(range(spans[h].out.start, spans[h].out.stop)) + [-1] * (dv - vd[h])
        self.qkv = _gathered(attn.qkv, torch.tensor(rows), torch.tensor(scale), dim=0)
        self.proj = _gathered(attn.proj, torch.tensor(cols), None, dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)
        outs, o, h0 = [], 0, 0
        for g in self.groups:
            H, dq, dv = g.heads, g.qk, g.v
            q = qkv[..., o:o + H * dq].reshape(B, N, H, dq).transpose(1, 2)
            k = qkv[..., o + H * dq:o + 2 * H * dq].reshape(B, N, H, dq).transpose(1, 2)
            v = qkv[..., o + 2 * H * dq:o + H * (2 * dq + dv)].reshape(B, N, H, dv).transpose(1, 2)
            o += H * (2 * dq + dv)
            y = self._attend(q, k, v, h0, mask)
            h0 += H
            outs.append(y.transpose(1, 2).reshape(B, N, H * dv))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1))

    def _attend(self, q, k, v, h0: int, mask):
        """One group's attention: heads h0… of the grouped order, [B, H, N, d]."""
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)  # scales are folded into q


class GroupedWindowAttention(GroupedAttention):
    """NViT-Swin's window attention, grouped: logits (s·q)·k + bias[h] + mask[window]."""

    def __init__(self, attn: UnevenWindowAttention, pad_heads: int | None = None):
        super().__init__(attn, pad_heads)
        with torch.no_grad():  # a constant at inference: gathered once, heads in the grouped order
            self.register_buffer("bias", attn.position_bias()[self.head_order].detach().clone())

    def _attend(self, q, k, v, h0: int, mask):
        bias = self.bias[h0:h0 + q.shape[1]]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        nw, (Bw, H, N, _) = mask.shape[0], q.shape  # window b of the batch uses mask[b % nW]
        # 4-D attn_mask [B·nW, H, N, N] (ONNX's SDPA takes 4-D inputs only): the windows' masks per image
        m = (mask[:, None] + bias[None]).expand(Bw // nw, nw, H, N, N).reshape(Bw, H, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0)


def _gathered(lin: nn.Linear, index: torch.Tensor, scale: torch.Tensor | None, dim: int) -> nn.Linear:
    """A copy of `lin` with its output rows (dim 0) or input columns (dim 1) taken from `index` (-1: zeros),
    output rows multiplied by `scale`."""
    W = lin.weight.detach()
    keep = index >= 0
    shape = (len(index), W.shape[1]) if dim == 0 else (W.shape[0], len(index))
    out = nn.Linear(shape[1], shape[0], bias=lin.bias is not None).to(W.dtype)
    with torch.no_grad():
        w = W.new_zeros(shape)
        if dim == 0:
            w[keep] = W[index[keep]] * scale[keep, None].to(W.dtype)
        else:
            w[:, keep] = W[:, index[keep]]
        out.weight.copy_(w)
        if lin.bias is not None:
            b = lin.bias.detach()
            if dim == 0:
                bb = b.new_zeros(len(index))
                bb[keep] = b[index[keep]] * scale[keep].to(b.dtype)
                out.bias.copy_(bb)
            else:
                out.bias.copy_(b)
    return out.to(W.device)


def _blocks(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, NViTSwin):
        return [blk for layer in model.layers for blk in layer.blocks]
    return list(model.blocks)


def exportable(model: NViT | NViTSwin, pad_heads: int | None = None) -> nn.Module:
    """A copy of `model` (eval mode) whose attention uses standard operators only (same outputs)."""
    if pad_heads is not None and pad_heads < 1:
        raise ValueError(f"nvit: pad_heads must be ≥1, got {pad_heads}")
    m = copy.deepcopy(model).eval()
    for blk in _blocks(m):
        if getattr(blk, "has_attn", True):
            grouped = GroupedWindowAttention if isinstance(blk.attn, UnevenWindowAttention) else GroupedAttention
            blk.attn = grouped(blk.attn, pad_heads)
    return m


def attention_groups(model: nn.Module) -> list[list[HeadGroup]]:
    """The head groups of every block of an :func:`exportable` model (for reports and benchmarks)."""
    return [list(blk.attn.groups) if isinstance(getattr(blk, "attn", None), GroupedAttention) else []
            for blk in _blocks(model)]

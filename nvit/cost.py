"""Exact analytic cost of an NViT model: parameter count and matmul FLOPs.

FLOPs follow the convention of :class:`torch.utils.flop_counter.FlopCounterMode`: 2 × multiply-adds
of the matmul-like work only —
the patch-embedding convolution, every Linear (qkv, proj, fc1, fc2, the classifier heads) and the
attention products (per head QKᵀ: 2·N·N·qk_h, PV: 2·N·N·v_h). Bias adds, LayerNorm, softmax, GELU,
LayerScale, residual adds, token concatenation and pooling are NOT counted (they are O(N·D), small
next to the matmuls, and FlopCounterMode ignores them too).

Importing this module registers FLOP formulas for the custom ops ``torch.ops.nvit.uneven_attention``
and ``torch.ops.nvit.uneven_attention_backward`` so FlopCounterMode counts NViT's attention exactly
as :func:`count_flops` does (it would otherwise count 0 for them).

Note: the paper's (and fvcore's / DeiT's) "FLOPs" are multiply-accumulates: DeiT-B's "17.6G" is
:func:`count_macs` (17.56e9); :func:`count_flops` gives 35.1e9 for the same model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils import flop_counter

import nvit_kernels.attention  # noqa: F401  (defines torch.ops.nvit.uneven_attention*)

from .model import BlockConfig, NViTConfig

__all__ = [
    "attention_flops", "block_flops", "block_params", "config_block_flops", "config_block_params", "count_flops", "count_macs", "count_params",
    "BlockCost", "CostReport", "cost_report",
]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def _linear_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def attention_flops(qk_dims: Sequence[int], v_dims: Sequence[int], tokens: int, batch_size: int = 1) -> int:
    """Forward FLOPs of uneven attention over `tokens` tokens: Σ_h 2·N²·(qk_h + v_h), times the batch."""
    n2 = tokens * tokens
    return batch_size * sum(2 * n2 * (int(q) + int(v)) for q, v in zip(qk_dims, v_dims))


def _attention_backward_flops(qk_dims: Sequence[int], v_dims: Sequence[int], tokens: int, batch_size: int) -> int:
    # As torch counts the SDPA backward: recompute QKᵀ, dP = dO Vᵀ, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q.
    n2 = tokens * tokens
    return batch_size * sum(2 * n2 * (3 * int(q) + 2 * int(v)) for q, v in zip(qk_dims, v_dims))


def block_flops(embed_dim: int, block_cfg: BlockConfig, tokens: int, batch_size: int = 1, *,
                swiglu: bool = False) -> int:
    """Forward FLOPs of one NViT block (qkv, attention, proj, fc1, fc2) on `tokens` tokens (SwiGLU:
    fc1 has a gate and a value row per channel)."""
    D, c = embed_dim, block_cfg  # a removed branch (no heads / mlp == 0) costs nothing
    fc1 = c.mlp * (2 if swiglu else 1)
    per_token = 2 * D * c.qkv_out + 2 * sum(c.v_dims) * D + 2 * D * fc1 + 2 * c.mlp * D
    return batch_size * tokens * per_token + attention_flops(c.qk_dims, c.v_dims, tokens, batch_size)


def block_params(embed_dim: int, block_cfg: BlockConfig, *, qkv_bias: bool = True, proj_bias: bool = True,
                 layer_scale: bool = False, swiglu: bool = False) -> int:
    """Parameters of one NViT block (two LayerNorms, qkv, proj, optional LayerScales, fc1, fc2)."""
    D, c = embed_dim, block_cfg
    attn = (2 * D                                          # norm1
            + _linear_params(D, c.qkv_out, qkv_bias)
            + _linear_params(sum(c.v_dims), D, proj_bias)
            + (D if layer_scale else 0))                   # ls1
    mlp = (2 * D                                           # norm2
           + _linear_params(D, c.mlp * (2 if swiglu else 1)) + _linear_params(c.mlp, D)
           + (D if layer_scale else 0))                    # ls2
    return (attn if c.has_attn else 0) + (mlp if c.has_mlp else 0)


def config_block_params(config: NViTConfig, block_cfg: BlockConfig) -> int:
    """Parameters of one block of a model with `config`'s options (biases, LayerScale, MLP kind)."""
    c = config
    return block_params(c.embed_dim, block_cfg, qkv_bias=c.qkv_bias, proj_bias=c.proj_bias, layer_scale=c.layer_scale,
                        swiglu=c.mlp_kind == "swiglu")


def config_block_flops(config: NViTConfig, block_cfg: BlockConfig, batch_size: int = 1) -> int:
    """Forward FLOPs of one block of a model with `config`'s token count and MLP kind."""
    return block_flops(config.embed_dim, block_cfg, config.num_tokens, batch_size, swiglu=config.mlp_kind == "swiglu")


def _n_heads_out(config: NViTConfig) -> int:
    """How many classifier Linears run (the distillation head runs too, in eval and training)."""
    if config.num_classes <= 0:
        return 0
    return 2 if config.dist_token else 1


def _stem_params(config: NViTConfig) -> int:
    c, D = config, config.embed_dim
    n = c.in_chans * D * c.patch_size * c.patch_size + D  # patch_embed.proj (conv with bias)
    n += D * c.num_prefix_tokens                          # cls / dist / register tokens
    n += c.num_pos * D                                    # pos_embed
    n += 2 * D if c.pre_norm else 0                       # norm_pre
    return n


def _head_params(config: NViTConfig) -> int:
    c, D = config, config.embed_dim
    n = 2 * D if (c.final_norm and not c.fc_norm) else 0  # norm
    n += 2 * D if c.fc_norm else 0                        # fc_norm
    return n + _n_heads_out(c) * _linear_params(D, c.num_classes)


def _stem_flops(config: NViTConfig, batch_size: int) -> int:
    c = config
    return batch_size * c.num_patches * 2 * c.in_chans * c.patch_size * c.patch_size * c.embed_dim


def _head_flops(config: NViTConfig, batch_size: int) -> int:
    return batch_size * _n_heads_out(config) * 2 * config.embed_dim * config.num_classes


# --------------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------------
def count_params(config: NViTConfig) -> int:
    """Exactly ``sum(p.numel() for p in NViT(config).parameters())``, without building the model."""
    c = config
    blocks = sum(config_block_params(c, b) for b in c.blocks)
    return _stem_params(c) + blocks + _head_params(c)


def count_flops(config: NViTConfig, batch_size: int = 1) -> int:
    """Forward FLOPs of NViT(config) on `batch_size` images (2 × multiply-adds of matmul-like work).

    Counts the patch-embedding conv, every Linear (qkv, proj, fc1, fc2, head and, with a
    distillation token, head_dist) and attention's QKᵀ and PV products; excludes norms, softmax,
    GELU, bias/residual adds and pooling — exactly what FlopCounterMode counts on ``NViT(config)``.
    """
    c = config
    return (_stem_flops(c, batch_size)
            + sum(config_block_flops(c, b, batch_size) for b in c.blocks)
            + _head_flops(c, batch_size))


def count_macs(config: NViTConfig, batch_size: int = 1) -> int:
    """Multiply-accumulates (count_flops / 2): the unit of the paper's and fvcore's "FLOPs" columns."""
    return count_flops(config, batch_size) // 2


@dataclass
class BlockCost:
    index: int
    heads: int
    qk_dims: list[int]
    v_dims: list[int]
    mlp: int
    params: int
    flops: int


@dataclass
class CostReport:
    """Per-part cost of a model: stem (patch embed, tokens, pos embed), each block, head (norms, classifiers)."""

    batch_size: int
    tokens: int
    stem_params: int
    stem_flops: int
    head_params: int
    head_flops: int
    blocks: list[BlockCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.stem_params + self.head_params + sum(b.params for b in self.blocks)

    @property
    def flops(self) -> int:
        return self.stem_flops + self.head_flops + sum(b.flops for b in self.blocks)

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "tokens": self.tokens, "params": self.params,
                "flops": self.flops, "stem": {"params": self.stem_params, "flops": self.stem_flops},
                "head": {"params": self.head_params, "flops": self.head_flops},
                "blocks": [vars(b).copy() for b in self.blocks]}

    def table(self) -> str:
        """A plain-text table, one row per block."""
        rows = [f"{'part':>6} {'heads':>5} {'qk':>12} {'v':>12} {'mlp':>6} {'params':>12} {'MFLOPs':>10}"]
        fmt = lambda d: str(d[0]) if len(set(d)) == 1 else f"{min(d)}..{max(d)}"  # noqa: E731
        rows.append(f"{'stem':>6} {'':>5} {'':>12} {'':>12} {'':>6} {self.stem_params:>12,} "
                    f"{self.stem_flops / 1e6:>10.2f}")
        for b in self.blocks:
            rows.append(f"{b.index:>6} {b.heads:>5} {fmt(b.qk_dims):>12} {fmt(b.v_dims):>12} {b.mlp:>6} "
                        f"{b.params:>12,} {b.flops / 1e6:>10.2f}")
        rows.append(f"{'head':>6} {'':>5} {'':>12} {'':>12} {'':>6} {self.head_params:>12,} "
                    f"{self.head_flops / 1e6:>10.2f}")
        rows.append(f"{'total':>6} {'':>5} {'':>12} {'':>12} {'':>6} {self.params:>12,} {self.flops / 1e6:>10.2f}")
        return "\n".join(rows)


def cost_report(config: NViTConfig, batch_size: int = 1) -> CostReport:
    """Params and FLOPs broken down into stem, blocks and head (totals match count_params/count_flops)."""
    c, N = config, config.num_tokens
    rep = CostReport(batch_size=batch_size, tokens=N, stem_params=_stem_params(c),
                     stem_flops=_stem_flops(c, batch_size), head_params=_head_params(c),
                     head_flops=_head_flops(c, batch_size))
    for i, b in enumerate(c.blocks):
        rep.blocks.append(BlockCost(
            index=i, heads=b.heads, qk_dims=list(b.qk_dims), v_dims=list(b.v_dims), mlp=b.mlp,
            params=config_block_params(c, b), flops=config_block_flops(c, b, batch_size)))
    return rep


# --------------------------------------------------------------------------------------------------
# FlopCounterMode formulas for the custom attention ops (registered once, even on re-import).
# --------------------------------------------------------------------------------------------------
def _uneven_attention_flop(qkv_shape, qk_dims, v_dims, scales, *args, out_shape=None, **kwargs) -> int:
    B, N = qkv_shape[0], qkv_shape[1]
    return attention_flops(qk_dims, v_dims, N, B)


def _uneven_attention_backward_flop(grad_out_shape, qkv_shape, out_shape_, qk_dims, v_dims, scales, *args,
                                    out_shape=None, **kwargs) -> int:
    B, N = qkv_shape[0], qkv_shape[1]
    return _attention_backward_flops(qk_dims, v_dims, N, B)


def _register_flop_formulas() -> None:
    for name, formula in (("uneven_attention", _uneven_attention_flop),
                          ("uneven_attention_backward", _uneven_attention_backward_flop)):
        if name != "uneven_attention" and not hasattr(torch.ops.nvit, name):
            continue  # the forward op is required (model.py calls it); the backward op is optional
        packet = getattr(torch.ops.nvit, name)
        if packet not in flop_counter.flop_registry:  # a reloaded module must not register twice
            wrapped = flop_counter.register_flop_formula(packet)(formula)
            # torch < 2.5 files the formula under the op's overloads but looks it up by the packet.
            flop_counter.flop_registry.setdefault(packet, wrapped)


_register_flop_formulas()

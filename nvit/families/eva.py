"""timm Eva (EVA-02: rotary position embedding, SwiGLU MLP; also EVA without them) and the NViT
models converted from it.

What differs from the ViT family (nvit/families/vit.py has the gate derivations):

- QK units are rotary pairs: timm's RotaryEmbeddingCat rotates dims (2i, 2i+1) of q and k together
  (rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]), so a pair's logit term q_pair·k_pair (after rotation)
  is what a gate on the pair's q rows scales, and removing both dims removes exactly that term.
  The converted model keeps each kept dim's source index (BlockConfig.qk_index) to rotate it with
  its own frequency, and the source's rotary table (fixed image size).
- q and v biases are separate parameters (q_bias, v_bias; k has none): q_bias writes the QK units
  as q's rows do; the converted model packs them into one qkv bias with zeros for k (exact).
- SwiGLU (timm's GluMlp, gate first): channel j is fc1 gate row j, fc1 value row M+j and fc2 column j;
  the hidden SiLU(gate)·value is what a gate on the channel scales, so fc2 column j writes it.
- LayerScale is gamma_1 / gamma_2 on the block.

Kept whole or refused (named by problems()): an inner LayerNorm over the attention output
(scale_attn_inner) or the SwiGLU hidden (scale_mlp) -- removing a dim would change every other dim's
normalisation --, post-norm blocks, rotate-half or mixed rotary embeddings, separate q/k/v Linears,
dynamic image size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nvit_kernels import layout

from ..spec import HEAD, MLP, QK, V, BlockDims, Masks, Slice
from .vit import ViTFamily


class EvaFamily(ViTFamily):
    name = "eva"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.rotary = (model.config.rope_dim > 0) if self.is_nvit else getattr(model, "rope", None) is not None
        self.qk_width = 2 if self.rotary else 1

    @classmethod
    def timm_class(cls) -> type:
        from timm.models.eva import Eva

        return Eva

    # ---- guards -----------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

        m, bad = self.model, super().problems()
        if not self.is_nvit and m.reg_token is not None and not hasattr(m, "no_embed_class"):
            bad.append("reg_token: this timm's Eva prepends the class token twice with register tokens "
                       "(fixed in newer timm); upgrade timm to prune it")
        if not self.is_nvit and self.rotary and (type(m.rope) is not RotaryEmbeddingCat or getattr(m, "rope_mixed", False)):
            bad.append(f"rope: {type(m.rope).__name__} (only RotaryEmbeddingCat, interleaved pairs)")
        return bad

    def block_problems(self, p: str, blk: nn.Module) -> list[str]:
        from timm.layers import GluMlp
        from timm.layers import Mlp as TimmMlp
        from timm.models.eva import EvaAttention, EvaBlock

        if type(blk) is not EvaBlock:
            return [f"{p}: {type(blk).__name__} (only EvaBlock, pre-norm)"]
        bad = []
        a = blk.attn
        if type(a) is not EvaAttention or getattr(a, "qkv", None) is None:
            bad.append(f"{p}.attn: {type(a).__name__} (only EvaAttention with a fused qkv)")
        else:
            if not isinstance(a.norm, nn.Identity):
                bad.append(f"{p}.attn.norm: {type(a.norm).__name__} (scale_attn_inner: a norm over all heads' "
                           "outputs is changed by removing any V dim)")
            if not isinstance(a.q_norm, nn.Identity) or getattr(a, "gate", None) is not None:
                bad.append(f"{p}.attn: q/k norm or gated attention")
            if getattr(a, "rotate_half", False):
                bad.append(f"{p}.attn: rotate-half rotary embedding (only interleaved pairs)")
            if a.q_bias is not None and a.qkv.bias is not None:
                bad.append(f"{p}.attn: qkv bias and q/v biases together")
        mlp = blk.mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            bad.append(f"{p}.mlp.norm: {type(mlp.norm).__name__} (scale_mlp: a norm over the MLP hidden is "
                       "changed by removing any channel)")
        elif type(mlp) is GluMlp:
            if mlp.gate_last or not isinstance(mlp.act, nn.SiLU):
                bad.append(f"{p}.mlp: GluMlp must gate first with SiLU")
        elif type(mlp) is not TimmMlp or not isinstance(mlp.act, nn.GELU):
            bad.append(f"{p}.mlp: {type(mlp).__name__} (only GluMlp with SiLU, or Mlp with GELU; no norm)")
        return bad

    def qk_prunable(self) -> bool:
        return True  # q/k norm is refused above

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def swiglu(self) -> bool:
        if self.is_nvit:
            return self.model.config.mlp_kind == "swiglu"
        from timm.layers import GluMlp

        return isinstance(self.model.blocks[0].mlp, GluMlp)

    def mlp_width(self, blk) -> int:
        return blk.mlp.fc2.in_features

    def head_dims(self, blk) -> tuple[list[int], list[int]]:
        if self.is_nvit:
            return super().head_dims(blk)
        a = blk.attn
        d = a.qkv.out_features // (3 * a.num_heads)
        return [d] * a.num_heads, [d] * a.num_heads

    def classifiers(self) -> list[str]:
        return ["head"] if isinstance(getattr(self.model, "head", None), nn.Linear) else []

    def layer_scales(self, p: str) -> list[str]:
        return [p + "ls1.gamma", p + "ls2.gamma"] if self.is_nvit else [p + "gamma_1", p + "gamma_2"]

    # ---- slices -----------------------------------------------------------------------------------
    def attention_slices(self, b: int, bd: BlockDims, p: str) -> list[Slice]:
        out = super().attention_slices(b, bd, p)
        if self.is_nvit or not self._param(p + "attn.q_bias"):
            return out
        # q_bias / v_bias: head-major vectors of q (v) channels, as q's (v's) rows of qkv
        q_head, q_dim = layout.head_major([n * self.qk_width for n in bd.qk_units])
        v_head, v_dim = layout.head_major(bd.v_dims)
        out += [Slice(p + "attn.q_bias", 0, QK, b, q_dim // self.qk_width, q_head, writes=True),
                Slice(p + "attn.q_bias", 0, HEAD, b, q_head),
                Slice(p + "attn.v_bias", 0, V, b, v_dim, v_head), Slice(p + "attn.v_bias", 0, HEAD, b, v_head)]
        return out

    def mlp_slices(self, b: int, bd: BlockDims, p: str) -> list[Slice]:
        if not self.swiglu:
            return super().mlp_slices(b, bd, p)
        M = torch.arange(bd.mlp)
        rows = torch.cat([M, M])  # gate rows, then value rows
        out = [Slice(p + "mlp.fc1.weight", 0, MLP, b, rows), Slice(p + "mlp.fc2.weight", -1, MLP, b, M, writes=True)]
        if self._param(p + "mlp.fc1.bias"):
            out.append(Slice(p + "mlp.fc1.bias", 0, MLP, b, rows))
        return out

    # ---- conversion -------------------------------------------------------------------------------
    def block_configs(self, masks: Masks):
        blocks = super().block_configs(masks)
        if not self.rotary:
            return blocks
        w = self.qk_width
        for bi, bc in enumerate(blocks):
            src = self.model.blocks[bi].attn.qk_index if self.is_nvit else None
            idx = []
            for h in masks.heads[bi].nonzero().flatten().tolist():
                dims = [d for u in masks.qk[bi][h].nonzero().flatten().tolist() for d in (w * u, w * u + 1)]
                idx.append([src[h][d] for d in dims] if src is not None else dims)
            bc.qk_index = idx
        return blocks

    def options(self) -> dict:
        m, blk0 = self.model, self.model.blocks[0]
        if len(set(m.patch_embed.grid_size)) != 1:  # the rotary table is stored for a square grid
            raise ValueError(f"nvit: only square patch grids convert (got {tuple(m.patch_embed.grid_size)})")
        return dict(qkv_bias=blk0.attn.q_bias is not None or blk0.attn.qkv.bias is not None,
                    layer_scale=blk0.gamma_1 is not None, mlp_kind="swiglu" if self.swiglu else "gelu",
                    rope_dim=self.head_dims(blk0)[0][0] if self.rotary else 0)

    def convert_state(self, sliced, masks, config):
        sd = super().convert_state(sliced, masks, config)
        if self.is_nvit:
            return sd
        m = self.model
        for bi, bc in enumerate(config.blocks):
            p = f"blocks.{bi}."
            for src, dst in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
                if p + src in sd:
                    sd[p + dst] = sd.pop(p + src)
            q_bias = sd.pop(p + "attn.q_bias", None)
            v_bias = sd.pop(p + "attn.v_bias", None)
            if q_bias is not None and bc.has_attn:  # per head [q_h | 0 for k_h | v_h]
                sd[p + "attn.qkv.bias"] = layout.pack(q_bias, torch.zeros_like(q_bias), v_bias, bc.qk_dims, bc.v_dims)
        if config.rope_dim:
            sd["rope"] = m.rope.get_embed().detach().reshape(config.num_patches, 2 * config.rope_dim).clone()
        return sd

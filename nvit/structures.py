"""Adapter from a timm Vision Transformer (as timm builds it) to nvit's pruning view.

It reads the model's shape (ViTLayout, saliency maps), holds the keep-masks of every prunable
structure, and makes the masked model compute exactly what the converted NViT model will compute:
pruned weights are zero, and every LayerNorm over the embedding is wrapped (same Parameter objects)
so it normalises over the kept embedding channels only. timm's code is never patched: the adapter
only reads modules and swaps the norm submodules of the model instance it is handed.

Which parameters enter each structure's saliency sum, and why, is documented in
nvit_kernels.vit_maps (the gate derivations); the maps come from there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvit_kernels.vit_maps import BlockDims, ViTLayout, vit_maps

from .model import NViT, NViTConfig


class UnsupportedModelError(ValueError):
    """The model has modules nvit cannot prune exactly."""


class KeptLayerNorm(nn.Module):
    """LayerNorm over the kept channels only (pruned channels are zero in and out).

    Shares weight and bias with the LayerNorm it wraps, so optimizers, checkpoints and the saliency
    plan keep seeing the same Parameters under the same names.
    """

    def __init__(self, ln: nn.LayerNorm, keep: torch.Tensor):
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps
        self.normalized_shape = ln.normalized_shape
        self.register_buffer("keep", keep, persistent=False)  # float 0/1 [D], shared with the adapter
        self.n_kept = int(keep.sum())

    def forward(self, x):
        D = x.shape[-1]
        if self.n_kept == D:
            return F.layer_norm(x, (D,), self.weight, self.bias, self.eps)
        k = self.keep.to(x.dtype)
        mean = (x * k).sum(-1, keepdim=True) / self.n_kept
        xc = (x - mean) * k
        var = (xc * xc).sum(-1, keepdim=True) / self.n_kept
        y = xc * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


@dataclass
class Masks:
    """Keep-masks (bool) of every structure, always stored per head.

    embed [D]; per block: heads [H], qk [H, dqk], v [H, dv], mlp [M]; attn_on / mlp_on [depth]: whether
    each block keeps its attention / MLP branch. A removed head's QK and V entries are False too, and
    so are all heads (all MLP channels) of a removed branch. In "aligned" granularity the qk/v rows of
    all alive heads are equal.
    """

    embed: torch.Tensor
    heads: list[torch.Tensor]
    qk: list[torch.Tensor]
    v: list[torch.Tensor]
    mlp: list[torch.Tensor]
    attn_on: torch.Tensor | None = None
    mlp_on: torch.Tensor | None = None

    def __post_init__(self):
        if self.attn_on is None:
            self.attn_on = torch.ones(len(self.heads), dtype=torch.bool)
        if self.mlp_on is None:
            self.mlp_on = torch.ones(len(self.heads), dtype=torch.bool)

    def clone(self) -> "Masks":
        return Masks(self.embed.clone(), [t.clone() for t in self.heads], [t.clone() for t in self.qk],
                     [t.clone() for t in self.v], [t.clone() for t in self.mlp], self.attn_on.clone(),
                     self.mlp_on.clone())

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"embed": self.embed, "attn_on": self.attn_on, "mlp_on": self.mlp_on}
        for i in range(len(self.heads)):
            d.update({f"heads.{i}": self.heads[i], f"qk.{i}": self.qk[i], f"v.{i}": self.v[i],
                      f"mlp.{i}": self.mlp[i]})
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "Masks":
        n = sum(1 for k in d if k.startswith("heads."))
        g = lambda k: [d[f"{k}.{i}"].bool() for i in range(n)]  # noqa: E731
        on = lambda k: d[k].bool() if k in d else None  # noqa: E731  (masks saved before branches existed)
        return cls(d["embed"].bool(), g("heads"), g("qk"), g("v"), g("mlp"), on("attn_on"), on("mlp_on"))

    def equal(self, other: "Masks") -> bool:
        a, b = self.state_dict(), other.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class ViTAdapter:
    """The pruning view of one timm VisionTransformer (vit_*, deit_*, distilled DeiT, NViT)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.is_nvit = isinstance(model, NViT)
        if not self.is_nvit and not _is_timm_vit(model):
            raise UnsupportedModelError(
                f"nvit prunes timm VisionTransformer models (vit_*, deit_*) and NViT models; got {type(model).__name__}")
        self._check_supported()
        self.layout = self._read_layout()
        self.heads = [b.heads for b in self.layout.blocks]
        self.qk_prunable = not self._has_qk_norm

    # ---- reading the model ------------------------------------------------------------------
    def _check_supported(self) -> None:
        from timm.layers import Mlp as TimmMlp
        from timm.layers.attention import Attention as TimmAttention
        from timm.models.vision_transformer import Block as TimmBlock

        m = self.model
        bad = []
        if not self.is_nvit:
            if getattr(m, "attn_pool", None) is not None:
                bad.append("attn_pool (MAP pooling head)")
            if m.global_pool not in ("token", "avg"):
                bad.append(f"global_pool={m.global_pool!r} (supported: 'token', 'avg')")
            if getattr(m, "dynamic_img_size", False):
                bad.append("dynamic_img_size")
            if m.pos_embed is None:
                bad.append("pos_embed=None")
            if not isinstance(m.patch_embed.proj, nn.Conv2d) or not isinstance(m.patch_embed.norm, nn.Identity):
                bad.append("patch_embed (only a plain Conv2d projection is supported)")
            for i, blk in enumerate(m.blocks):
                if type(blk) is not TimmBlock:
                    bad.append(f"blocks.{i}: {type(blk).__name__} (only timm's Block)")
                    continue
                if type(blk.attn) is not TimmAttention:
                    bad.append(f"blocks.{i}.attn: {type(blk.attn).__name__} (only timm's Attention)")
                elif not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity) or getattr(blk.attn, "gate", None) is not None:
                    bad.append(f"blocks.{i}.attn: scale_norm/gated attention")
                if type(blk.mlp) is not TimmMlp or not isinstance(blk.mlp.norm, nn.Identity):
                    bad.append(f"blocks.{i}.mlp: {type(blk.mlp).__name__} (only timm's Mlp without norm)")
                elif not isinstance(blk.mlp.act, nn.GELU):
                    bad.append(f"blocks.{i}.mlp.act: {type(blk.mlp.act).__name__} (only GELU)")
                for n in ("norm1", "norm2"):
                    if type(getattr(blk, n)) not in (nn.LayerNorm, KeptLayerNorm) and not _is_timm_layernorm(getattr(blk, n)):
                        bad.append(f"blocks.{i}.{n}: {type(getattr(blk, n)).__name__} (only LayerNorm)")
            for n in ("norm_pre", "norm", "fc_norm"):
                mod = getattr(m, n)
                if not isinstance(mod, (nn.Identity, nn.LayerNorm, KeptLayerNorm)) and not _is_timm_layernorm(mod):
                    bad.append(f"{n}: {type(mod).__name__} (only LayerNorm)")
        if self.is_nvit:
            gone = [i for i, b in enumerate(m.blocks) if not (b.has_attn and b.has_mlp)]
            if gone:
                bad.append(f"blocks {gone} lost a whole branch (re-pruning such an NViT model is not supported yet)")
        if bad:
            raise UnsupportedModelError("nvit cannot prune these modules exactly: " + "; ".join(bad))
        self._has_qk_norm = m.config.qk_norm if self.is_nvit else any(
            not isinstance(b.attn.q_norm, nn.Identity) for b in m.blocks)

    def _read_layout(self) -> ViTLayout:
        m = self.model
        blocks = []
        for blk in m.blocks:
            if self.is_nvit:
                a = blk.attn
                blocks.append(BlockDims(list(a.qk_dims), list(a.v_dims), blk.mlp.fc1.out_features,
                                        qkv_bias=a.qkv.bias is not None, layer_scale=hasattr(blk.ls1, "gamma")))
            else:
                a = blk.attn
                blocks.append(BlockDims([a.head_dim] * a.num_heads, [a.head_dim] * a.num_heads,
                                        blk.mlp.fc1.out_features, qkv_bias=a.qkv.bias is not None,
                                        layer_scale=hasattr(blk.ls1, "gamma")))
        D = m.patch_embed.proj.out_channels
        return ViTLayout(D, blocks, qkv_order="per-head" if self.is_nvit else "sections")

    @property
    def distilled(self) -> bool:
        return getattr(self.model, "dist_token", None) is not None

    def prefix_token_names(self) -> list[str]:
        m = self.model
        return [n for n in ("cls_token", "dist_token", "reg_token") if getattr(m, n, None) is not None]

    def classifier_names(self) -> list[str]:
        m = self.model
        return [n for n in ("head", "head_dist") if isinstance(getattr(m, n, None), nn.Linear)]

    def norm_names(self) -> list[str]:
        m = self.model
        return [n for n in ("norm_pre", "norm", "fc_norm") if not isinstance(getattr(m, n, nn.Identity()), nn.Identity)]

    def saliency_maps(self, granularity: str, branches: bool = False):
        """(list of (parameter, TensorMap), UnitIndex) of this model in the given granularity (with a
        unit per whole attention / MLP branch when `branches`)."""
        m = self.model
        proj = m.patch_embed.proj
        norms = self.norm_names()
        maps, units = vit_maps(
            self.layout, granularity,
            patch_dim=proj.weight[0].numel(), num_pos=m.pos_embed.shape[1],
            prefix_tokens=[(n, getattr(m, n).shape[1]) for n in self.prefix_token_names()],
            classifier_heads=self.classifier_names(), num_classes=self._num_classes(),
            pre_norm="norm_pre" if "norm_pre" in norms else None,
            final_norms=[n for n in norms if n != "norm_pre"], branches=branches)
        params = dict(m.named_parameters())
        out = []
        for name, tmap in maps:
            if name not in params:
                if name.endswith(".bias") or name.endswith("gamma"):
                    continue  # optional parameter this model does not have (e.g. proj bias)
                raise UnsupportedModelError(f"nvit: expected parameter {name!r} is missing")
            out.append((params[name], tmap))
        return out, units

    def _num_classes(self) -> int:
        h = getattr(self.model, "head", None)
        return h.out_features if isinstance(h, nn.Linear) else 0

    def scales(self) -> list[list[float]]:
        if self.is_nvit:
            return [list(b.attn.scales) for b in self.model.blocks]
        return [[float(b.attn.scale)] * b.attn.num_heads for b in self.model.blocks]

    # ---- masks ----------------------------------------------------------------------------------
    def full_masks(self) -> Masks:
        L = self.layout
        dqk = lambda b: max(b.qk_dims)  # noqa: E731
        dv = lambda b: max(b.v_dims)  # noqa: E731
        qk = []
        v = []
        for b in L.blocks:
            q = torch.zeros(b.heads, dqk(b), dtype=torch.bool)
            w = torch.zeros(b.heads, dv(b), dtype=torch.bool)
            for h in range(b.heads):
                q[h, : b.qk_dims[h]] = True
                w[h, : b.v_dims[h]] = True
            qk.append(q)
            v.append(w)
        return Masks(torch.ones(L.embed, dtype=torch.bool),
                     [torch.ones(b.heads, dtype=torch.bool) for b in L.blocks], qk, v,
                     [torch.ones(b.mlp, dtype=torch.bool) for b in L.blocks])

    def install_norms(self, masks: Masks) -> None:
        """Wrap (or refresh) every embedding LayerNorm so it normalises over kept channels."""
        keep = masks.embed.float().to(self.model.patch_embed.proj.weight.device)
        targets = [(blk, n) for blk in self.model.blocks for n in ("norm1", "norm2")]
        targets += [(self.model, n) for n in self.norm_names()]
        for parent, n in targets:
            mod = getattr(parent, n)
            if isinstance(mod, KeptLayerNorm):
                mod.keep.copy_(keep)
                mod.n_kept = int(keep.sum())
            else:
                setattr(parent, n, KeptLayerNorm(mod, keep.clone()))

    def _qkv_row_masks(self, bi: int, masks: Masks) -> torch.Tensor:
        """Keep mask over the rows of block bi's qkv Linear."""
        b = self.layout.blocks[bi]
        alive = masks.heads[bi]
        q = masks.qk[bi] & alive[:, None]
        v = masks.v[bi] & alive[:, None]
        H = b.heads
        if self.layout.qkv_order == "sections":
            return torch.cat([q.reshape(-1), q.reshape(-1), v.reshape(-1)])
        return torch.cat([torch.cat([q[h, : b.qk_dims[h]], q[h, : b.qk_dims[h]], v[h, : b.v_dims[h]]]) for h in range(H)])

    def _proj_col_mask(self, bi: int, masks: Masks) -> torch.Tensor:
        b = self.layout.blocks[bi]
        v = masks.v[bi] & masks.heads[bi][:, None]
        return torch.cat([v[h, : b.v_dims[h]] for h in range(b.heads)])

    def param_masks(self, masks: Masks) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """(parameter, row keep mask or None, column keep mask or None) for every masked parameter,
        where rows are dim 0 and columns the last dim (pos_embed/tokens: last dim only)."""
        m = self.model
        e = masks.embed
        out: list = []
        pe = m.patch_embed.proj
        out.append((pe.weight, e, None))
        if pe.bias is not None:
            out.append((pe.bias, e, None))
        out.append((m.pos_embed, None, e))
        for n in self.prefix_token_names():
            out.append((getattr(m, n), None, e))
        for n in self.norm_names():
            out += _vec(getattr(m, n), e)
        for n in self.classifier_names():
            out.append((getattr(m, n).weight, None, e))
        for bi, blk in enumerate(m.blocks):
            rows = self._qkv_row_masks(bi, masks)
            pc = self._proj_col_mask(bi, masks)
            a = blk.attn
            ea, em = e & masks.attn_on[bi], e & masks.mlp_on[bi]  # a removed branch writes nothing
            out.append((a.qkv.weight, rows, e))
            if a.qkv.bias is not None:
                out.append((a.qkv.bias, rows, None))
            out.append((a.proj.weight, ea, pc))
            if a.proj.bias is not None:
                out.append((a.proj.bias, ea, None))
            mm = masks.mlp[bi]
            out.append((blk.mlp.fc1.weight, mm, e))
            if blk.mlp.fc1.bias is not None:
                out.append((blk.mlp.fc1.bias, mm, None))
            out.append((blk.mlp.fc2.weight, em, mm))
            if blk.mlp.fc2.bias is not None:
                out.append((blk.mlp.fc2.bias, em, None))
            out += _vec(blk.norm1, e) + _vec(blk.norm2, e)
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    out.append((ls.gamma, e, None))
        return out

    @torch.no_grad()
    def apply_masks(self, masks: Masks, prepared=None) -> None:
        """Zero every pruned weight (call after each optimizer step, so updates cannot revive them).

        `prepared` (from prepared_param_masks) holds the pruned indices, so only pruned rows and
        columns are written."""
        for p, r, c in prepared if prepared is not None else self.prepared_param_masks(masks):
            if r is not None:
                p.index_fill_(0, r, 0)
            if c is not None:
                p.index_fill_(p.dim() - 1, c, 0)

    def prepared_param_masks(self, masks: Masks):
        """(parameter, pruned row indices or None, pruned column indices or None) on each
        parameter's device, for the parameters that have anything pruned."""
        out = []
        for p, r, c in self.param_masks(masks):
            r = None if r is None or bool(r.all()) else (~r).nonzero().flatten().to(p.device)
            c = None if c is None or bool(c.all()) else (~c).nonzero().flatten().to(p.device)
            if r is not None or c is not None:
                out.append((p, r, c))
        return out

    # ---- conversion -------------------------------------------------------------------------------
    def nvit_config(self, masks: Masks, provenance: dict | None = None) -> NViTConfig:
        from .model import BlockConfig

        m = self.model
        blocks = []
        scales = self.scales()
        for bi in range(len(self.layout.blocks)):
            alive = masks.heads[bi].nonzero().flatten().tolist()
            qk = [int(masks.qk[bi][h].sum()) for h in alive]
            v = [int(masks.v[bi][h].sum()) for h in alive]
            blocks.append(BlockConfig(qk, v, int(masks.mlp[bi].sum()), [scales[bi][h] for h in alive]))
        blk0 = m.blocks[0]
        if self.is_nvit:
            base = m.config.to_dict()
            base.update(embed_dim=int(masks.embed.sum()), blocks=blocks, provenance=provenance or base["provenance"])
            return NViTConfig(**base)
        img = m.patch_embed.img_size
        return NViTConfig(
            img_size=img[0] if isinstance(img, (tuple, list)) else img,
            patch_size=m.patch_embed.proj.kernel_size[0],
            in_chans=m.patch_embed.proj.in_channels,
            num_classes=self._num_classes(),
            embed_dim=int(masks.embed.sum()), blocks=blocks,
            qkv_bias=blk0.attn.qkv.bias is not None, proj_bias=blk0.attn.proj.bias is not None,
            qk_norm=self._has_qk_norm,
            layer_scale=hasattr(blk0.ls1, "gamma"),
            class_token=getattr(m, "cls_token", None) is not None, dist_token=self.distilled,
            reg_tokens=0 if getattr(m, "reg_token", None) is None else m.reg_token.shape[1],
            no_embed_class=bool(m.no_embed_class), global_pool=m.global_pool,
            fc_norm=not isinstance(m.fc_norm, nn.Identity), pre_norm=not isinstance(m.norm_pre, nn.Identity),
            final_norm=not isinstance(m.norm, nn.Identity) or not isinstance(m.fc_norm, nn.Identity),
            norm_eps=float(blk0.norm1.eps), provenance=provenance or {}, data=_data_config(m))

    @torch.no_grad()
    def convert(self, masks: Masks, provenance: dict | None = None) -> NViT:
        """Slice the kept rows/columns into a dense NViT model of the new shape."""
        m = self.model
        cfg = self.nvit_config(masks, provenance)
        dev = m.patch_embed.proj.weight.device
        dt = m.patch_embed.proj.weight.dtype
        out = NViT(cfg).to(device=dev, dtype=dt).eval()
        E = masks.embed.nonzero().flatten().to(dev)
        sd = {}
        pe = m.patch_embed.proj
        sd["patch_embed.proj.weight"] = pe.weight[E]
        sd["patch_embed.proj.bias"] = pe.bias[E] if pe.bias is not None else torch.zeros(len(E), device=dev, dtype=dt)
        sd["pos_embed"] = m.pos_embed[..., E]
        for n in self.prefix_token_names():
            sd[n] = getattr(m, n)[..., E]
        for n in self.norm_names():
            sd.update(_sliced_norm(n, getattr(m, n), E))
        for n in self.classifier_names():
            h = getattr(m, n)
            sd[n + ".weight"] = h.weight[:, E]
            sd[n + ".bias"] = h.bias
        for bi, blk in enumerate(m.blocks):
            p = f"blocks.{bi}."
            cb = cfg.blocks[bi]
            if cb.has_attn:  # a removed branch has no parameters in the NViT model
                rows = self._converted_qkv_rows(bi, masks).to(dev)
                pc = self._proj_col_mask(bi, masks).nonzero().flatten().to(dev)
                a = blk.attn
                sd[p + "attn.qkv.weight"] = a.qkv.weight[rows][:, E]
                if a.qkv.bias is not None:
                    sd[p + "attn.qkv.bias"] = a.qkv.bias[rows]
                sd[p + "attn.proj.weight"] = a.proj.weight[E][:, pc]
                if cfg.qk_norm:
                    for n in ("q_norm", "k_norm"):
                        sd.update(_sliced_norm(p + "attn." + n, getattr(a, n), slice(None)))
                if a.proj.bias is not None:
                    sd[p + "attn.proj.bias"] = a.proj.bias[E]
                sd.update(_sliced_norm(p + "norm1", blk.norm1, E))
                if hasattr(blk.ls1, "gamma"):
                    sd[p + "ls1.gamma"] = blk.ls1.gamma[E]
            if cb.has_mlp:
                M = masks.mlp[bi].nonzero().flatten().to(dev)
                sd[p + "mlp.fc1.weight"] = blk.mlp.fc1.weight[M][:, E]
                sd[p + "mlp.fc1.bias"] = blk.mlp.fc1.bias[M]
                sd[p + "mlp.fc2.weight"] = blk.mlp.fc2.weight[E][:, M]
                sd[p + "mlp.fc2.bias"] = blk.mlp.fc2.bias[E]
                sd.update(_sliced_norm(p + "norm2", blk.norm2, E))
                if hasattr(blk.ls2, "gamma"):
                    sd[p + "ls2.gamma"] = blk.ls2.gamma[E]
        missing, unexpected = out.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"nvit: conversion mismatch: missing {missing}, unexpected {unexpected}")
        return out

    def _converted_qkv_rows(self, bi: int, masks: Masks) -> torch.Tensor:
        """Indices of the source qkv rows, in the NViT per-head [q_h, k_h, v_h] order of alive heads."""
        b = self.layout.blocks[bi]
        starts, off = [], 0
        for h in range(b.heads):
            starts.append(off)
            off += 2 * b.qk_dims[h] + b.v_dims[h]
        rows = []
        Sqk = sum(b.qk_dims)
        for h in masks.heads[bi].nonzero().flatten().tolist():
            q = masks.qk[bi][h, : b.qk_dims[h]].nonzero().flatten()
            v = masks.v[bi][h, : b.v_dims[h]].nonzero().flatten()
            if self.layout.qkv_order == "sections":
                d = b.qk_dims[0]
                rows += [h * d + q, Sqk + h * d + q, 2 * Sqk + h * b.v_dims[0] + v]
            else:
                s = starts[h]
                rows += [s + q, s + b.qk_dims[h] + q, s + 2 * b.qk_dims[h] + v]
        return torch.cat(rows)


def _data_config(model: nn.Module) -> dict:
    """The preprocessing a timm model's weights expect (its pretrained config), where it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k])
            for k in ("mean", "std", "crop_pct", "interpolation") if cfg.get(k) is not None}


def _is_timm_layernorm(mod: nn.Module) -> bool:
    from timm.layers import LayerNorm as TimmLayerNorm

    return isinstance(mod, TimmLayerNorm)


def _vec(norm: nn.Module, e: torch.Tensor) -> list:
    return [(p, e, None) for p in (norm.weight, norm.bias) if p is not None]


def _sliced_norm(name: str, norm: nn.Module, E: torch.Tensor) -> dict:
    d = {}
    if norm.weight is not None:
        d[name + ".weight"] = norm.weight[E]
    if norm.bias is not None:
        d[name + ".bias"] = norm.bias[E]
    return d

"""The pruning view of one model: its family's declaration (nvit.spec, nvit/families) turned into what
the pruner uses -- saliency maps, keep-masks applied as zeros, embedding LayerNorms over the kept
channels, and exact conversion into the pruned model. timm's code is never patched: the adapter only
reads modules and swaps the embedding norm submodules of the model instance it is handed, so the
masked model computes exactly what the converted model will compute.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import (Family, Masks, UnsupportedModelError, Units, group_by_param, keep_masks, saliency_maps,
                   sliced_state)

__all__ = ["Adapter", "KeptLayerNorm", "Masks", "UnsupportedModelError"]


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


class Adapter:
    """One model seen through its family's structure declaration."""

    def __init__(self, model: nn.Module, family: Family | None = None):
        from .families import family_of

        self.model = model
        self.family = family or family_of(model)
        self.dims = self.family.dims()
        self.params = dict(model.named_parameters())
        self.slices = group_by_param(self.family.slices(self.dims), self.params)
        self.qk_prunable = self.family.qk_prunable()
        self.qk_width = self.family.qk_width

    def units(self, granularity: str, branches: bool = False) -> Units:
        """The unit ids of this model's structures in the given granularity (with a unit per whole
        attention / MLP branch when `branches`)."""
        return Units(self.dims, granularity, branches)

    def saliency_maps(self, granularity: str, branches: bool = False, units: Units | None = None):
        """(list of (parameter, TensorMap), UnitIndex) in the given granularity."""
        units = units or self.units(granularity, branches)
        return saliency_maps(self.slices, self.params, units), units.index

    def scales(self) -> list[list[float]]:
        return self.family.scales()

    # ---- masks ----------------------------------------------------------------------------------
    def full_masks(self) -> Masks:
        return Masks.full(self.dims)

    def install_norms(self, masks: Masks) -> None:
        """Wrap (or refresh) every embedding LayerNorm so it normalises over kept channels (a norm over
        k·D_s channels of stage s, e.g. patch merging's, keeps position j·D_s + c with channel c)."""
        device = next(iter(self.params.values())).device
        stages = [m.float().to(device) for m in masks.embeds]
        for parent, n, *stage in self.family.embed_norms():
            mod = getattr(parent, n)
            keep = stages[stage[0] if stage else 0]
            width = mod.normalized_shape[-1]
            if width % keep.numel():
                raise ValueError(f"nvit: LayerNorm {n} over {width} channels is not a multiple of its stage's "
                                 f"{keep.numel()} embedding channels")
            keep = keep.repeat(width // keep.numel())
            if isinstance(mod, KeptLayerNorm):
                mod.keep.copy_(keep)
                mod.n_kept = int(keep.sum())
            else:
                setattr(parent, n, KeptLayerNorm(mod, keep.clone()))

    def param_masks(self, masks: Masks):
        """(parameter, row keep mask or None, last-axis keep mask or None) for every sliced parameter."""
        return keep_masks(self.slices, self.params, masks)

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
    def nvit_config(self, masks: Masks, provenance: dict | None = None):
        """The architecture of the converted model for these masks."""
        return self.family.config(masks, provenance)

    @torch.no_grad()
    def convert(self, masks: Masks, provenance: dict | None = None) -> nn.Module:
        """Slice the kept rows/columns into a dense model of the new shape (the family's converted
        model: NViT for ViTs and EVA)."""
        cfg = self.nvit_config(masks, provenance)
        ref = next(iter(self.params.values()))
        out = self.family.build(cfg).to(device=ref.device, dtype=ref.dtype).eval()
        sd = self.family.convert_state(sliced_state(self.slices, self.params, masks), masks, cfg)
        for k, v in self.model.state_dict().items():  # buffers no structure owns (e.g. a rotary table)
            sd.setdefault(k, v)
        target = out.state_dict()
        missing = [k for k in target if k not in sd]
        if missing:
            raise RuntimeError(f"nvit: conversion left parameters of the converted model unset: {missing}")
        for k, v in target.items():
            if v.shape != sd[k].shape:
                raise RuntimeError(f"nvit: conversion of {k}: shape {tuple(sd[k].shape)} != {tuple(v.shape)}")
        out.load_state_dict({k: sd[k].to(target[k].dtype) for k in target})
        return out



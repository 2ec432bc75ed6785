"""timm SwinTransformer (v1: swin_*_patch4_window*) and NViT-Swin models: which parameter slices each
structure owns.

A Swin model has one residual stream -- one embedding -- per stage; EMBED slices carry their stage in
`block`. Blocks are numbered across stages (stage 0's first, ...). The block structures are the ViT
family's (same derivations: see nvit/families/vit.py), plus:

- relative position bias: column h of the block's table is head h's; it is removed with the head and
  writes no gate (the bias enters the logits, not the head's output, and not q·k).
- embedding channel c of stage s (one gate wherever the channel enters or leaves stage s's stream):
  writes: the stream's start -- stage 0: patch_embed.norm's γ_c/β_c (the conv rows feed that norm);
  stage s > 0: the patch-merging reduction's row c (its output IS the stream, no norm follows) --
  each block's norm1/norm2 γ/β and proj/fc2 row c (+bias), and the stage's exit reads: the next
  stage's patch-merging norm (γ/β at the four positions j·C_s + c that hold channel c: timm flattens
  each 2×2 neighbourhood as [C | C | C | C]) or, for the last stage, the final norm. The merging
  reduction's input columns and the classifier's columns read a norm's output: they do not write.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model_swin import NViTSwin, NViTSwinConfig, SwinBlockConfig, block_flops, block_params
from ..spec import EMBED, HEAD, BlockDims, Dims, Masks, Slice, UnsupportedModelError
from ..model import drop_path_of
from .vit import ViTFamily, _is_layernorm, data_config, drop_rates, kept_channels


def timm_shape_kwargs(state: dict) -> dict:
    """timm.create_model kwargs of the Swin (v1) architecture a state dict holds -- per stage depth, heads,
    window and MLP ratio, the embedding width and head dim -- or {} for a state dict of another model.
    (A window timm shrank to a small map is stored as that map's window: it builds the same model.)"""
    import math

    tables = {}  # (stage, block) → shape of the block's bias table [(2w-1)², heads]
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) == 6 and (parts[0], parts[2], parts[5]) == ("layers", "blocks", "relative_position_bias_table"):
            tables[(int(parts[1]), int(parts[3]))] = v.shape
    if not tables or "patch_embed.proj.weight" not in state:
        return {}
    stages = sorted({s for s, _ in tables})
    depths = [1 + max(i for s2, i in tables if s2 == s) for s in stages]
    heads = [tables[(s, 0)][1] for s in stages]
    windows = [(math.isqrt(tables[(s, 0)][0]) + 1) // 2 for s in stages]
    for s, w in zip(stages, windows):
        if (2 * w - 1) ** 2 != tables[(s, 0)][0]:  # (2h-1)(2w-1) rows: h and w cannot be told apart
            raise ValueError(f"layers.{s}: a relative position bias table of {tables[(s, 0)][0]} rows is not a "
                             f"square window's; nvit reads the shape of square-window Swin checkpoints only")
    dims = [state[f"layers.{s}.blocks.0.norm1.weight"].shape[0] for s in stages]
    head_dims = [state[f"layers.{s}.blocks.0.attn.qkv.weight"].shape[0] // (3 * heads[s]) for s in stages]
    kw = dict(embed_dim=dims if dims != [dims[0] * 2 ** s for s in stages] else dims[0], depths=tuple(depths),
              num_heads=tuple(heads),
              # one int when every stage has the same window: timm < 1.0.17 reads a 2-stage tuple of
              # pairs as one (h, w) window; else (h, w) per stage
              window_size=windows[0] if len(set(windows)) == 1 else tuple((w, w) for w in windows),
              mlp_ratio=tuple(state[f"layers.{s}.blocks.0.mlp.fc1.weight"].shape[0] / dims[s] for s in stages),
              patch_size=state["patch_embed.proj.weight"].shape[-1])
    if any(h * n != d for h, n, d in zip(head_dims, heads, dims)):
        kw["head_dim"] = tuple(head_dims)
    return kw


class SwinFamily(ViTFamily):
    name = "swin"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.is_nvit = isinstance(model, NViTSwin)
        # (stage, parameter prefix, module) of every block, in the flat order of the block indices
        self.blocks = [(s, f"layers.{s}.blocks.{i}.", blk) for s, layer in enumerate(model.layers)
                       for i, blk in enumerate(layer.blocks)]

    @classmethod
    def timm_class(cls) -> type:
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(model, (NViTSwin, SwinTransformerV2)) or isinstance(model, cls.timm_class())

    # ---- guards -----------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        m = self.model
        if isinstance(m, SwinTransformerV2):
            return ["SwinTransformerV2 (cosine attention normalises q and k over all of a head's dims, so a QK "
                    "dim cannot be removed alone; a per-head logit scale, the position-bias MLP and post-norm "
                    "blocks are not declared): only Swin v1 (swin_*) is supported"]
        if self.is_nvit:
            gone = [i for i, (_, _, b) in enumerate(self.blocks) if not (b.has_attn and b.has_mlp)]
            return [f"blocks {gone} lost a whole branch (re-pruning such a model is not supported yet)"] if gone else []
        bad = []
        dynamic_masks = any(getattr(b, "dynamic_mask", False) for layer in m.layers for b in layer.blocks)
        if getattr(m, "dynamic_img_size", False) or dynamic_masks:
            bad.append("dynamic_img_size / strict_img_size=False (the masks and padding are built per input)")
        fc = getattr(m.head, "fc", None)
        if not isinstance(fc, (nn.Linear, nn.Identity)) or not (
                m.global_pool == "avg" or (m.global_pool == "" and isinstance(fc, nn.Identity))):
            bad.append(f"head: global_pool={m.global_pool!r} (only 'avg' with a Linear classifier or none, or '' "
                       f"without a classifier)")
        pe = m.patch_embed
        if (not isinstance(pe.proj, nn.Conv2d) or not (isinstance(pe.norm, nn.Identity) or _is_layernorm(pe.norm))
                or pe.proj.kernel_size != pe.proj.stride or pe.proj.kernel_size[0] != pe.proj.kernel_size[1]
                or pe.proj.padding != (0, 0)):
            bad.append("patch_embed (only a square, non-overlapping Conv2d projection with a LayerNorm or none)")
        if not _is_layernorm(m.norm):
            bad.append(f"norm: {type(m.norm).__name__} (only LayerNorm)")
        for s, layer in enumerate(m.layers):
            if len(layer.blocks) == 0:
                bad.append(f"layers.{s}: no blocks")
            down = layer.downsample
            if s == 0 and not isinstance(down, nn.Identity):
                bad.append("layers.0.downsample (stage 0 must not downsample)")
            if s > 0 and (type(down) is not PatchMerging or not _is_layernorm(down.norm)
                          or down.reduction.bias is not None):
                bad.append(f"layers.{s}.downsample: {type(down).__name__} (only timm's PatchMerging)")
        for s, p, blk in self.blocks:
            p = p.rstrip(".")
            if type(blk) is not SwinTransformerBlock:
                bad.append(f"{p}: {type(blk).__name__} (only timm's SwinTransformerBlock)")
                continue
            if blk.always_partition:
                bad.append(f"{p}: always_partition (windows larger than the map)")
            if type(blk.attn) is not WindowAttention:
                bad.append(f"{p}.attn: {type(blk.attn).__name__} (only timm's WindowAttention)")
            for n in ("norm1", "norm2"):
                if not _is_layernorm(getattr(blk, n)):
                    bad.append(f"{p}.{n}: {type(getattr(blk, n)).__name__} (only LayerNorm)")
            bad += self.mlp_problems(p, blk)
        if not bad:  # the converted model must rebuild every block's windows as timm built them (timm 1.0.16
            try:     # builds the stage after an odd merge for the floor map while the merge pads: no fit)
                self.config(Masks.full(self.dims()))
            except UnsupportedModelError as e:
                bad.append(str(e).removeprefix("nvit: "))
        return bad

    def qk_prunable(self) -> bool:
        return True

    # ---- shape ------------------------------------------------------------------------------------
    def stage_widths(self) -> list[int]:
        m = self.model
        return [m.patch_embed.proj.out_channels] + [layer.downsample.reduction.out_features for layer in m.layers[1:]]

    def head_dims(self, blk) -> tuple[list[int], list[int]]:
        a = blk.attn
        if self.is_nvit:
            return list(a.qk_dims), list(a.v_dims)
        d = a.qkv.out_features // (3 * a.num_heads)
        return [d] * a.num_heads, [d] * a.num_heads

    def dims(self) -> Dims:
        blocks = []
        for _, _, blk in self.blocks:
            qk, v = self.head_dims(blk)
            blocks.append(BlockDims(qk, v, self.mlp_width(blk)))
        return Dims(self.stage_widths(), blocks)

    def embed_norms(self) -> list[tuple]:
        m = self.model
        out = [(m.patch_embed, "norm", 0)] if not isinstance(m.patch_embed.norm, nn.Identity) else []
        for s, layer in enumerate(m.layers):
            if s > 0:
                out.append((layer.downsample, "norm", s - 1))  # over 4·D_{s-1}: the previous stage's channels
        out += [(blk, n, s) for s, _, blk in self.blocks for n in ("norm1", "norm2")]
        return out + ([(m, "norm", len(m.layers) - 1)] if not isinstance(m.norm, nn.Identity) else [])

    def scales(self) -> list[list[float]]:
        if self.is_nvit:
            return [list(blk.attn.scales) for _, _, blk in self.blocks]
        return [[float(blk.attn.scale)] * blk.attn.num_heads for _, _, blk in self.blocks]

    # ---- slices -----------------------------------------------------------------------------------
    def slices(self, dims: Dims) -> list[Slice]:
        widths = dims.embed
        out: list[Slice] = []

        def embed(name: str, axis: int, stage: int, writes: bool, index=None):
            if self._param(name):
                out.append(Slice(name, axis, EMBED, stage, torch.arange(widths[stage]) if index is None else index,
                                 writes=writes))

        normed = not isinstance(self.model.patch_embed.norm, nn.Identity)
        embed("patch_embed.proj.weight", 0, 0, not normed)  # feeds patch_embed.norm, which starts the stream
        embed("patch_embed.proj.bias", 0, 0, not normed)
        embed("patch_embed.norm.weight", 0, 0, True)
        embed("patch_embed.norm.bias", 0, 0, True)
        for s in range(1, len(widths)):
            p = f"layers.{s}.downsample."
            merged = torch.arange(4 * widths[s - 1]) % widths[s - 1]  # position j·C + c holds channel c
            embed(p + "norm.weight", 0, s - 1, True, merged)
            embed(p + "norm.bias", 0, s - 1, True, merged)
            embed(p + "reduction.weight", -1, s - 1, False, merged)
            embed(p + "reduction.weight", 0, s, True)  # the reduction's output is stage s's stream
        for b, ((s, p, _), bd) in enumerate(zip(self.blocks, dims.blocks)):
            out += self.block_slices(b, bd, p, torch.arange(widths[s]), stage=s)
            heads = torch.arange(bd.heads)
            out.append(Slice(p + "attn.relative_position_bias_table", -1, HEAD, b, heads))
        last = len(widths) - 1
        embed("norm.weight", 0, last, True)
        embed("norm.bias", 0, last, True)
        embed("head.fc.weight", -1, last, False)
        return out

    # ---- cost -------------------------------------------------------------------------------------
    def embed_widths(self, config: NViTSwinConfig) -> list[int]:
        return list(config.embed_dims)

    def with_embed_widths(self, config: NViTSwinConfig, widths: list[int]) -> NViTSwinConfig:
        import dataclasses

        # (a config to cost: which source channels the widths keep is unknown, so no output mapping)
        return dataclasses.replace(config, embed_dims=list(widths), dense_embed_dims=[], embed_indices=None)

    def block_cost(self, metric: str, config: NViTSwinConfig, block: SwinBlockConfig) -> float:
        return float(block_flops(config, block) if metric == "flops" else block_params(config, block))

    # ---- conversion -------------------------------------------------------------------------------
    def block_configs(self, masks: Masks) -> list[SwinBlockConfig]:
        return [SwinBlockConfig(**vars(b), stage=s)
                for b, (s, _, _) in zip(super().block_configs(masks), self.blocks)]

    def config(self, masks: Masks, provenance: dict | None = None) -> NViTSwinConfig:
        m = self.model
        embed_dims = [int(t.sum()) for t in masks.embeds]
        blocks = self.block_configs(masks)
        if self.is_nvit:
            c = m.config
            base = c.to_dict()
            kept = [kept_channels(keep, None if c.embed_indices is None else c.embed_indices[s],
                                  c.dense_embed_dims[s] if c.embed_indices is not None else 0)
                    for s, keep in enumerate(masks.embeds)]
            base.update(embed_dims=embed_dims, blocks=blocks, provenance=provenance or base["provenance"],
                        dense_embed_dims=[d for d, _ in kept], embed_indices=[i for _, i in kept],
                        drop_path_rates=[drop_path_of(b.drop_path1) for _, _, b in self.blocks])
            return NViTSwinConfig(**base)
        pe = m.patch_embed
        first = [layer.blocks[0] for layer in m.layers]
        cfg = NViTSwinConfig(
            img_size=list(pe.img_size), patch_size=pe.proj.kernel_size[0], in_chans=pe.proj.in_channels,
            num_classes=m.head.fc.out_features if isinstance(m.head.fc, nn.Linear) else 0,
            embed_dims=embed_dims, blocks=blocks,
            # a window timm shrank to a small map does not shift: the shrunk one derives the same geometry
            window_sizes=[list(b.window_size) for b in first],
            qkv_bias=first[0].attn.qkv.bias is not None, patch_norm=not isinstance(pe.norm, nn.Identity),
            norm_eps=float(first[0].norm1.eps), provenance=provenance or {}, data=data_config(m),
            global_pool=m.global_pool, dense_embed_dims=[int(t.numel()) for t in masks.embeds],
            embed_indices=[t.nonzero().flatten().tolist() for t in masks.embeds],
            **drop_rates(m, [blk for _, _, blk in self.blocks], head=m.head))
        self.check_geometry(cfg)
        return cfg

    def check_geometry(self, config: NViTSwinConfig) -> None:
        """Every block's map, window and shift as the converted model derives them == timm's."""
        for i, (_, p, blk) in enumerate(self.blocks):
            ours = config.geometry(i)
            theirs = (tuple(blk.input_resolution), tuple(blk.window_size), tuple(blk.shift_size))
            if ours != theirs:
                raise UnsupportedModelError(f"nvit: {p.rstrip('.')}: (map, window, shift) {theirs} differs from the "
                                            f"converted model's {ours}")

    def build(self, config: NViTSwinConfig) -> nn.Module:
        return NViTSwin(config)

    def convert_state(self, sliced, masks, config):
        return dict(sliced)

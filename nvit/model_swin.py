"""NViT-Swin: a pruned timm Swin Transformer (v1) -- every block its own heads, per-head QK and V dims
and MLP width, every stage its own embedding width -- and its exact analytic cost.

It computes what timm's ``SwinTransformer`` computes (shifted windows, their masks, zero padding of
feature maps not divisible by the window, patch merging), with parameter names mirroring timm's
(layers.s.downsample.{norm,reduction}, layers.s.blocks.i.attn.{qkv,proj,relative_position_bias_table},
...), so the Swin family's declaration (nvit/families/swin.py) prunes it again. As in NViT, the qkv
Linear's rows are packed per head [q_h k_h v_h]; each head keeps its column of the relative position
bias table. The window attention is one ``uneven_attention`` call per block with the gathered bias
[H, N, N] and the shift mask [nW, N, N].
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cost  # also registers the attention op's FLOP formula with FlopCounterMode
from .model import (BlockConfig, Mlp, attend, check_drop_rates, check_embed_index, check_pool, config_from_fields,
                    drop_path_module, timm_pretrained_cfg, to_dense_module)


@dataclass
class SwinBlockConfig(BlockConfig):
    stage: int = 0  # which stage (embedding width, feature-map size, window) the block is in


@dataclass
class NViTSwinConfig:
    """Everything needed to rebuild an NViT-Swin model (stored as config.json)."""

    img_size: list[int]          # [H, W]
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dims: list[int]        # per stage
    blocks: list[SwinBlockConfig]
    window_sizes: list[list[int]]  # per stage: the source's window [h, w] (timm's, or the map if smaller)
    qkv_bias: bool = True
    patch_norm: bool = True
    norm_eps: float = 1e-5
    provenance: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # as NViTConfig.data
    final_norm: bool = True      # False after prune_intermediate_layers(prune_norm=True)
    global_pool: str = "avg"     # "avg", or "" (no pooling, num_classes 0: timm's reset_classifier(0, ""))
    # Per stage, as NViTConfig.dense_embed_dim / embed_index: the source's widths and each kept channel's
    # source channel ([] / None: outputs at the pruned widths, as configs before these fields).
    dense_embed_dims: list[int] = field(default_factory=list)
    embed_indices: list[list[int]] | None = None
    # As NViTConfig's: drop-path per block ([]: none) and timm's drop_rate, proj_drop_rate, attn_drop_rate.
    drop_path_rates: list[float] = field(default_factory=list)
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0

    def __post_init__(self):
        if isinstance(self.img_size, int):
            self.img_size = [self.img_size, self.img_size]
        self.img_size = [int(v) for v in self.img_size]
        self.window_sizes = [[int(w), int(w)] if isinstance(w, int) else [int(v) for v in w] for w in self.window_sizes]
        self.blocks = [b if isinstance(b, SwinBlockConfig) else SwinBlockConfig(**b) for b in self.blocks]
        S = len(self.embed_dims)
        stages = [b.stage for b in self.blocks]
        if S < 1 or len(self.window_sizes) != S or min(self.embed_dims) < 1:
            raise ValueError(f"nvit: a Swin config needs one embedding width ≥1 and one window per stage; got "
                             f"embed_dims={self.embed_dims}, window_sizes={self.window_sizes}")
        if stages != sorted(stages) or (stages and not (0 <= stages[0] and stages[-1] < S)):
            raise ValueError(f"nvit: Swin blocks must be listed stage by stage within 0..{S - 1}, got stages {stages}")
        check_pool(self.global_pool, self.num_classes, ("avg",))
        if self.embed_indices is not None:
            if len(self.embed_indices) != S or len(self.dense_embed_dims) != S:
                raise ValueError("nvit: embed_indices and dense_embed_dims need one entry per stage")
            self.embed_indices = [check_embed_index(w, d, i)
                                  for w, d, i in zip(self.embed_dims, self.dense_embed_dims, self.embed_indices)]
        elif self.dense_embed_dims not in ([], list(self.embed_dims)):
            raise ValueError("nvit: dense_embed_dims other than embed_dims needs embed_indices")
        self.drop_path_rates = check_drop_rates(self, len(self.blocks))

    def out_dims(self) -> list[int]:
        """Per stage, the width its outputs come out at (the source's dense width where recorded)."""
        return list(self.dense_embed_dims) if self.embed_indices is not None else list(self.embed_dims)

    @property
    def out_dim(self) -> int:
        """The width of forward_features and of a headless model's output (the last stage's)."""
        return self.out_dims()[-1]

    @property
    def family(self) -> str:
        return "swin"

    @property
    def embed_dim(self) -> int:
        """The width the classifier reads (the last stage's; timm's num_features)."""
        return self.embed_dims[-1]

    @property
    def depths(self) -> list[int]:
        return [sum(1 for b in self.blocks if b.stage == s) for s in range(len(self.embed_dims))]

    def resolution(self, stage: int) -> tuple[int, int]:
        """The stage's feature map (patch merging halves it, rounding up: odd maps are zero-padded)."""
        r = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        for _ in range(stage):
            r = ((r[0] + 1) // 2, (r[1] + 1) // 2)
        return r

    def geometry(self, index: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(feature map, window, shift) of block `index`, as timm's SwinTransformerBlock derives them:
        a window larger than the map shrinks to it (and then does not shift); odd blocks of a stage shift
        by half the stage's window."""
        b = self.blocks[index]
        res, target, window = self.resolution(b.stage), self.window_sizes[b.stage], self.window(b.stage)
        shifted = sum(1 for c in self.blocks[:index] if c.stage == b.stage) % 2 == 1
        shift = tuple(0 if (r <= w or not shifted) else t // 2 for r, w, t in zip(res, window, target))
        return res, window, shift

    def window(self, stage: int) -> tuple[int, int]:
        """The stage's window: the source's, shrunk to the feature map where that is smaller."""
        return tuple(r if r <= w else w for r, w in zip(self.resolution(stage), self.window_sizes[stage]))

    def pretrained_cfg(self) -> dict:
        return timm_pretrained_cfg(self.in_chans, self.img_size, self.num_classes, "head.fc", self.data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NViTSwinConfig":
        return config_from_fields(cls, d)


# --------------------------------------------------------------------------------------------------
# Windows (timm's layout: an image's windows row-major, images major)
# --------------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] → [B·nW, wh·ww, C]."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """[B·nW, wh·ww, C] → [B, H, W, C]."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """[N, N]: the bias table row of each (query, key) pair of a window (timm's index)."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shift_mask(res: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor | None:
    """[nW, N, N] additive mask of a shifted block (0 within a region, -100 across regions, as timm),
    over the map padded to whole windows; None for an unshifted block."""
    if not any(shift):
        return None
    (wh, ww), (sh, sw) = window, shift
    H, W = math.ceil(res[0] / wh) * wh, math.ceil(res[1] / ww) * ww
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    win = window_partition(img, window).squeeze(-1)
    m = win[:, None, :] - win[:, :, None]
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class UnevenWindowAttention(nn.Module):
    """Window attention whose heads each have their own QK and V dims and relative position bias column."""

    def __init__(self, dim: int, cfg: BlockConfig, window: tuple[int, int], qkv_bias: bool, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.qk_dims, self.v_dims, self.scales = list(cfg.qk_dims), list(cfg.v_dims), list(cfg.scales)
        self.window = window
        self.qkv = nn.Linear(dim, cfg.qkv_out, bias=qkv_bias)
        self.proj = nn.Linear(sum(cfg.v_dims), dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), cfg.heads))
        self.register_buffer("relative_position_index", relative_position_index(*window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """[H, N, N]: each head's bias column gathered for every (query, key) pair."""
        N = self.window[0] * self.window[1]
        b = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return b.view(N, N, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = attend(self.qkv(x), self.qk_dims, self.v_dims, self.scales, self.attn_drop, bias=self.position_bias(),
                     mask=mask)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """timm's SwinTransformerBlock: (shifted) window attention on norm1's output, then the MLP; a branch
    whose structures were all removed is absent."""

    def __init__(self, dim: int, cfg: BlockConfig, geometry, qkv_bias: bool, norm_eps: float, drop_path: float = 0.0,
                 proj_drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.resolution, self.window, self.shift = geometry
        self.has_attn, self.has_mlp = cfg.has_attn, cfg.has_mlp
        if self.has_attn:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn = UnevenWindowAttention(dim, cfg, self.window, qkv_bias, attn_drop, proj_drop)
            self.register_buffer("attn_mask", shift_mask(self.resolution, self.window, self.shift), persistent=False)
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = Mlp(dim, cfg.mlp, drop=proj_drop)
        self.drop_path1, self.drop_path2 = drop_path_module(drop_path), drop_path_module(drop_path)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        (wh, ww), (sh, sw) = self.window, self.shift
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))  # zeros, after norm1 (as timm)
        Hp, Wp = x.shape[1], x.shape[2]
        y = window_reverse(self.attn(window_partition(x, self.window), self.attn_mask), self.window, Hp, Wp)
        y = y[:, :H, :W, :]
        return torch.roll(y, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_attn:
            x = x + self.drop_path1(self._attn(self.norm1(x)))
        if self.has_mlp:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PatchMerging(nn.Module):
    """timm's: each 2×2 neighbourhood's channels side by side (position j·C + c, j = 2·col + row), a
    LayerNorm over the 4C, a Linear to the next stage's width (no bias). Odd maps are zero-padded."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1], x.shape[2]
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):
    """Conv2d patches → NHWC, then (timm's patch_norm) a LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps) if norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClassifierHead(nn.Module):
    """timm's ClassifierHead on NHWC maps: pool ('avg' over the map, or '' none), dropout, fc."""

    def __init__(self, dim: int, num_classes: int, pool: str = "avg", drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.pool = pool
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()

    def forward(self, x, pre_logits: bool = False):
        x = self.drop(x.mean(dim=(1, 2)) if self.pool == "avg" else x)
        return x if pre_logits else self.fc(x)


class NViTSwin(nn.Module):
    """A pruned Swin Transformer with an irregular architecture (see NViTSwinConfig).

    Its features (``forward_features``, each stage's ``forward_intermediates`` map, a headless model's
    ``forward``) come out at the source's dense widths, pruned channels zero (the module docstring);
    ``forward_head`` takes features of either width. timm's ``forward_intermediates`` /
    ``prune_intermediate_layers`` / ``reset_classifier`` work as on timm's SwinTransformer."""

    def __init__(self, config: NViTSwinConfig):
        super().__init__()
        c = self.config = config
        self.pretrained_cfg = c.pretrained_cfg()
        D = c.embed_dims
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D[0], c.patch_norm, c.norm_eps)
        rates = c.drop_path_rates or [0.0] * len(c.blocks)
        stages = []
        for s in range(len(D)):
            blocks = [SwinBlock(D[s], b, c.geometry(i), c.qkv_bias, c.norm_eps, rates[i], c.proj_drop_rate,
                                c.attn_drop_rate)
                      for i, b in enumerate(c.blocks) if b.stage == s]
            down = PatchMerging(D[s - 1], D[s], c.norm_eps) if s > 0 else nn.Identity()
            stages.append(SwinStage(down, blocks))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(D[-1], eps=c.norm_eps) if c.final_norm else nn.Identity()
        self.head = ClassifierHead(D[-1], c.num_classes, c.global_pool, c.drop_rate)
        indices = c.embed_indices or [None] * len(D)
        dense = [to_dense_module(i, d) for i, d in zip(indices, c.out_dims())]
        self.to_dense = nn.ModuleList([nn.Identity() if t is None else t for t in dense])
        self._timm_attributes()

    def _timm_attributes(self) -> None:
        c = self.config
        self.num_classes, self.global_pool = c.num_classes, c.global_pool
        self.num_features = self.head_hidden_size = c.out_dim
        self.feature_info = [dict(module=f"layers.{s}", num_chs=d, reduction=c.patch_size * 2 ** s)
                             for s, d in enumerate(c.out_dims())]

    def _dense(self, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
        return self.to_dense[stage](x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._dense(self._features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        last = self.to_dense[-1]
        if isinstance(last, nn.Module) and hasattr(last, "compact"):
            x = last.compact(x)
        x = self.head(x, pre_logits=pre_logits)
        return self._dense(x) if pre_logits or self.config.num_classes <= 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self._features(x))

    # ---- timm's feature-extraction API --------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's SwinTransformer.forward_intermediates: the outputs of the stages `indices` (the last n for
        an int, all for None; the final norm on the last stage's when `norm`), NCHW (or 'NHWC'), each at its
        stage's output width."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"nvit: output_fmt must be 'NCHW' (or 'NHWC'), got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x = self.patch_embed(x)
        last = len(self.layers) - 1
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates, i = [], 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self._dense(self.norm(x) if norm and i == last else x, i)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return self._dense(x, i), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: drop the stages after the last of `indices`; the final norm with `prune_norm` or when
        stages were dropped (it is the last stage's), and the classifier with `prune_head` or when stages
        were dropped (num_classes 0, no pooling). The config follows, so the model saves and loads."""
        from timm.models._features import feature_take_indices

        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[:max_index + 1]
        self.to_dense = self.to_dense[:max_index + 1]
        c, keep = self.config, max_index + 1
        n = sum(1 for b in c.blocks if b.stage < keep)
        self.config = dataclasses.replace(
            c, embed_dims=c.embed_dims[:keep], blocks=c.blocks[:n], window_sizes=c.window_sizes[:keep],
            final_norm=isinstance(self.norm, nn.LayerNorm), dense_embed_dims=c.dense_embed_dims[:keep],
            embed_indices=None if c.embed_indices is None else c.embed_indices[:keep],
            drop_path_rates=c.drop_path_rates[:n])
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        self._timm_attributes()
        return take_indices

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (freshly initialised) classifier over the last stage's pruned stream, or none."""
        c = self.config
        pool = c.global_pool if global_pool is None else global_pool
        self.config = dataclasses.replace(c, num_classes=num_classes, global_pool=pool)
        w = self.patch_embed.proj.weight
        self.head = ClassifierHead(c.embed_dims[-1], num_classes, pool, c.drop_rate, device=w.device, dtype=w.dtype)
        self.pretrained_cfg = self.config.pretrained_cfg()
        self._timm_attributes()


# --------------------------------------------------------------------------------------------------
# Cost: params and matmul FLOPs (FlopCounterMode's convention, as nvit.cost)
# --------------------------------------------------------------------------------------------------
def _windows(config: NViTSwinConfig, stage: int) -> tuple[int, int, int]:
    """(windows per image, tokens per window, map tokens) of a stage (the padded map is nW·N tokens)."""
    res, window = config.resolution(stage), config.window(stage)
    nw = math.ceil(res[0] / window[0]) * math.ceil(res[1] / window[1])
    return nw, window[0] * window[1], res[0] * res[1]


def block_params(config: NViTSwinConfig, b: SwinBlockConfig) -> int:
    """A ViT block's parameters (nvit.cost; the same modules) plus each head's bias table column."""
    wh, ww = config.window(b.stage)
    vit = cost.block_params(config.embed_dims[b.stage], b, qkv_bias=config.qkv_bias, proj_bias=True)
    return vit + ((2 * wh - 1) * (2 * ww - 1) * b.heads if b.has_attn else 0)


def block_flops(config: NViTSwinConfig, b: SwinBlockConfig, batch_size: int = 1) -> int:
    """The attention branch as a ViT block's over nW windows of N tokens (the padded map), the MLP
    branch as a ViT block's over the map's tokens (nvit.cost's formulas)."""
    D = config.embed_dims[b.stage]
    nw, N, tokens = _windows(config, b.stage)
    attn = cost.block_flops(D, dataclasses.replace(b, mlp=0), N, nw * batch_size)
    mlp = cost.block_flops(D, dataclasses.replace(b, qk_dims=[], v_dims=[], scales=[], qk_index=None), tokens,
                           batch_size)
    return attn + mlp


def _stem_head_params(config: NViTSwinConfig) -> int:
    c, D = config, config.embed_dims
    n = c.in_chans * D[0] * c.patch_size ** 2 + D[0] + (2 * D[0] if c.patch_norm else 0)
    n += sum(2 * 4 * D[s - 1] + 4 * D[s - 1] * D[s] for s in range(1, len(D)))  # patch merging
    n += 2 * D[-1]                                                                 # final norm
    return n + (D[-1] * c.num_classes + c.num_classes if c.num_classes > 0 else 0)


def _stem_head_flops(config: NViTSwinConfig, batch_size: int) -> int:
    c, D = config, config.embed_dims
    n = 2 * c.in_chans * c.patch_size ** 2 * D[0] * _windows(c, 0)[2]
    n += sum(2 * 4 * D[s - 1] * D[s] * _windows(c, s)[2] for s in range(1, len(D)))
    return batch_size * (n + 2 * D[-1] * max(c.num_classes, 0))


def count_params(config: NViTSwinConfig) -> int:
    """Exactly ``sum(p.numel() for p in NViTSwin(config).parameters())``."""
    return _stem_head_params(config) + sum(block_params(config, b) for b in config.blocks)


def count_flops(config: NViTSwinConfig, batch_size: int = 1) -> int:
    """Forward FLOPs of NViTSwin(config), as FlopCounterMode counts them (matmuls, conv, attention)."""
    return _stem_head_flops(config, batch_size) + sum(block_flops(config, b, batch_size) for b in config.blocks)

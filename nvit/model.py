"""The NViT model: a timm-style Vision Transformer whose every block has its own head count, per-head
QK and V dims and MLP width, over one (pruned) embedding width shared by all blocks.

Parameter names mirror timm's VisionTransformer (patch_embed.proj, blocks.i.attn.qkv, ...), so the
ViT family's structure declaration (nvit/families/vit.py) applies to it too; the qkv Linear's rows are
packed per head as [q_h, k_h, v_h], the layout the uneven-dims attention op reads (nvit_kernels.layout).

Outputs at the source's width. Inside, the residual stream is the pruned embedding (embed_dim kept
channels); what the model hands out -- ``forward_features``, the pooled features of a headless model
(``num_classes=0``: ``forward``, ``forward_head(pre_logits=True)``) and ``forward_intermediates`` -- is
at the source's dense width (``dense_embed_dim``): the kept channels go back to their source positions
(``embed_index``) and the pruned ones are zeros, exactly what the masked model returns there. A
backbone pruned for a detection or segmentation head so keeps the width its head was built for. The
scatter is a fixed gather from the features with one zero channel appended (Pad + Gather in ONNX); a
model with a classifier never pays for it in ``forward`` (the classifier reads the pruned stream).
Configs written before these fields (no ``embed_index``) output the pruned width, as they always did.

Stochastic layers as timm's (train mode only; identities in eval, where conversion is exact): drop-path
per block (``drop_path_rates``, timm's linear decay kept from the source), dropout after the position
embedding, on the attention probabilities, after each projection (attn proj, MLP hidden and fc2) and
before the classifier. :func:`set_drop_path` sets the drop-path rate of a timm or NViT model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvit_kernels import layout
from nvit_kernels.attention import uneven_attention


@dataclass
class BlockConfig:
    qk_dims: list[int]
    v_dims: list[int]
    mlp: int
    scales: list[float]  # softmax scale per head: the source model's, kept through pruning
    # Rotary models: per head, the source dim index of each kept QK dim (picks its frequency).
    qk_index: list[list[int]] | None = None

    def __post_init__(self):
        n = len(self.qk_dims)
        if len(self.v_dims) != n or len(self.scales) != n:
            raise ValueError("nvit: a block needs one QK dim, V dim and scale per head")
        if self.qk_index is not None and [len(i) for i in self.qk_index] != list(self.qk_dims):
            raise ValueError("nvit: qk_index needs one source index per QK dim of every head")
        if min(self.qk_dims + self.v_dims, default=1) < 1 or self.mlp < 0:
            raise ValueError(f"nvit: block dims must be ≥1, got qk={self.qk_dims} v={self.v_dims} mlp={self.mlp}")

    @property
    def has_attn(self) -> bool:
        """False when the whole attention branch was removed (no heads: the block skips it)."""
        return len(self.qk_dims) > 0

    @property
    def has_mlp(self) -> bool:
        """False when the whole MLP branch was removed (mlp == 0: the block skips it)."""
        return self.mlp > 0

    @property
    def heads(self) -> int:
        return len(self.qk_dims)

    @property
    def qkv_out(self) -> int:
        return layout.qkv_width(self.qk_dims, self.v_dims)


@dataclass
class NViTConfig:
    """Everything needed to rebuild an NViT model (stored as config.json)."""

    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    blocks: list[BlockConfig]
    qkv_bias: bool = True
    proj_bias: bool = True
    qk_norm: bool = False  # LayerNorm over each head's q and k (timm qk_norm); needs equal QK dims
    layer_scale: bool = False
    class_token: bool = True
    dist_token: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"  # "token" | "avg"
    fc_norm: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    norm_eps: float = 1e-6
    mlp_kind: str = "gelu"  # "gelu": fc2(GELU(fc1 x)); "swiglu": fc1 rows [gate; value], fc2(SiLU(gate)·value)
    rope_dim: int = 0  # rotary position embedding (EVA-02): the source head dim; 0: none
    provenance: dict[str, Any] = field(default_factory=dict)
    # Preprocessing the weights expect (timm's data config keys: mean, std, crop_pct, interpolation);
    # unset keys take timm's defaults (ImageNet statistics for 3 channels, 0.5/0.5 for others).
    data: dict[str, Any] = field(default_factory=dict)
    # The source's embedding width and, per kept channel, its source channel: features, intermediates
    # and a headless model's output come out at that width, pruned channels zero (see the module
    # docstring). 0 / None (configs before these fields, ReViT configs): outputs at embed_dim.
    dense_embed_dim: int = 0
    embed_index: list[int] | None = None
    # Stochastic layers (train mode only): drop-path rate per block ([]: none), timm's drop_rate (before
    # the classifier), pos_drop_rate, proj_drop_rate (attn proj, MLP hidden and fc2), attn_drop_rate.
    drop_path_rates: list[float] = field(default_factory=list)
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0

    def __post_init__(self):
        self.blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in self.blocks]
        if self.mlp_kind not in ("gelu", "swiglu"):
            raise ValueError(f"nvit: mlp_kind must be 'gelu' or 'swiglu', got {self.mlp_kind!r}")
        check_pool(self.global_pool, self.num_classes, ("token", "avg"))
        if self.embed_dim < 1:
            raise ValueError("nvit: embed_dim must be ≥1")
        self.embed_index = check_embed_index(self.embed_dim, self.dense_embed_dim, self.embed_index)
        self.drop_path_rates = check_drop_rates(self, len(self.blocks))

    @property
    def out_dim(self) -> int:
        """The width of the features the model hands out (forward_features, intermediates, a headless
        model's output): the source's dense width where recorded, else embed_dim."""
        return self.dense_embed_dim if self.embed_index is not None else self.embed_dim

    @property
    def family(self) -> str:
        """The nvit.families declaration that prunes this model again."""
        return "eva" if self.rope_dim or self.mlp_kind != "gelu" else "vit"

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def num_pos(self) -> int:
        return self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)

    def pretrained_cfg(self) -> dict:
        """timm's pretrained config of this model: what timm.data.resolve_data_config reads."""
        return timm_pretrained_cfg(self.in_chans, (self.img_size, self.img_size), self.num_classes, "head", self.data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NViTConfig":
        return config_from_fields(cls, d)


def check_pool(pool: str, num_classes: int, pools: tuple[str, ...]) -> None:
    if pool not in pools + ("",):
        raise ValueError(f"nvit: global_pool must be one of {pools + ('',)}, got {pool!r}")
    if pool == "" and num_classes > 0:
        raise ValueError("nvit: global_pool '' (no pooling) needs num_classes=0 (a classifier per token is not supported)")


def check_embed_index(width: int, dense: int, index) -> list[int] | None:
    """A valid embed_index (the source channel of each of `width` kept channels, within `dense`), or None."""
    if index is None:
        if dense not in (0, width):
            raise ValueError(f"nvit: dense_embed_dim {dense} ≠ embed_dim {width} needs embed_index")
        return None
    index = [int(i) for i in index]
    if len(index) != width or len(set(index)) != width or (index and not (0 <= min(index) and max(index) < dense)):
        raise ValueError(f"nvit: embed_index must name {width} distinct channels in 0..{dense - 1}")
    return index


def check_drop_rates(config, depth: int) -> list[float]:
    """The config's per-block drop-path rates ([] or one per block) and dropout rates, each in [0, 1)."""
    rates = [float(r) for r in config.drop_path_rates]
    if rates and len(rates) != depth:
        raise ValueError(f"nvit: drop_path_rates needs one rate per block ({depth}), got {len(rates)}")
    for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate"):
        if hasattr(config, name) and not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"nvit: {name} must be in [0, 1), got {getattr(config, name)}")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ValueError(f"nvit: drop-path rates must be in [0, 1), got {rates}")
    return rates


def config_from_fields(cls, d: dict):
    """A config dataclass from its to_dict() output; unknown keys (a config of another kind or version)
    are an error naming them."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"nvit: unknown {cls.__name__} keys {sorted(unknown)}")
    return cls(**d)


def timm_pretrained_cfg(in_chans: int, img_hw, num_classes: int, classifier: str, data: dict) -> dict:
    """timm's pretrained config of a converted model: input size, the preprocessing its weights expect
    (`data`: the source's; unset keys take timm's defaults, ImageNet statistics for 3 channels, 0.5/0.5
    otherwise), its classifier."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rgb = in_chans == 3
    cfg = {"input_size": [in_chans, *img_hw],
           "mean": list(IMAGENET_DEFAULT_MEAN) if rgb else [0.5] * in_chans,
           "std": list(IMAGENET_DEFAULT_STD) if rgb else [0.5] * in_chans,
           "crop_pct": 0.9, "interpolation": "bicubic", "num_classes": num_classes,
           "first_conv": "patch_embed.proj", "classifier": classifier}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
    return cfg


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


def attend(qkv: torch.Tensor, qk_dims, v_dims, scales, attn_drop: nn.Dropout, bias: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """uneven_attention, or -- in training with attention dropout -- the same attention as one matmul chain
    per head with dropout on the probabilities (timm's attn_drop; the fused op has no dropout)."""
    if not (attn_drop.training and attn_drop.p > 0):
        return uneven_attention(qkv, qk_dims, v_dims, scales, bias=bias, mask=mask)
    if mask is not None:
        mask = mask.repeat(qkv.shape[0] // mask.shape[0], 1, 1)  # batch element b uses mask[b % nW]
    outs = []
    for h, (span, s) in enumerate(zip(layout.head_spans(qk_dims, v_dims), scales)):
        q, k, v = qkv[..., span.q], qkv[..., span.k], qkv[..., span.v]
        logits = (q @ k.transpose(-1, -2)).float() * s
        if bias is not None:
            logits = logits + bias[h].float()
        if mask is not None:
            logits = logits + mask.float()
        outs.append(attn_drop(torch.softmax(logits, dim=-1)).to(v.dtype) @ v)
    return torch.cat(outs, dim=-1)


class ToDense(nn.Module):
    """Kept embedding channels back at their source positions in a `dense`-wide tensor, zeros elsewhere
    (a fixed gather from the input with one zero channel appended: Pad + Gather in ONNX); `compact`
    takes them out again."""

    def __init__(self, index: list[int], dense: int):
        super().__init__()
        gather = torch.full((dense,), len(index), dtype=torch.long)
        gather[torch.tensor(index, dtype=torch.long)] = torch.arange(len(index))
        self.register_buffer("gather", gather, persistent=False)
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.width, self.dense = len(index), dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1)).index_select(-1, self.gather)

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """The kept channels of a dense-width tensor (a pruned-width one is returned as it is)."""
        return x.index_select(-1, self.index) if x.shape[-1] == self.dense else x


def to_dense_module(index: list[int] | None, dense: int) -> ToDense | None:
    """A ToDense for this embed_index, or None where the outputs need none (no index, or every channel
    kept in its own place)."""
    if index is None or index == list(range(dense)):
        return None
    return ToDense(index, dense)


class UnevenAttention(nn.Module):
    """Multi-head attention where head h has its own QK and V dims; one fused kernel for all heads."""

    def __init__(self, dim: int, cfg: BlockConfig, qkv_bias: bool, proj_bias: bool, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rope_dim: int = 0, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.qk_dims, self.v_dims, self.scales = list(cfg.qk_dims), list(cfg.v_dims), list(cfg.scales)
        self.qk_index = cfg.qk_index
        self.qkv = nn.Linear(dim, cfg.qkv_out, bias=qkv_bias)
        self.proj = nn.Linear(sum(cfg.v_dims), dim, bias=proj_bias)
        self.attn_drop = nn.Dropout(attn_drop)  # on the attention probabilities (training only)
        self.proj_drop = nn.Dropout(proj_drop)
        self.qk_norm = qk_norm
        if qk_norm:
            if len(set(self.qk_dims)) != 1:
                raise ValueError("nvit: qk_norm needs the same QK dim in every head of a block")
            self.q_norm = nn.LayerNorm(self.qk_dims[0], eps=norm_eps)
            self.k_norm = nn.LayerNorm(self.qk_dims[0], eps=norm_eps)
        self.rope_dim = rope_dim
        if rope_dim:
            if cfg.qk_index is None:
                raise ValueError("nvit: a rotary block needs qk_index (the source dim of every QK dim)")
            self._rope_indices(cfg, rope_dim)

    def _rope_indices(self, cfg: BlockConfig, R: int) -> None:
        """Gather indices that rotate every q/k channel of the packed qkv with its source dim's
        frequency: rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i] (timm's interleaved pairs, which
        pruning keeps whole). Into the table [sin | cos | 1 | 0]; v channels get cos 1, sin 0."""
        one, zero = 2 * R, 2 * R + 1
        cos_i, sin_i, partner, sign = [], [], [], []
        for h, span in enumerate(layout.head_spans(cfg.qk_dims, cfg.v_dims)):
            src = list(cfg.qk_index[h])
            pos = {d: i for i, d in enumerate(src)}
            for base in (span.q.start, span.k.start):
                for i, d in enumerate(src):
                    cos_i.append(R + d)
                    sin_i.append(d)
                    partner.append(base + pos[d ^ 1])
                    sign.append(-1.0 if d % 2 == 0 else 1.0)
            for j in range(span.v.start, span.v.stop):
                cos_i.append(one)
                sin_i.append(zero)
                partner.append(j)
                sign.append(0.0)
        for n, t in (("rope_cos", cos_i), ("rope_sin", sin_i), ("rope_partner", partner)):
            self.register_buffer(n, torch.tensor(t, dtype=torch.long), persistent=False)
        self.register_buffer("rope_sign", torch.tensor(sign), persistent=False)

    def _rotate(self, qkv: torch.Tensor, rope: torch.Tensor, prefix: int) -> torch.Tensor:
        """timm's apply_rot_embed_cat on the patch tokens' q and k (prefix tokens are not rotated)."""
        table = torch.cat([rope, rope.new_ones(rope.shape[0], 1), rope.new_zeros(rope.shape[0], 1)], dim=1)
        cos, sin = table[:, self.rope_cos], table[:, self.rope_sin] * self.rope_sign.to(rope.dtype)
        C = qkv.shape[-1]
        cos = torch.cat([rope.new_ones(prefix, C), cos])
        sin = torch.cat([rope.new_zeros(prefix, C), sin])
        return (qkv * cos + qkv[..., self.rope_partner] * sin).to(qkv.dtype)

    def _normalize_qk(self, qkv):
        parts = []
        for span in layout.head_spans(self.qk_dims, self.v_dims):
            parts += [self.q_norm(qkv[..., span.q]), self.k_norm(qkv[..., span.k]), qkv[..., span.v]]
        return torch.cat(parts, dim=-1)

    def forward(self, x, rope: torch.Tensor | None = None, prefix: int = 0):
        qkv = self.qkv(x)
        if self.qk_norm:
            qkv = self._normalize_qk(qkv)
        if self.rope_dim:
            qkv = self._rotate(qkv, rope, prefix)
        return self.proj_drop(self.proj(attend(qkv, self.qk_dims, self.v_dims, self.scales, self.attn_drop)))


class Mlp(nn.Module):
    """fc2(GELU(fc1 x)), or with swiglu (timm's GluMlp as EVA-02 builds it) fc1 holds the gate rows
    then the value rows and the hidden is SiLU(gate)·value."""

    def __init__(self, dim: int, hidden: int, swiglu: bool = False, drop: float = 0.0):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.act = nn.SiLU() if swiglu else nn.GELU()
        self.drop1 = nn.Dropout(drop)  # timm's Mlp / GluMlp: after the activation and after fc2
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        h = self.fc1(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.drop2(self.fc2(self.drop1(h)))


class NViTBlock(nn.Module):
    """timm's pre-norm block; a branch whose structures were all removed (no heads, or mlp == 0) is
    absent, and the block passes the stream through it unchanged."""

    def __init__(self, dim: int, cfg: BlockConfig, *, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, layer_scale: bool = False, norm_eps: float = 1e-6, mlp_kind: str = "gelu",
                 rope_dim: int = 0, drop_path: float = 0.0, proj_drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.has_attn, self.has_mlp = cfg.has_attn, cfg.has_mlp
        if self.has_attn:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn = UnevenAttention(dim, cfg, qkv_bias, proj_bias, qk_norm, norm_eps, rope_dim, attn_drop,
                                        proj_drop)
            self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = Mlp(dim, cfg.mlp, swiglu=mlp_kind == "swiglu", drop=proj_drop)
            self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path1, self.drop_path2 = drop_path_module(drop_path), drop_path_module(drop_path)

    def forward(self, x, rope: torch.Tensor | None = None, prefix: int = 0):
        if self.has_attn:
            h = self.norm1(x)
            x = x + self.drop_path1(self.ls1(self.attn(h) if rope is None else self.attn(h, rope, prefix)))
        if self.has_mlp:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class NViT(nn.Module):
    """A pruned Vision Transformer with an irregular architecture (see NViTConfig).

    What it hands out has the masked model's shape: ``forward_features``, ``forward_intermediates`` and
    a headless model's ``forward`` (``num_classes=0``: the pooled features) are at the source's dense
    embedding width (``config.out_dim``), the kept channels at their source positions and zeros in the
    pruned ones (the module docstring says why). ``forward_head`` takes features of either width.
    timm's ``forward_intermediates`` / ``prune_intermediate_layers`` / ``reset_classifier`` work as on
    timm's VisionTransformer (no attention masks)."""

    def __init__(self, config: NViTConfig):
        super().__init__()
        c = self.config = config
        self.pretrained_cfg = c.pretrained_cfg()  # timm.data.resolve_data_config(model=…) reads it
        D = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D)
        if c.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if c.dist_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        if c.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_pos, D))
        self.pos_drop = nn.Dropout(c.pos_drop_rate)
        self.norm_pre = nn.LayerNorm(D, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        rates = c.drop_path_rates or [0.0] * len(c.blocks)
        self.blocks = nn.Sequential(*[
            NViTBlock(D, b, qkv_bias=c.qkv_bias, proj_bias=c.proj_bias, qk_norm=c.qk_norm, layer_scale=c.layer_scale,
                      norm_eps=c.norm_eps, mlp_kind=c.mlp_kind, rope_dim=c.rope_dim, drop_path=r,
                      proj_drop=c.proj_drop_rate, attn_drop=c.attn_drop_rate) for b, r in zip(c.blocks, rates)])
        if c.rope_dim:  # the source model's rotary table for this grid: [sin | cos] per patch
            self.register_buffer("rope", torch.zeros(c.num_patches, 2 * c.rope_dim))
        self.norm = nn.LayerNorm(D, eps=c.norm_eps) if c.final_norm and not c.fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=c.norm_eps) if c.fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(D, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if c.dist_token:
            self.head_dist = nn.Linear(D, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.to_dense = to_dense_module(c.embed_index, c.dense_embed_dim)
        self._timm_attributes()

    def _timm_attributes(self) -> None:
        """The attributes timm's users read (feature widths, prefix tokens, feature_info)."""
        c = self.config
        self.num_classes, self.global_pool, self.num_prefix_tokens = c.num_classes, c.global_pool, c.num_prefix_tokens
        self.num_features = self.head_hidden_size = c.out_dim
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=c.out_dim, reduction=c.patch_size)
                             for i in range(len(c.blocks))]

    def _prefix(self, B: int) -> list[torch.Tensor]:
        toks = []
        if self.config.class_token:
            toks.append(self.cls_token.expand(B, -1, -1))
        if self.config.dist_token:
            toks.append(self.dist_token.expand(B, -1, -1))
        if self.config.reg_tokens:
            toks.append(self.reg_token.expand(B, -1, -1))
        return toks

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Pruned-width channels → the output width (see the class docstring)."""
        return x if self.to_dense is None else self.to_dense(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = self._prefix(x.shape[0])
        if self.config.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm_pre(self.pos_drop(x))

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk(x, self.rope, self.config.num_prefix_tokens) if self.config.rope_dim else blk(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """forward_features at the pruned width (what the classifier reads)."""
        x = self._embed(x)
        if self.config.rope_dim:
            for blk in self.blocks:
                x = self._block(blk, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._dense(self._features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        c = self.config
        if self.to_dense is not None:
            x = self.to_dense.compact(x)
        headless = c.num_classes <= 0
        if c.dist_token:
            i = int(c.class_token)
            a, b = self.head_drop(x[:, 0]), self.head_drop(x[:, i])  # timm's distilled head: no fc_norm
            if pre_logits:
                return self._dense((a + b) / 2)
            a, b = self.head(a), self.head_dist(b)
            if self.training and getattr(self, "distilled_training", False):
                return (self._dense(a), self._dense(b)) if headless else (a, b)
            return self._dense((a + b) / 2) if headless else (a + b) / 2
        if c.global_pool == "avg":
            x = x[:, c.num_prefix_tokens:].mean(dim=1)
        elif c.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        if pre_logits or headless:
            return self._dense(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self._features(x))

    # ---- timm's feature-extraction API --------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """timm's VisionTransformer.forward_intermediates: the outputs of the blocks `indices` (the last n
        for an int, all for None), optionally through the final norm, as NCHW maps or NLC tokens (prefix
        tokens split off; with return_prefix_tokens, (tokens, prefix) pairs), at the output width."""
        from timm.models._features import feature_take_indices

        if attn_mask is not None or is_causal:
            raise NotImplementedError("nvit: NViT's attention takes no attention mask")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"nvit: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._block(blk, x)
            if i in take_indices:
                intermediates.append(self._dense(self.norm(x) if norm else x))
        n = self.config.num_prefix_tokens
        prefix_tokens = [y[:, :n] for y in intermediates] if n else None
        intermediates = [y[:, n:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = height // self.config.patch_size, width // self.config.patch_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self._dense(self.norm(x))
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self._dense(self.norm(x)), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: drop the blocks after the last of `indices`, optionally the final norm and the
        classifier (num_classes 0, no pooling); the config follows, so the model saves and loads."""
        from timm.models._features import feature_take_indices

        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
        c = self.config
        fc_norm = isinstance(self.fc_norm, nn.LayerNorm)
        self.config = dataclasses.replace(c, blocks=c.blocks[:max_index + 1],
                                          drop_path_rates=c.drop_path_rates[:max_index + 1], fc_norm=fc_norm,
                                          final_norm=fc_norm or isinstance(self.norm, nn.LayerNorm))
        if prune_head:
            self.reset_classifier(0, "")
        self._timm_attributes()
        return take_indices

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (freshly initialised) classifier over the pruned stream, or none (num_classes=0)."""
        c = self.config
        pool = c.global_pool if global_pool is None else global_pool
        self.config = dataclasses.replace(c, num_classes=num_classes, global_pool=pool)
        w = self.patch_embed.proj.weight

        def head():
            return nn.Linear(c.embed_dim, num_classes, device=w.device, dtype=w.dtype) if num_classes > 0 else nn.Identity()

        self.head = head()
        if c.dist_token:
            self.head_dist = head()
        self.pretrained_cfg = self.config.pretrained_cfg()
        self._timm_attributes()


# --------------------------------------------------------------------------------------------------
# Drop-path (stochastic depth)
# --------------------------------------------------------------------------------------------------
def drop_path_module(rate: float) -> nn.Module:
    """timm's DropPath at `rate` (an Identity at 0, as timm builds its blocks)."""
    from timm.layers import DropPath

    return DropPath(rate) if rate > 0 else nn.Identity()


def drop_path_of(module: nn.Module) -> float:
    """The rate of a drop-path module (timm's DropPath; 0 for anything else, e.g. an Identity)."""
    from timm.layers import DropPath

    return float(module.drop_prob) if isinstance(module, DropPath) else 0.0


def linear_drop_path_rates(rate: float, depth: int) -> list[float]:
    """timm's stochastic depth decay rule: 0 at the first block, `rate` at the last, linear between."""
    return [x.item() for x in torch.linspace(0, rate, depth)]


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm ViT / DeiT / Eva / Swin or an NViT / NViT-Swin model, in order
    (a Swin's stage by stage)."""
    layers = getattr(model, "layers", None)
    if layers is not None and all(hasattr(layer, "blocks") for layer in layers):
        return [blk for layer in layers for blk in layer.blocks]
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"nvit: {type(model).__name__} has no residual blocks (blocks, or layers[i].blocks) "
                        f"to set a drop-path rate on")
    return list(blocks)


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Set the stochastic depth of `model` -- a timm VisionTransformer / DeiT / Eva / SwinTransformer (also
    masked by nvit's Adapter), or a converted NViT / NViT-Swin model -- to `rate` with timm's linear
    decay over its blocks (0 at the first, `rate` at the last; across all stages of a Swin). Replaces
    every block's drop_path1 / drop_path2 with timm's DropPath (an Identity where the block's rate is 0:
    timm builds its blocks without DropPath when created with drop_path_rate=0), and records the rates
    in a converted model's config (so they are saved with it). Returns the per-block rates. Drop-path
    acts in train mode only."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"nvit: the drop-path rate must be in [0, 1), got {rate}")
    blocks = residual_blocks(model)
    bad = [type(b).__name__ for b in blocks if not (hasattr(b, "drop_path1") and hasattr(b, "drop_path2"))]
    if bad:
        raise TypeError(f"nvit: blocks without drop_path1/drop_path2 ({sorted(set(bad))}): cannot set drop-path")
    rates = linear_drop_path_rates(rate, len(blocks))
    for blk, r in zip(blocks, rates):
        blk.drop_path1, blk.drop_path2 = drop_path_module(r), drop_path_module(r)
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and hasattr(config, "drop_path_rates"):
        model.config = dataclasses.replace(config, drop_path_rates=rates)
    return rates

"""The NViT model: a timm-style Vision Transformer whose every block has its own head count, per-head
QK and V dims and MLP width, over one (pruned) embedding width shared by all blocks.

Parameter names mirror timm's VisionTransformer (patch_embed.proj, blocks.i.attn.qkv, ...), so the
ViT family's structure declaration (nvit/families/vit.py) applies to it too; the qkv Linear's rows are
packed per head as [q_h, k_h, v_h], the layout the uneven-dims attention op reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

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
        return 2 * sum(self.qk_dims) + sum(self.v_dims)


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

    def __post_init__(self):
        self.blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in self.blocks]
        if self.mlp_kind not in ("gelu", "swiglu"):
            raise ValueError(f"nvit: mlp_kind must be 'gelu' or 'swiglu', got {self.mlp_kind!r}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"nvit: global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.embed_dim < 1:
            raise ValueError("nvit: embed_dim must be ≥1")

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


class UnevenAttention(nn.Module):
    """Multi-head attention where head h has its own QK and V dims; one fused kernel for all heads."""

    def __init__(self, dim: int, cfg: BlockConfig, qkv_bias: bool, proj_bias: bool, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rope_dim: int = 0):
        super().__init__()
        self.qk_dims, self.v_dims, self.scales = list(cfg.qk_dims), list(cfg.v_dims), list(cfg.scales)
        self.qk_index = cfg.qk_index
        self.qkv = nn.Linear(dim, cfg.qkv_out, bias=qkv_bias)
        self.proj = nn.Linear(sum(cfg.v_dims), dim, bias=proj_bias)
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
        off = 0
        for h, (q, v) in enumerate(zip(cfg.qk_dims, cfg.v_dims)):
            src = list(cfg.qk_index[h])
            pos = {d: i for i, d in enumerate(src)}
            for part in range(2):  # q, then k
                base = off + part * q
                for i, d in enumerate(src):
                    cos_i.append(R + d)
                    sin_i.append(d)
                    partner.append(base + pos[d ^ 1])
                    sign.append(-1.0 if d % 2 == 0 else 1.0)
            for j in range(v):
                cos_i.append(one)
                sin_i.append(zero)
                partner.append(off + 2 * q + j)
                sign.append(0.0)
            off += 2 * q + v
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
        for h, t in enumerate(qkv.split([2 * q + v for q, v in zip(self.qk_dims, self.v_dims)], dim=-1)):
            q, k, v = t.split([self.qk_dims[h], self.qk_dims[h], self.v_dims[h]], dim=-1)
            parts += [self.q_norm(q), self.k_norm(k), v]
        return torch.cat(parts, dim=-1)

    def forward(self, x, rope: torch.Tensor | None = None, prefix: int = 0):
        qkv = self.qkv(x)
        if self.qk_norm:
            qkv = self._normalize_qk(qkv)
        if self.rope_dim:
            qkv = self._rotate(qkv, rope, prefix)
        return self.proj(uneven_attention(qkv, self.qk_dims, self.v_dims, self.scales))


class Mlp(nn.Module):
    """fc2(GELU(fc1 x)), or with swiglu (timm's GluMlp as EVA-02 builds it) fc1 holds the gate rows
    then the value rows and the hidden is SiLU(gate)·value."""

    def __init__(self, dim: int, hidden: int, swiglu: bool = False):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.act = nn.SiLU() if swiglu else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            return self.fc2(self.act(gate) * value)
        return self.fc2(self.act(h))


class NViTBlock(nn.Module):
    """timm's pre-norm block; a branch whose structures were all removed (no heads, or mlp == 0) is
    absent, and the block passes the stream through it unchanged."""

    def __init__(self, dim: int, cfg: BlockConfig, *, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, layer_scale: bool = False, norm_eps: float = 1e-6, mlp_kind: str = "gelu",
                 rope_dim: int = 0):
        super().__init__()
        self.has_attn, self.has_mlp = cfg.has_attn, cfg.has_mlp
        if self.has_attn:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn = UnevenAttention(dim, cfg, qkv_bias, proj_bias, qk_norm, norm_eps, rope_dim)
            self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = Mlp(dim, cfg.mlp, swiglu=mlp_kind == "swiglu")
            self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x, rope: torch.Tensor | None = None, prefix: int = 0):
        if self.has_attn:
            h = self.norm1(x)
            x = x + self.ls1(self.attn(h) if rope is None else self.attn(h, rope, prefix))
        if self.has_mlp:
            x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class NViT(nn.Module):
    """A pruned Vision Transformer with an irregular architecture (see NViTConfig)."""

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
        self.norm_pre = nn.LayerNorm(D, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[
            NViTBlock(D, b, qkv_bias=c.qkv_bias, proj_bias=c.proj_bias, qk_norm=c.qk_norm, layer_scale=c.layer_scale,
                      norm_eps=c.norm_eps, mlp_kind=c.mlp_kind, rope_dim=c.rope_dim) for b in c.blocks])
        if c.rope_dim:  # the source model's rotary table for this grid: [sin | cos] per patch
            self.register_buffer("rope", torch.zeros(c.num_patches, 2 * c.rope_dim))
        self.norm = nn.LayerNorm(D, eps=c.norm_eps) if c.final_norm and not c.fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=c.norm_eps) if c.fc_norm else nn.Identity()
        self.head = nn.Linear(D, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if c.dist_token:
            self.head_dist = nn.Linear(D, c.num_classes) if c.num_classes > 0 else nn.Identity()

    def _prefix(self, B: int) -> list[torch.Tensor]:
        toks = []
        if self.config.class_token:
            toks.append(self.cls_token.expand(B, -1, -1))
        if self.config.dist_token:
            toks.append(self.dist_token.expand(B, -1, -1))
        if self.config.reg_tokens:
            toks.append(self.reg_token.expand(B, -1, -1))
        return toks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = self._prefix(x.shape[0])
        if self.config.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        if self.config.rope_dim:
            for blk in self.blocks:
                x = blk(x, self.rope, self.config.num_prefix_tokens)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.dist_token:
            i = int(c.class_token)
            a, b = self.head(x[:, 0]), self.head_dist(x[:, i])  # timm's distilled head: no fc_norm
            return (a, b) if self.training and getattr(self, "distilled_training", False) else (a + b) / 2
        if c.global_pool == "avg":
            x = x[:, c.num_prefix_tokens:].mean(dim=1)
        else:
            x = x[:, 0]
        return self.head(self.fc_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

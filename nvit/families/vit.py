"""timm VisionTransformer (vit_*, deit_*, distilled DeiT, DINOv2 with registers, CLIP pre-norm,
avg pooling) and NViT models: which parameter slices each structure owns.

Why each slice writes (enters the saliency) or not -- the gate derivations. The saliency of S is
(dL/dm_S)² for a multiplicative gate m_S on S's output, and dL/dm_S = Σ w·g over the slices the gate
scales:

- head h: a gate on the head's output o_h (before proj). proj is linear, so the proj columns of
  head h write it. (Equivalently the v rows of h, since softmax rows sum to 1; not counted twice.)
- QK dim j of head h: a gate on the term q_j·k_j of the logits. Scaling q row j (weight and bias)
  scales exactly that term, so q row j writes; k row j gives the same derivative and is not counted.
- V dim j of head h: a gate on channel j of o_h: the proj column (h, j) writes it.
- MLP channel j: a gate on the hidden activation after the nonlinearity: fc2 column j. (fc1 row j
  is before the nonlinearity: not a gate on the channel.)
- embedding channel c: ONE gate applied wherever the channel is written into the residual stream
  or read from it, each site counted once. Writes: the embedding stage (patch-embedding row c and
  bias, position-embedding and token columns c; with a pre-norm (CLIP) the stream starts at
  norm_pre's output, so its γ_c/β_c instead), each block's proj row c (+bias) and fc2 row c (+bias).
  Reads: each LayerNorm output a consumer reads (norm1, norm2, norm / fc_norm: γ_c and β_c), or, with
  no final norm, the classifier's input column c. The consumers' input columns after a norm (qkv,
  fc1, classifier) carry the same first-order term as the norm's γ/β, and LayerScale's γ the same
  as the row it scales: they do not write.
- whole branch: a gate on what the attention (MLP) branch adds to the stream: proj (fc2) rows + bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nvit_kernels import layout

from ..model import BlockConfig, NViT, NViTConfig, drop_path_of
from ..spec import ATTN_BRANCH, EMBED, HEAD, MLP, MLP_BRANCH, QK, V, BlockDims, Dims, Family, Masks, Slice

PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def _is_layernorm(mod: nn.Module) -> bool:
    from timm.layers import LayerNorm as TimmLayerNorm

    from ..structures import KeptLayerNorm

    return isinstance(mod, (nn.LayerNorm, KeptLayerNorm, TimmLayerNorm))


def qkv_rows(bd: BlockDims, sections: bool, qk_width: int = 1) -> tuple[torch.Tensor, ...]:
    """(part 0/1/2 = q/k/v, head, dim) of every row of a fused qkv Linear: timm's sections (all q,
    then all k, then all v; equal dims per head) or NViT's per head [q_h k_h v_h] (nvit_kernels.layout)."""
    qk = [n * qk_width for n in bd.qk_units]
    if not sections:
        return layout.packed_rows(qk, bd.v_dims)
    parts, heads, dims = [], [], []

    def add(part, h, n):
        parts.append(torch.full((n,), part))
        heads.append(torch.full((n,), h))
        dims.append(torch.arange(n))

    for part, per_head in ((layout.Q, qk), (layout.K, qk), (layout.V, bd.v_dims)):
        for h in range(bd.heads):
            add(part, h, per_head[h])
    return torch.cat(parts), torch.cat(heads), torch.cat(dims)


class ViTFamily(Family):
    name = "vit"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.is_nvit = isinstance(model, NViT)
        self._names = {n for n, _ in model.named_parameters()}  # optional parameters (biases, LayerScale)

    @classmethod
    def timm_class(cls) -> type:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if isinstance(model, NViT):
            return model.config.family == cls.name
        return isinstance(model, cls.timm_class())

    # ---- guards -----------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        m = self.model
        if self.is_nvit:
            gone = [i for i, b in enumerate(m.blocks) if not (b.has_attn and b.has_mlp)]
            return [f"blocks {gone} lost a whole branch (re-pruning such an NViT model is not supported yet)"] if gone else []
        bad = []
        if getattr(m, "attn_pool", None) is not None:
            bad.append("attn_pool (MAP pooling head, global_pool='map')")
        if m.global_pool not in ("token", "avg") and not (m.global_pool == "" and not isinstance(m.head, nn.Linear)):
            bad.append(f"global_pool={m.global_pool!r} (supported: 'token', 'avg'; '' without a classifier)")
        if getattr(m, "dynamic_img_size", False):
            bad.append("dynamic_img_size")
        if m.pos_embed is None:
            bad.append("pos_embed=None")
        if not isinstance(m.patch_embed.proj, nn.Conv2d) or not isinstance(m.patch_embed.norm, nn.Identity):
            bad.append("patch_embed (only a plain Conv2d projection is supported)")
        for i, blk in enumerate(m.blocks):
            bad += self.block_problems(f"blocks.{i}", blk)
            for n in ("norm1", "norm2"):
                if hasattr(blk, n) and not _is_layernorm(getattr(blk, n)):
                    bad.append(f"blocks.{i}.{n}: {type(getattr(blk, n)).__name__} (only LayerNorm)")
        for n in ("norm_pre", "norm", "fc_norm"):
            mod = getattr(m, n, nn.Identity())
            if not isinstance(mod, nn.Identity) and not _is_layernorm(mod):
                bad.append(f"{n}: {type(mod).__name__} (only LayerNorm)")
        return bad

    def block_problems(self, p: str, blk: nn.Module) -> list[str]:
        """What this family cannot prune exactly in one block of a timm model."""
        from timm.layers.attention import Attention as TimmAttention
        from timm.models.vision_transformer import Block as TimmBlock

        if type(blk) is not TimmBlock:
            return [f"{p}: {type(blk).__name__} (only timm's Block)"]
        bad = []
        if type(blk.attn) is not TimmAttention:
            bad.append(f"{p}.attn: {type(blk.attn).__name__} (only timm's Attention)")
        elif not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity) or getattr(blk.attn, "gate", None) is not None:
            bad.append(f"{p}.attn: scale_norm/gated attention")
        return bad + self.mlp_problems(p, blk)

    def mlp_problems(self, p: str, blk: nn.Module) -> list[str]:
        """The block's MLP must be timm's plain GELU Mlp."""
        from timm.layers import Mlp as TimmMlp

        if type(blk.mlp) is not TimmMlp or not isinstance(blk.mlp.norm, nn.Identity):
            return [f"{p}.mlp: {type(blk.mlp).__name__} (only timm's Mlp without norm)"]
        if not isinstance(blk.mlp.act, nn.GELU):
            return [f"{p}.mlp.act: {type(blk.mlp.act).__name__} (only GELU)"]
        return []

    def qk_prunable(self) -> bool:
        if self.is_nvit:
            return not self.model.config.qk_norm
        return all(isinstance(b.attn.q_norm, nn.Identity) for b in self.model.blocks)

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.model.patch_embed.proj.out_channels

    def head_dims(self, blk) -> tuple[list[int], list[int]]:
        a = blk.attn
        if self.is_nvit:
            return list(a.qk_dims), list(a.v_dims)
        return [a.head_dim] * a.num_heads, [a.head_dim] * a.num_heads

    def mlp_width(self, blk) -> int:
        return blk.mlp.fc1.out_features

    def dims(self) -> Dims:
        blocks = []
        for blk in self.model.blocks:
            qk, v = self.head_dims(blk)
            blocks.append(BlockDims([q // self.qk_width for q in qk], v, self.mlp_width(blk)))
        return Dims(self.embed_dim, blocks)

    def prefix_tokens(self) -> list[str]:
        return [n for n in PREFIX_TOKENS if getattr(self.model, n, None) is not None]

    def classifiers(self) -> list[str]:
        return [n for n in ("head", "head_dist") if isinstance(getattr(self.model, n, None), nn.Linear)]

    def stream_norms(self) -> list[str]:
        """The model-level LayerNorms over the embedding (pre-norm, final norms)."""
        return [n for n in ("norm_pre", "norm", "fc_norm") if not isinstance(getattr(self.model, n, nn.Identity()), nn.Identity)]

    def embed_norms(self) -> list[tuple[nn.Module, str]]:
        out = [(blk, n) for blk in self.model.blocks for n in ("norm1", "norm2")]
        return out + [(self.model, n) for n in self.stream_norms()]

    def scales(self) -> list[list[float]]:
        if self.is_nvit:
            return [list(b.attn.scales) for b in self.model.blocks]
        return [[float(b.attn.scale)] * b.attn.num_heads for b in self.model.blocks]

    def with_embed_widths(self, config: NViTConfig, widths: list[int]) -> NViTConfig:
        import dataclasses

        # (a config to cost: which source channels the width keeps is unknown, so no output mapping)
        return dataclasses.replace(config, embed_dim=widths[0], dense_embed_dim=0, embed_index=None)

    # ---- slices -----------------------------------------------------------------------------------
    def _param(self, name: str) -> bool:
        return name in self._names

    def slices(self, dims: Dims) -> list[Slice]:
        D = dims.embed
        E = torch.arange(D)
        out: list[Slice] = []

        def embed(name: str, axis: int, writes: bool):
            if self._param(name):
                out.append(Slice(name, axis, EMBED, -1, E, writes=writes))

        pre = "norm_pre" in self.stream_norms()
        for n in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            embed(n, 0, not pre)
        for n in ["pos_embed"] + self.prefix_tokens():
            embed(n, -1, not pre)
        if pre:  # the stream starts at norm_pre's output
            embed("norm_pre.weight", 0, True)
            embed("norm_pre.bias", 0, True)
        for b, bd in enumerate(dims.blocks):
            out += self.block_slices(b, bd, f"blocks.{b}.", E)
        finals = [n for n in self.stream_norms() if n != "norm_pre"]
        for n in finals:
            embed(n + ".weight", 0, True)
            embed(n + ".bias", 0, True)
        for n in self.classifiers():  # with no final norm, the classifier reads the stream itself
            embed(n + ".weight", -1, not finals)
        return out

    def attention_slices(self, b: int, bd: BlockDims, p: str) -> list[Slice]:
        """The qkv rows (q writes the QK units) and proj columns (head and V units write)."""
        part, head, dim = qkv_rows(bd, sections=not self.is_nvit, qk_width=self.qk_width)
        unit = dim // self.qk_width
        order = layout.packed_order(part, head, dim)  # → NViT's per-head order
        qkv = [
            dict(axis=0, kind=QK, index=torch.where(part == layout.Q, unit, -1), head=head, writes=True, order=order),
            dict(axis=0, kind=QK, index=torch.where(part == layout.K, unit, -1), head=head),
            dict(axis=0, kind=V, index=torch.where(part == layout.V, dim, -1), head=head),
            dict(axis=0, kind=HEAD, index=head),
        ]
        out = [Slice(p + "attn.qkv.weight", block=b, **kw) for kw in qkv]
        if self._param(p + "attn.qkv.bias"):
            out += [Slice(p + "attn.qkv.bias", block=b, **kw) for kw in qkv]
        col_head, col_dim = layout.head_major(bd.v_dims)  # proj reads the heads' values back to back
        out += [Slice(p + "attn.proj.weight", -1, HEAD, b, col_head, writes=True),
                Slice(p + "attn.proj.weight", -1, V, b, col_dim, col_head, writes=True)]
        return out

    def mlp_slices(self, b: int, bd: BlockDims, p: str) -> list[Slice]:
        """fc1 rows feed the channel, fc2 columns write it."""
        M = torch.arange(bd.mlp)
        out = [Slice(p + "mlp.fc1.weight", 0, MLP, b, M), Slice(p + "mlp.fc2.weight", -1, MLP, b, M, writes=True)]
        if self._param(p + "mlp.fc1.bias"):
            out.append(Slice(p + "mlp.fc1.bias", 0, MLP, b, M))
        return out

    def block_slices(self, b: int, bd: BlockDims, p: str, E: torch.Tensor, stage: int = -1) -> list[Slice]:
        """One pre-norm block's slices; `stage`: the embedding the block's stream is (-1: the one stream)."""
        out = self.attention_slices(b, bd, p) + self.mlp_slices(b, bd, p)
        branch0 = torch.zeros_like(E)  # every row writes the branch's one unit
        reads = [p + "norm1.weight", p + "norm1.bias", p + "norm2.weight", p + "norm2.bias"]
        for n in reads:
            if self._param(n):
                out.append(Slice(n, 0, EMBED, stage, E, writes=True))
        for n in (p + "attn.qkv.weight", p + "mlp.fc1.weight"):
            out.append(Slice(n, -1, EMBED, stage, E))
        for n, branch in ((p + "attn.proj.weight", ATTN_BRANCH), (p + "attn.proj.bias", ATTN_BRANCH),
                          (p + "mlp.fc2.weight", MLP_BRANCH), (p + "mlp.fc2.bias", MLP_BRANCH)):
            if self._param(n):
                out += [Slice(n, 0, EMBED, stage, E, writes=True), Slice(n, 0, branch, b, branch0, writes=True)]
        for n in self.layer_scales(p):
            if self._param(n):
                out.append(Slice(n, 0, EMBED, stage, E))
        return out

    def layer_scales(self, p: str) -> list[str]:
        return [p + "ls1.gamma", p + "ls2.gamma"]

    # ---- conversion -------------------------------------------------------------------------------
    def block_configs(self, masks: Masks) -> list[BlockConfig]:
        scales = self.scales()
        out = []
        for bi in range(len(masks.heads)):
            alive = masks.heads[bi].nonzero().flatten().tolist()
            qk = [self.qk_width * int(masks.qk[bi][h].sum()) for h in alive]
            v = [int(masks.v[bi][h].sum()) for h in alive]
            out.append(BlockConfig(qk, v, int(masks.mlp[bi].sum()), [scales[bi][h] for h in alive]))
        return out

    def config(self, masks: Masks, provenance: dict | None = None) -> NViTConfig:
        m = self.model
        blocks = self.block_configs(masks)
        if self.is_nvit:
            base = m.config.to_dict()
            dense, index = kept_channels(masks.embed, m.config.embed_index, m.config.dense_embed_dim)
            base.update(embed_dim=int(masks.embed.sum()), blocks=blocks, provenance=provenance or base["provenance"],
                        dense_embed_dim=dense, embed_index=index,
                        drop_path_rates=[drop_path_of(b.drop_path1) for b in m.blocks])
            return type(m.config)(**base)
        img = m.patch_embed.img_size
        return NViTConfig(
            img_size=img[0] if isinstance(img, (tuple, list)) else img,
            patch_size=m.patch_embed.proj.kernel_size[0], in_chans=m.patch_embed.proj.in_channels,
            num_classes=m.head.out_features if isinstance(m.head, nn.Linear) else 0,
            embed_dim=int(masks.embed.sum()), blocks=blocks, proj_bias=m.blocks[0].attn.proj.bias is not None,
            class_token=getattr(m, "cls_token", None) is not None,
            reg_tokens=0 if getattr(m, "reg_token", None) is None else m.reg_token.shape[1],
            no_embed_class=bool(getattr(m, "no_embed_class", False)), global_pool=m.global_pool,
            fc_norm=not isinstance(m.fc_norm, nn.Identity),
            pre_norm=not isinstance(getattr(m, "norm_pre", nn.Identity()), nn.Identity),
            final_norm=not isinstance(m.norm, nn.Identity) or not isinstance(m.fc_norm, nn.Identity),
            norm_eps=float(m.blocks[0].norm1.eps), provenance=provenance or {}, data=data_config(m),
            dense_embed_dim=int(masks.embed.numel()), embed_index=masks.embed.nonzero().flatten().tolist(),
            **drop_rates(m, list(m.blocks)), **self.options())

    def options(self) -> dict:
        """The converted model's options that this family reads its own way from the timm model."""
        m, blk0 = self.model, self.model.blocks[0]
        return dict(qkv_bias=blk0.attn.qkv.bias is not None, qk_norm=not self.qk_prunable(),
                    layer_scale=hasattr(blk0.ls1, "gamma"), dist_token=getattr(m, "dist_token", None) is not None)

    def build(self, config: NViTConfig) -> nn.Module:
        return NViT(config)

    def convert_state(self, sliced, masks, config):
        sd = dict(sliced)
        if "patch_embed.proj.bias" not in sd:  # NViT's patch embedding always has a bias
            w = sd["patch_embed.proj.weight"]
            sd["patch_embed.proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return sd


def kept_channels(keep: torch.Tensor, index: list[int] | None, dense: int) -> tuple[int, list[int]]:
    """(dense width, source channel of each kept channel) of a converted model's outputs: the kept
    channels of a source whose own channels sit at `index` in a `dense`-wide output (None: at their own
    positions, the source's width)."""
    kept = keep.nonzero().flatten().tolist()
    if index is None:
        return int(keep.numel()), kept
    return dense, [index[i] for i in kept]


def _rate(module: nn.Module, name: str) -> float:
    mod = getattr(module, name, None)
    return float(mod.p) if isinstance(mod, nn.Dropout) else 0.0


def drop_rates(model: nn.Module, blocks: list[nn.Module], head: nn.Module | None = None) -> dict:
    """A timm model's stochastic layers, as the converted config's fields: drop-path per block (its
    drop_path1's rate) and the dropouts -- after the position embedding, on the attention probabilities,
    after the projections, before the classifier (`head`'s head_drop / drop; default: the model's)."""
    attn = next((b.attn for b in blocks if hasattr(b, "attn")), None)
    out = dict(drop_path_rates=[drop_path_of(getattr(b, "drop_path1", nn.Identity())) for b in blocks],
               drop_rate=_rate(model if head is None else head, "head_drop" if head is None else "drop"),
               proj_drop_rate=_rate(attn, "proj_drop") if attn is not None else 0.0,
               attn_drop_rate=_rate(attn, "attn_drop") if attn is not None else 0.0)
    if head is None:
        out["pos_drop_rate"] = _rate(model, "pos_drop")
    return out


def data_config(model: nn.Module) -> dict:
    """The preprocessing a timm model's weights expect (its pretrained config), where it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k])
            for k in ("mean", "std", "crop_pct", "interpolation") if cfg.get(k) is not None}

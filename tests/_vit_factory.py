"""Tiny timm ViT/DeiT models for engine tests (built by timm; nothing downloaded)."""
from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

VARIANTS = {
    "plain": dict(),
    "distilled": dict(distilled=True),
    "layerscale_nobias": dict(init_values=0.5, qkv_bias=False),
    "reg_avg_fcnorm": dict(reg_tokens=2, no_embed_class=True, global_pool="avg", fc_norm=True),
    "dinov2_reg": dict(reg_tokens=4, init_values=0.5, no_embed_class=True),  # LayerScale + registers
    "clip_prenorm": dict(pre_norm=True),
    "no_final_norm": dict(final_norm=False),
}


def tiny_vit(variant: str = "plain", *, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, img_size=16,
             patch_size=4, num_classes=5, seed=0, dtype=torch.float32, std=0.2):
    kw = dict(VARIANTS[variant])
    cls = VisionTransformerDistilled if kw.pop("distilled", False) else VisionTransformer
    torch.manual_seed(seed)
    m = cls(img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=num_classes, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, **kw)
    with torch.no_grad():  # random, non-trivial weights everywhere (tokens and LayerScale included)
        for p in m.parameters():
            p.normal_(0, std).add_(1.0 if p.dim() == 1 and p.numel() == embed_dim else 0.0)
    return m.to(dtype).eval()


def random_masks(adapter, granularity: str, seed: int = 0, p: float = 0.35, branches: bool = False):
    """Random keep-masks that respect the guards (≥1 of everything); with `branches`, block 0 also
    loses its whole attention branch and the last block its whole MLP branch."""
    g = torch.Generator().manual_seed(seed)
    M = adapter.full_masks()
    for e in M.embeds:  # one embedding, or one per stage (Swin)
        e &= torch.rand(e.shape, generator=g) > p
        e[0] = True
    for b in range(len(M.heads)):
        H, dqk = M.qk[b].shape
        dv = M.v[b].shape[1]
        if granularity == "aligned":
            q = torch.rand(dqk, generator=g) > p
            v = torch.rand(dv, generator=g) > p
            q[int(torch.randint(dqk, (1,), generator=g))] = True
            v[int(torch.randint(dv, (1,), generator=g))] = True
            M.qk[b] &= q
            M.v[b] &= v
        else:
            M.qk[b] &= torch.rand(H, dqk, generator=g) > p
            M.v[b] &= torch.rand(H, dv, generator=g) > p
            M.qk[b][torch.arange(H), torch.randint(dqk, (H,), generator=g)] = True
            M.v[b][torch.arange(H), torch.randint(dv, (H,), generator=g)] = True
        if H > 1:
            h = int(torch.randint(H, (1,), generator=g))
            M.heads[b][h] = False
            M.qk[b][h] = False
            M.v[b][h] = False
        M.mlp[b] &= torch.rand(M.mlp[b].shape, generator=g) > p
        M.mlp[b][0] = True
    full = adapter.full_masks()  # uneven heads (an NViT model): nothing beyond a head's own dims
    for b in range(len(M.heads)):
        M.qk[b] &= full.qk[b]
        M.v[b] &= full.v[b]
        for t, f in ((M.qk[b], full.qk[b]), (M.v[b], full.v[b])):
            t[M.heads[b] & ~t.any(1), 0] = True  # an alive head keeps ≥1 of each
    if branches:
        M.attn_on[0] = False
        M.heads[0][:] = M.qk[0][:] = M.v[0][:] = False
        M.mlp_on[-1] = False
        M.mlp[-1][:] = False
    return M

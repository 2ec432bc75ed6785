"""End to end: a converted NViT-Swin model (Swin-B's config, pruned to about half its FLOPs) vs the dense
timm Swin-B it came from (eval, inference_mode), the speedup next to the FLOPs reduction.

Masks are deterministic and synthetic, with the trends of bench_nvit_model.py (the paper's Fig. 4):
every stage's embedding ~3/4 kept, QK pruned much harder than V, MLP about half, middle blocks of the
model keep more; a global factor is bisected so the pruned model has ~half the dense FLOPs. Variants:
uneven (every head its own QK/V dims) and aligned (a block's heads share dims, multiples of 8).
Batch 1 and 16 for both variants, batch 64 for the uneven one only (Swin-B at batch 64 is ~1 min a
forward on 2 cores: one timed round after the warm-up); figures in ``benchmark.extra_info`` as
bench_nvit_model's (flops_reduction, speedup, speedup_vs_flops, attention backend).
Run: pytest bench/bench_swin.py --benchmark-only  (~10 min on 2 cores).
Quick mode (quickmode.py): Swin-B's layout at half its width (embed 64, heads of 32 dims as Swin-B's: 2-4-8-16
heads) and 2 blocks per stage (plain and shifted windows), batch 1 and 2, one round.
"""
from __future__ import annotations

import math
import os

import pytest
import timm
import torch

from bench_nvit_model import _interleaved_min, _pick
from nvit.model_swin import count_flops
from nvit.structures import Adapter
from nvit_kernels import dispatch
from quickmode import QUICK, pick

TARGET_FLOPS = 0.5
SWIN_KW = pick({}, dict(embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)))


def synthetic_swin_masks(adapter: Adapter, variant: str, s: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = adapter.full_masks()
    M.embed = [_pick(e.numel(), 8 * round(0.75 * e.numel() / 8), g) for e in M.embeds]
    L = len(M.heads)
    for b in range(L):
        pos = 0.6 + 0.4 * math.sin(math.pi * (b + 0.5) / L)  # middle blocks keep more
        H, dq = M.qk[b].shape
        fq, fv = min(1.0, 0.4 * pos * s), min(1.0, 0.85 * pos * s)  # QK pruned much more than V
        if variant == "uneven":
            wq = torch.linspace(1.4, 0.6, H)[torch.randperm(H, generator=g)]
            wv = torch.linspace(1.3, 0.7, H)[torch.randperm(H, generator=g)]
            qk = [min(dq, max(1, round(fq * float(wq[h]) * dq))) for h in range(H)]
            v = [min(dq, max(1, round(fv * float(wv[h]) * dq))) for h in range(H)]
        else:
            qk = [min(dq, max(8, 8 * round(fq * dq / 8)))] * H
            v = [min(dq, max(8, 8 * round(fv * dq / 8)))] * H
        for h in range(H):
            M.qk[b][h] = _pick(dq, qk[h], g)
            M.v[b][h] = _pick(dq, v[h], g)
        n = M.mlp[b].numel()
        M.mlp[b] = _pick(n, min(n, max(1, round(0.6 * pos * s * n))), g)
    return M


def pruned(adapter: Adapter, variant: str):
    dense = count_flops(adapter.nvit_config(adapter.full_masks()))
    lo, hi = 0.1, 3.0
    for _ in range(20):
        mid = (lo + hi) / 2
        frac = count_flops(adapter.nvit_config(synthetic_swin_masks(adapter, variant, mid))) / dense
        lo, hi = (mid, hi) if frac < TARGET_FLOPS else (lo, mid)
    M = synthetic_swin_masks(adapter, variant, (lo + hi) / 2)
    return M, dense, count_flops(adapter.nvit_config(M))


_BUILT: dict = {}


def _models(variant: str):
    if variant not in _BUILT:
        torch.manual_seed(0)
        dense = timm.create_model("swin_base_patch4_window7_224", pretrained=False, **SWIN_KW).eval()
        adapter = Adapter(dense)
        M, f_dense, f_pruned = pruned(adapter, variant)
        nv = adapter.convert(M).eval()
        dense = timm.create_model("swin_base_patch4_window7_224", pretrained=False,  # unmasked, unwrapped
                                  **SWIN_KW).eval()
        _BUILT.clear()
        _BUILT[variant] = (dense, nv, f_dense, f_pruned)
    return _BUILT[variant]


# grouped by variant: one model pair is built per variant
CASES = [("uneven", b) for b in pick((1, 16, 64), (1, 2))] + [("aligned", b) for b in pick((1, 16), (1,))]


@pytest.mark.parametrize("variant, batch", CASES, ids=lambda c: str(c))
def test_nvit_swin_vs_dense_swin_b(benchmark, variant, batch):
    dense, nv, f_dense, f_pruned = _models(variant)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.isfinite(nv(x)).all()
        rounds = pick({1: 3, 16: 2}.get(batch, 1), 1)
        t_dense, t_nv = _interleaved_min([lambda: dense(x), lambda: nv(x)], rounds)
        red, speedup = f_dense / f_pruned, t_dense / t_nv
        c = nv.config
        benchmark.extra_info.update(
            model="swin_base_patch4_window7_224" + (" (quick: embed 64, depths 2-2-2-2)" if QUICK else ""),
            variant=variant, batch=batch, threads=torch.get_num_threads(),
            loadavg=round(os.getloadavg()[0], 2), attention_backend=dispatch.select("attention", x.device),
            embed_dims=c.embed_dims, gflops_dense=f_dense * batch / 1e9, gflops_pruned=f_pruned * batch / 1e9,
            flops_reduction=round(red, 3), ms_dense=t_dense * 1e3, ms_nvit=t_nv * 1e3, speedup=round(speedup, 3),
            speedup_vs_flops=round(speedup / red, 3))
        print(f"\nSwin-B {variant} B={batch}: {red:.2f}x fewer FLOPs, {speedup:.2f}x faster ({t_dense * 1e3:.0f} -> "
              f"{t_nv * 1e3:.0f} ms, attention backend {benchmark.extra_info['attention_backend']})")
        benchmark.pedantic(lambda: nv(x), rounds=1, iterations=1, warmup_rounds=0)

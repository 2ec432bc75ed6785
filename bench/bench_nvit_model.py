"""End to end: a converted NViT model vs the dense timm ViT it came from (eval, inference_mode).

Pruning uses deterministic synthetic masks that follow the paper's trends (NViT, CVPR 2023, Fig. 4):
embedding ~3/4 kept, QK pruned much harder than V, MLP about half, middle blocks keep more than the
first and last ones; a global factor is bisected so the pruned model has ~half the dense FLOPs.
Variants:
  uneven   every head its own QK/V dims (one head fewer in the first and last blocks)
  aligned  all heads of a block share QK/V dims, multiples of 8
  full     nothing pruned: the NViT model's own overhead against timm (same FLOPs)
Figures land in ``benchmark.extra_info``:
  flops_reduction        count_flops(dense) / count_flops(pruned)
  speedup                dense time / NViT time (interleaved repetitions, min over rounds)
  speedup_vs_flops       speedup / flops_reduction (target >= 0.85: the FLOPs saved turn into time)
  loadavg                the machine's 1-minute load when the case ran (shared CPUs skew timings)
CPU cases run with one thread and with all of torch's threads (threads=1 is the stable figure on a
shared machine). Run: pytest bench/bench_nvit_model.py --benchmark-only  (a few minutes on 2 cores).
Quick mode (quickmode.py): the same cases with every model cut to 2 blocks, batch 64 cut to 4, one forward
per round and one round.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from nvit.cost import count_flops
from nvit.structures import Adapter
from quickmode import pick

TARGET_FLOPS = 0.5  # pruned / dense
DEIT_KW = pick({}, {"depth": 2})  # quick: 2 blocks (the first and last keep their own mask rules)
BIG_BATCH = pick(64, 4)


def _deit_s():
    return timm.create_model("deit_small_patch16_224", pretrained=False, **DEIT_KW)


def _deit_b():
    return timm.create_model("deit_base_patch16_224", pretrained=False, **DEIT_KW)


def _small():  # the embedded task's shape (nvit/data/fashion_vit.json); quick: 2 of its 6 blocks
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=pick(6, 2),
                             num_heads=4)


MODELS = {"deit_s": (_deit_s, 224, 3), "deit_b": (_deit_b, 224, 3), "small": (_small, 28, 1)}


def _pick(n_total: int, n_keep: int, g: torch.Generator) -> torch.Tensor:
    keep = torch.zeros(n_total, dtype=torch.bool)
    keep[torch.randperm(n_total, generator=g)[:n_keep]] = True
    return keep


def synthetic_masks(adapter: Adapter, variant: str, s: float, seed: int = 0):
    """Masks at global keep factor `s` (deterministic for a given seed)."""
    M = adapter.full_masks()
    if variant == "full":
        return M
    g = torch.Generator().manual_seed(seed)
    D, L = M.embed.numel(), len(M.heads)
    M.embed = _pick(D, round(0.75 * D), g)
    for b in range(L):
        pos = 0.6 + 0.4 * math.sin(math.pi * (b + 0.5) / L)  # middle blocks keep more
        H, dq_max = M.qk[b].shape
        dv_max = M.v[b].shape[1]
        fq, fv = min(1.0, 0.4 * pos * s), min(1.0, 0.85 * pos * s)  # QK pruned much more than V
        if variant == "uneven":
            wq = torch.linspace(1.4, 0.6, H)[torch.randperm(H, generator=g)]
            wv = torch.linspace(1.3, 0.7, H)[torch.randperm(H, generator=g)]
            qk = [min(dq_max, max(1, round(fq * float(wq[h]) * dq_max))) for h in range(H)]
            v = [min(dv_max, max(1, round(fv * float(wv[h]) * dv_max))) for h in range(H)]
            dead = {int(torch.argmin(wq))} if b in (0, L - 1) and H > 2 else set()
        elif variant == "aligned":
            qk = [min(dq_max, max(8, 8 * round(fq * dq_max / 8)))] * H
            v = [min(dv_max, max(8, 8 * round(fv * dv_max / 8)))] * H
            dead = set()
        else:
            raise ValueError(variant)
        for h in range(H):
            alive = h not in dead
            M.heads[b][h] = alive
            M.qk[b][h] = _pick(dq_max, qk[h], g) & alive
            M.v[b][h] = _pick(dv_max, v[h], g) & alive
        n_mlp = M.mlp[b].numel()
        M.mlp[b] = _pick(n_mlp, min(n_mlp, max(1, round(0.6 * pos * s * n_mlp))), g)
    return M


def pruned_masks(adapter: Adapter, variant: str, target: float = TARGET_FLOPS):
    """Bisect the global factor so count_flops(pruned) / count_flops(dense) ~ target."""
    dense = count_flops(adapter.nvit_config(adapter.full_masks()))
    if variant == "full":
        return adapter.full_masks(), dense, dense
    lo, hi = 0.1, 3.0
    for _ in range(25):
        mid = (lo + hi) / 2
        frac = count_flops(adapter.nvit_config(synthetic_masks(adapter, variant, mid))) / dense
        lo, hi = (mid, hi) if frac < target else (lo, mid)
    M = synthetic_masks(adapter, variant, (lo + hi) / 2)
    return M, dense, count_flops(adapter.nvit_config(M))


def _interleaved_min(fns, rounds):
    best = [float("inf")] * len(fns)
    for f in fns:  # warm-up: caches, allocator, oneDNN primitives
        f()
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


# (model, variant, batch, threads). DeiT-S at batch 64 costs ~5-10 s a forward on 2 shared cores: all
# threads and the uneven variant only; DeiT-B at batch 1 only.
ALL = 0
CASES = ([("small", v, b, t) for v in ("uneven", "aligned", "full") for b in (1, BIG_BATCH) for t in (1, ALL)]
         + [("deit_s", v, 1, t) for v in ("uneven", "aligned", "full") for t in (1, ALL)]
         + [("deit_s", "uneven", BIG_BATCH, ALL)]
         + [("deit_b", "uneven", 1, t) for t in (1, ALL)])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]

_BUILT: dict = {}


def _models(name: str, variant: str, device: str):
    key = (name, variant, device)
    if key not in _BUILT:
        make, img, chans = MODELS[name]
        torch.manual_seed(0)
        dense = make().eval()
        adapter = Adapter(dense)
        M, f_dense, f_pruned = pruned_masks(adapter, variant)
        nv = adapter.convert(M).eval()
        cfg = nv.config
        _BUILT.clear()  # keep one pair alive: DeiT-B is large
        _BUILT[key] = (dense.to(device), nv.to(device), f_dense, f_pruned, img, chans, cfg)
    return _BUILT[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-B{c[2]}-t{c[3] or 'all'}")
def test_nvit_vs_dense(benchmark, device, case):
    name, variant, B, threads = case
    if device != "cpu" and threads != ALL:
        pytest.skip("thread count only matters on the CPU")
    dense, nv, f_dense, f_pruned, img, chans, cfg = _models(name, variant, device)
    x = torch.randn(B, chans, img, img, generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            # The converted model computes what the masked dense model would; a gross mismatch would
            # make the timing meaningless, so check shapes and finiteness only (tests check values).
            out = nv(x)
            assert out.shape == (B, cfg.num_classes) and torch.isfinite(out).all()
            ops = int(2e10 / max(1, f_dense * B))  # repetitions so each round lasts ~>= 0.1 s
            reps = pick(max(1, min(50, ops)), 1)

            def run(m):
                def f():
                    for _ in range(reps):
                        m(x)
                    sync()
                return f

            rounds = pick(7 if f_dense * B < 1e10 else (3 if f_dense * B < 5e10 else 2), 1)  # more rounds when cheap
            t_dense, t_nv = (t / reps for t in _interleaved_min([run(dense), run(nv)], rounds))
            flops_red = f_dense / f_pruned
            speedup = t_dense / t_nv
            benchmark.extra_info.update(
                model=name, variant=variant, batch=B, threads=torch.get_num_threads(), device=device,
                loadavg=round(os.getloadavg()[0], 2), embed=cfg.embed_dim,
                qk_dims=[b.qk_dims for b in cfg.blocks], v_dims=[b.v_dims for b in cfg.blocks],
                mlp=[b.mlp for b in cfg.blocks], gflops_dense=f_dense * B / 1e9, gflops_pruned=f_pruned * B / 1e9,
                flops_reduction=round(flops_red, 3), ms_dense=t_dense * 1e3, ms_nvit=t_nv * 1e3,
                speedup=round(speedup, 3), speedup_vs_flops=round(speedup / flops_red, 3))
            benchmark.pedantic(run(nv), rounds=1, iterations=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(prev)

"""Uneven per-head attention vs what stock PyTorch offers for uneven heads.

Compared, on NViT-like blocks and every available device:
  ours     nvit uneven_attention (the backend dispatch picks: C++ on CPU, Triton on CUDA)
  padded   pad every head to the block's max QK/V dims, one SDPA call, slice the heads back out
           (``padded_sdpa_only`` in extra_info: the SDPA call alone, as if a padded Linear made the layout)
  loop     one SDPA call per head
  buckets  one SDPA call per distinct (qk, v) pair of dims
The ratios are measured in one run with interleaved repetitions (min over rounds), so machine load
hits all variants alike; they land in ``benchmark.extra_info``:
  speedup_vs_padded        padded time / our time (>1: we are faster)
  time_vs_flop_prop        our time / (padded time * our FLOPs / padded FLOPs) (<=1: at least as
                           efficient per FLOP as the padded call)
and the same two against ``padded_sdpa_only``. CPU fp32 also runs single-threaded (``t1``): on a shared
machine, two OpenMP threads wait on each other whenever a neighbour takes a core, which swamps small
calls. Run: pytest bench/bench_attention.py --benchmark-only
Quick mode (quickmode.py): every config, dtype, thread count and Swin train/infer case, at batch <= 4 and
one round.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from nvit_kernels import dispatch
from nvit_kernels.attention import uneven_attention
from quickmode import pick

# Per-head dims. DeiT-B block (12 x 64) pruned to about half the attention FLOPs with uneven heads
# (QK pruned harder than V, as NViT finds); the small model: dim 128, 4 heads of 32, N = 50.
CONFIGS = {
    "deitb_half": ([64, 48, 40, 32, 32, 24, 24, 16, 16, 8, 8, 8],
                   [64, 64, 56, 48, 48, 40, 40, 32, 32, 24, 24, 16], 197),
    "deitb_dense": ([64] * 12, [64] * 12, 197),
    "small_pruned": ([32, 24, 16, 8], [32, 32, 24, 16], 50),
    "small_dense": ([32] * 4, [32] * 4, 50),
}
CASES = pick([("deitb_half", 1), ("deitb_half", 8), ("deitb_half", 64), ("deitb_dense", 8),
              ("small_pruned", 1), ("small_pruned", 64), ("small_dense", 64)],
             [("deitb_half", 1), ("deitb_half", 2), ("deitb_dense", 2), ("small_pruned", 1), ("small_pruned", 4),
              ("small_dense", 4)])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


def _split(qkv, qk, vd):
    o, parts = 0, []
    for a, c in zip(qk, vd):
        parts.append((qkv[..., o:o + a], qkv[..., o + a:o + 2 * a], qkv[..., o + 2 * a:o + 2 * a + c]))
        o += 2 * a + c
    return parts


def padded(qkv, qk, vd, scales):
    B, N, _ = qkv.shape
    H, mq, mv = len(qk), max(qk), max(vd)
    q = qkv.new_zeros(B, N, H, mq)
    k = qkv.new_zeros(B, N, H, mq)
    v = qkv.new_zeros(B, N, H, mv)
    for h, (qh, kh, vh) in enumerate(_split(qkv, qk, vd)):
        # SDPA takes one scale: fold each head's own scale into its q.
        q[:, :, h, :qk[h]] = qh * (scales[h] * math.sqrt(mq))
        k[:, :, h, :qk[h]] = kh
        v[:, :, h, :vd[h]] = vh
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2)
    return torch.cat([out[:, :, h, :c] for h, c in enumerate(vd)], -1)


def loop(qkv, qk, vd, scales):
    return torch.cat([F.scaled_dot_product_attention(q, k, v, scale=s)
                      for (q, k, v), s in zip(_split(qkv, qk, vd), scales)], -1)


def buckets(qkv, qk, vd, scales):
    groups: dict[tuple[int, int], list[int]] = {}
    for h, key in enumerate(zip(qk, vd)):
        groups.setdefault(key, []).append(h)
    parts = _split(qkv, qk, vd)
    outs = [None] * len(qk)
    for (a, c), heads in groups.items():
        q = torch.stack([parts[h][0] * scales[h] for h in heads], 1)
        k = torch.stack([parts[h][1] for h in heads], 1)
        v = torch.stack([parts[h][2] for h in heads], 1)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        for i, h in enumerate(heads):
            outs[h] = o[:, i]
    return torch.cat(outs, -1)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _interleaved_min(fns, device, rounds):
    best = [float("inf")] * len(fns)
    for f in fns:  # warm-up (Triton compiles, caches fill)
        f()
    _sync(device)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def _threads(n: int):
    """torch's CPU threads set to n for the block (0: left as they are)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 0], ids=["t1", "tall"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}")
def test_uneven_attention(benchmark, device, dtype, case, threads):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} not benchmarked on {device}")
    if threads and (device != "cpu" or dtype != torch.float32):
        pytest.skip("single-thread figures: CPU fp32 only (the issue's targets)")
    with _threads(threads):
        _bench_case(benchmark, device, dtype, case)


def _bench_case(benchmark, device, dtype, case):
    name, B = case
    qk, vd, N = CONFIGS[name]
    scales = [1 / math.sqrt(a) for a in qk]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, sum(2 * a + c for a, c in zip(qk, vd)), generator=g).to(device=device, dtype=dtype)
    H, mq, mv = len(qk), max(qk), max(vd)
    qp = torch.randn(B, H, N, mq, generator=g).to(device=device, dtype=dtype)
    kp = torch.randn(B, H, N, mq, generator=g).to(device=device, dtype=dtype)
    vp = torch.randn(B, H, N, mv, generator=g).to(device=device, dtype=dtype)
    backend = dispatch.select("attention", qkv.device)

    def ours():
        return uneven_attention(qkv, qk, vd, scales)

    work = B * H * N * N * max(mq, mv)
    rounds = pick(max(3, min(20, int(1e8 / work))), 1)  # enough for a stable min, short on 2 shared cores
    t = _interleaved_min([ours, lambda: padded(qkv, qk, vd, scales),
                          lambda: F.scaled_dot_product_attention(qp, kp, vp), lambda: loop(qkv, qk, vd, scales),
                          lambda: buckets(qkv, qk, vd, scales)], device, rounds)
    t_ours, t_pad, t_sdpa, t_loop, t_buck = t
    flop_frac = sum(a + c for a, c in zip(qk, vd)) / (H * (mq + mv))
    benchmark.extra_info.update(
        backend=backend, threads=torch.get_num_threads(), loadavg=round(os.getloadavg()[0], 2), B=B, N=N, heads=H, qk_dims=qk, v_dims=vd, flop_fraction_of_padded=round(flop_frac, 4),
        ms_ours=t_ours * 1e3, ms_padded=t_pad * 1e3, ms_padded_sdpa_only=t_sdpa * 1e3,
        ms_loop=t_loop * 1e3, ms_buckets=t_buck * 1e3,
        speedup_vs_padded=t_pad / t_ours, time_vs_flop_prop=t_ours / (t_pad * flop_frac),
        speedup_vs_padded_sdpa_only=t_sdpa / t_ours, time_vs_flop_prop_sdpa_only=t_ours / (t_sdpa * flop_frac),
        speedup_vs_loop=t_loop / t_ours, speedup_vs_buckets=t_buck / t_ours)
    benchmark.pedantic(lambda: (ours(), _sync(device)), rounds=3, iterations=1, warmup_rounds=1)


# ---- Swin window attention: bias [H, N, N] + shifted-window mask [nW, N, N] ------------------------------
# Swin-B stage 2 (embed 512, 16 heads x 32, 7x7 windows: N = 49; 14x14 tokens per image = 4 windows, the
# shifted blocks' mask has nW = 4), pruned to about half its attention FLOPs: 4 heads dropped, the other
# 12 shrunk unevenly (QK harder than V). sum(qk + v) = 508 of the dense 1024.
SWIN_DENSE = ([32] * 16, [32] * 16)
SWIN_HALF = ([32, 32, 28, 24, 24, 20, 16, 16, 12, 8, 8, 4], [32, 32, 32, 28, 28, 24, 24, 20, 20, 16, 16, 12])
SWIN_N, SWIN_NW = 49, 4


def _swin_tables(heads, g, dtype):
    """Relative position bias [H, N, N] and a shifted-window-like mask (0 / -100) [nW, N, N]."""
    bias = torch.randn(heads, SWIN_N, SWIN_N, generator=g) * 0.5
    region = torch.randint(0, 4, (SWIN_NW, SWIN_N), generator=g)
    region[0] = 0  # the first window of a shifted image has no cut
    mask = torch.zeros(SWIN_NW, SWIN_N, SWIN_N)
    mask[region[:, :, None] != region[:, None, :]] = -100.0
    return bias.to(dtype), mask.to(dtype)


def _timm_attn_mask(bias, mask, windows):
    """What timm's fused WindowAttention builds per call: bias + mask as SDPA's [B, H, N, N] attn_mask."""
    H, N, nw = bias.shape[0], bias.shape[1], mask.shape[0]
    m = mask.view(1, nw, 1, N, N).expand(windows // nw, nw, H, N, N).reshape(windows, H, N, N)
    return bias.unsqueeze(0) + m


def padded_window(qkv, qk, vd, scales, bias, mask):
    """Stock PyTorch for uneven heads: pad every head to the widest QK/V, one SDPA with bias+mask."""
    B, N, _ = qkv.shape
    H, mq, mv = len(qk), max(qk), max(vd)
    q = qkv.new_zeros(B, N, H, mq)
    k = qkv.new_zeros(B, N, H, mq)
    v = qkv.new_zeros(B, N, H, mv)
    for h, (qh, kh, vh) in enumerate(_split(qkv, qk, vd)):
        q[:, :, h, :qk[h]] = qh * (scales[h] * math.sqrt(mq))  # SDPA takes one scale: fold each head's into q
        k[:, :, h, :qk[h]] = kh
        v[:, :, h, :vd[h]] = vh
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=_timm_attn_mask(bias, mask, B).to(qkv.dtype))
    out = out.transpose(1, 2)
    return torch.cat([out[:, :, h, :c] for h, c in enumerate(vd)], -1)


def dense_window(q, k, v, bias, mask):
    """timm's fused path on the dense block: SDPA with bias + mask ([B, H, N, d] tensors)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_timm_attn_mask(bias, mask, q.shape[0]).to(q.dtype))


@pytest.mark.parametrize("threads", [1, 0], ids=["t1", "tall"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("images", pick([1, 64], [1, 2]), ids=lambda b: f"img{b}")
def test_swin_window_attention(benchmark, images, train, dtype, threads):
    if threads and dtype != torch.float32:
        pytest.skip("single-thread figures: fp32 only")
    with _threads(threads):
        _bench_swin(benchmark, images, train, dtype)


def _bench_swin(benchmark, images, train, dtype):
    qk, vd = SWIN_HALF
    H, mq, mv, B, N = len(qk), max(qk), max(vd), images * SWIN_NW, SWIN_N
    scales = [1 / math.sqrt(a) for a in qk]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, sum(2 * a + c for a, c in zip(qk, vd)), generator=g).to(dtype)
    bias, mask = _swin_tables(H, g, torch.float32)  # the learned table stays fp32 (autocast's case)
    dense_bias, _ = _swin_tables(16, g, torch.float32)
    # The padded SDPA alone: inputs already padded and the attn_mask already built (stock's lower bound).
    qp, kp = (torch.randn(B, H, N, mq, generator=g).to(dtype) for _ in range(2))
    vp = torch.randn(B, H, N, mv, generator=g).to(dtype)
    am = _timm_attn_mask(bias, mask, B).to(dtype)
    qd, kd, vd_ = (torch.randn(B, 16, N, 32, generator=g).to(dtype) for _ in range(3))
    backend = dispatch.select("attention", qkv.device)

    if train:
        leaves = [t.requires_grad_() for t in (qkv, bias, qp, kp, vp, am, qd, kd, vd_, dense_bias)]

        def step(f):
            def run():
                for t in leaves:
                    t.grad = None
                out = f()
                out.backward(torch.ones_like(out))
            return run
    else:
        def step(f):
            def run():
                with torch.inference_mode():
                    f()
            return run

    ours = step(lambda: uneven_attention(qkv, qk, vd, scales, bias=bias, mask=mask))
    fns = [ours,
           step(lambda: padded_window(qkv, qk, vd, scales, bias, mask)),
           step(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=am)),
           step(lambda: dense_window(qd, kd, vd_, dense_bias, mask))]
    rounds = pick(5 if (train and images > 1) else (10 if images > 1 or train else 30), 1)
    t_ours, t_pad, t_sdpa, t_dense = _interleaved_min(fns, "cpu", rounds)
    flop_frac = sum(a + c for a, c in zip(qk, vd)) / (H * (mq + mv))
    dense_frac = sum(a + c for a, c in zip(qk, vd)) / (16 * 64)
    benchmark.extra_info.update(
        backend=backend, threads=torch.get_num_threads(), loadavg=round(os.getloadavg()[0], 2), images=images,
        windows=B, N=N, nW=SWIN_NW, heads=H, qk_dims=qk, v_dims=vd, train=train,
        flop_fraction_of_padded=round(flop_frac, 4), flop_fraction_of_dense=round(dense_frac, 4),
        ms_ours=t_ours * 1e3, ms_padded=t_pad * 1e3, ms_padded_sdpa_only=t_sdpa * 1e3, ms_dense_swin=t_dense * 1e3,
        speedup_vs_padded=t_pad / t_ours, time_vs_flop_prop=t_ours / (t_pad * flop_frac),
        speedup_vs_padded_sdpa_only=t_sdpa / t_ours, time_vs_flop_prop_sdpa_only=t_ours / (t_sdpa * flop_frac),
        speedup_vs_dense_swin=t_dense / t_ours)
    print(f"\nswin window attention img={images} {'train' if train else 'infer'} {str(dtype)[6:]} "
          f"threads={torch.get_num_threads()}: ours {t_ours * 1e3:.3f} ms, padded {t_pad * 1e3:.3f} ms "
          f"(x{t_pad / t_ours:.2f}), padded SDPA only {t_sdpa * 1e3:.3f} ms (x{t_sdpa / t_ours:.2f}), "
          f"dense Swin block {t_dense * 1e3:.3f} ms (x{t_dense / t_ours:.2f})")
    benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=1)

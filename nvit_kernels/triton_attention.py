"""Triton kernels for uneven per-head attention: one launch covers every head of a block.

Per-head facts (start column in qkv and in the output, as nvit_kernels.layout places them; QK dim, V
dim, scale, head index) live in small device tables; program (query tile, batch*head) reads its head's
row. Head dims are padded only inside registers, to the next power of two of the widest head of the
launch (``tl.arange`` needs powers of two), with masked loads/stores for the tail. With
``bucketed=True`` heads are grouped by their (pow2 QK, pow2 V) pair and each group gets its own
launch, so a block mixing QK 8 and QK 64 heads does not pad the narrow ones to 64 (one launch per
distinct pair, usually 1 to 3).

Forward: flash-style online softmax over key tiles in fp32 (exp2 with log2(e) folded into the scale).
Backward (flash-attention-2 style, three launches for all heads): per-row logsumexp and
D = rowsum(dO * O); dK/dV per key tile looping over query tiles; dQ per query tile looping over key
tiles. Every element of grad_qkv is written exactly once.

Optional additive logits (Swin window attention): bias [H, N, N] and mask [nW, N, N] (batch b uses
mask[b % nW]), read as fp32 tiles beside the scores (constexpr switches: without them the kernels are
the plain ones). A query whose logits are all -inf gets a zero output (logsumexp +inf, so P = 0 in the
backward). grad_bias = Σ_b dlogits comes from the dK/dV kernel, which sees every (query, key) pair of
its (b, h) exactly once: it atomically adds dlogits into fp32 slots [G, H, N, N] (slot b % G, G <= 16:
windows of a batch spread over G copies so the adds do not all queue on one address), summed at the
end. Atomic adds make grad_bias's last bits depend on timing (nondeterministic, like index_add_).
The bias/mask tiles are software-pipelined into shared memory like K and V, which with Triton's default
3 stages takes 120-185 KiB for fp32 (compiled for sm_86/sm_90 without a device), past the 99 KiB of
sm_86/89 and, for the backward, the 163 KiB of sm_80. With bias/mask the kernels therefore run with
fewer stages (fp32: 1, <= 88 KiB; 16-bit: 2, <= 72 KiB); for Swin's windows (N = 49, one key tile) the
pipeline had nothing to overlap anyway.
fp32 inputs use IEEE fp32 dots (no TF32) so results match fp32 PyTorch matmul accuracy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreter
from .layout import head_offsets

LOG2E = 1.4426950408889634
_GBIAS_SLOTS = 16


@triton.jit
def _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, hb):
    return (tl.load(tab_in + hb), tl.load(tab_out + hb), tl.load(tab_qk + hb), tl.load(tab_v + hb),
            tl.load(tab_scale + hb), tl.load(tab_h + hb).to(tl.int64))


@triton.jit
def _additive(bias, mask, h, b, NW, N, q, k, valid, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """(bias[h, q, k] + mask[b % nW, q, k]) * log2(e) in fp32; q and k broadcast to the tile's shape."""
    if HAS_BIAS:
        x = tl.load(bias + h * N * N + q * N + k, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            x += tl.load(mask + (b % NW) * N * N + q * N + k, mask=valid, other=0.0).to(tl.float32)
    else:
        x = tl.load(mask + (b % NW) * N * N + q * N + k, mask=valid, other=0.0).to(tl.float32)
    return x * 1.4426950408889634


@triton.jit
def _online_logits(q, base, dq, offs_dq, offs_m, offs_n, mask_m, mask_n, W, N, m_i, qk_scale, bias, mask, h, b, NW,
                   IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """One key tile of the online softmax: (scaled base-2 logits with masked keys at -inf, the new running
    row max, the max to subtract -- with bias/mask 0 for a row all -inf so far: exp2(-inf - 0) = 0, not NaN)."""
    kt = tl.load(base + dq + offs_n[None, :] * W + offs_dq[:, None],
                 mask=mask_n[None, :] & (offs_dq[:, None] < dq), other=0.0)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    if HAS_BIAS or HAS_MASK:
        s = s * qk_scale + _additive(bias, mask, h, b, NW, N, offs_m[:, None], offs_n[None, :],
                                     mask_m[:, None] & mask_n[None, :], HAS_BIAS, HAS_MASK)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    return s, m_new, m_use


@triton.jit
def _fwd_kernel(qkv, out, tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, bias, mask, NW, HB, N, W, OW,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
                IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale, h = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, pid % HB)
    qk_scale = scale * 1.4426950408889634  # softmax via exp2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = qkv + b * N * W + in_off
    mask_m = offs_m < N
    q = tl.load(base + offs_m[:, None] * W + offs_dq[None, :], mask=mask_m[:, None] & (offs_dq[None, :] < dq),
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s, m_new, m_use = _online_logits(q, base, dq, offs_dq, offs_m, offs_n, mask_m, mask_n, W, N, m_i, qk_scale,
                                         bias, mask, h, b, NW, IEEE, HAS_BIAS, HAS_MASK)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(base + 2 * dq + offs_n[:, None] * W + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < dv), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if HAS_BIAS or HAS_MASK:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a fully masked query: acc = 0, output 0
    else:
        acc = acc / l_i[:, None]
    o_ptr = out + b * N * OW + out_off + offs_m[:, None] * OW + offs_dv[None, :]
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < dv))


@triton.jit
def _bwd_stats_kernel(qkv, out, gout, lse, delta, tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, bias, mask, NW,
                      HB, N, W, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr,
                      BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    # Row logsumexp (base 2, of the scaled logits) and D = rowsum(dO * O), both [B*HB, N] fp32.
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale, h = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, pid % HB)
    qk_scale = scale * 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    base = qkv + b * N * W + in_off
    q = tl.load(base + offs_m[:, None] * W + offs_dq[None, :], mask=mask_m[:, None] & (offs_dq[None, :] < dq),
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s, m_new, m_use = _online_logits(q, base, dq, offs_dq, offs_m, offs_n, mask_m, mask_n, W, N, m_i, qk_scale,
                                         bias, mask, h, b, NW, IEEE, HAS_BIAS, HAS_MASK)
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    o_off = b * N * OW + out_off + offs_m[:, None] * OW + offs_dv[None, :]
    mask_o = mask_m[:, None] & (offs_dv[None, :] < dv)
    o = tl.load(out + o_off, mask=mask_o, other=0.0).to(tl.float32)
    do = tl.load(gout + o_off, mask=mask_o, other=0.0).to(tl.float32)
    row = pid.to(tl.int64) * N + offs_m
    if HAS_BIAS or HAS_MASK:
        # A fully masked query: lse = +inf, so P = exp2(s - inf) = 0 in the other two kernels.
        lse_i = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    else:
        lse_i = m_i + tl.math.log2(l_i)
    tl.store(lse + row, lse_i, mask=mask_m)
    tl.store(delta + row, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _bwd_dkdv_kernel(qkv, gout, gqkv, lse, delta, tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, bias, mask, NW,
                     gbias, SLOTS, H, HB, N, W, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_MASK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale, h = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, pid % HB)
    qk_scale = scale * 1.4426950408889634
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    base = qkv + b * N * W + in_off
    mask_k = mask_n[:, None] & (offs_dq[None, :] < dq)
    mask_v = mask_n[:, None] & (offs_dv[None, :] < dv)
    k = tl.load(base + dq + offs_n[:, None] * W + offs_dq[None, :], mask=mask_k, other=0.0)
    v = tl.load(base + 2 * dq + offs_n[:, None] * W + offs_dv[None, :], mask=mask_v, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DQ], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    gbase = gout + b * N * OW + out_off
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        qt = tl.load(base + offs_m[None, :] * W + offs_dq[:, None], mask=mask_m[None, :] & (offs_dq[:, None] < dq),
                     other=0.0)                                                         # [DQ, M]
        do = tl.load(gbase + offs_m[:, None] * OW + offs_dv[None, :],
                     mask=mask_m[:, None] & (offs_dv[None, :] < dv), other=0.0)         # [M, DV]
        row = pid.to(tl.int64) * N + offs_m
        l = tl.load(lse + row, mask=mask_m, other=0.0)
        d = tl.load(delta + row, mask=mask_m, other=0.0)
        if IEEE:
            st = tl.dot(k, qt, input_precision="ieee")                                  # S^T [N, M]
        else:
            st = tl.dot(k, qt)
        if HAS_BIAS or HAS_MASK:
            valid = mask_n[:, None] & mask_m[None, :]
            st = st * qk_scale + _additive(bias, mask, h, b, NW, N, offs_m[None, :], offs_n[:, None], valid,
                                           HAS_BIAS, HAS_MASK)
            pt = tl.math.exp2(st - l[None, :])
        else:
            pt = tl.math.exp2(st * qk_scale - l[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        if IEEE:
            dvacc += tl.dot(pt, do, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")                       # dP^T [N, M]
        else:
            dvacc += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - d[None, :])                                                   # dlogits^T (unscaled)
        if HAS_BIAS:
            gb = gbias + ((b % SLOTS) * H + h) * N * N
            tl.atomic_add(gb + offs_m[None, :] * N + offs_n[:, None], dst, mask=valid)
        if IEEE:
            dk += tl.dot(dst, tl.trans(qt), input_precision="ieee")
        else:
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    gb = gqkv + b * N * W + in_off
    tl.store(gb + dq + offs_n[:, None] * W + offs_dq[None, :], (dk * scale).to(gqkv.dtype.element_ty), mask=mask_k)
    tl.store(gb + 2 * dq + offs_n[:, None] * W + offs_dv[None, :], dvacc.to(gqkv.dtype.element_ty), mask=mask_v)


@triton.jit
def _bwd_dq_kernel(qkv, gout, gqkv, lse, delta, tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, bias, mask, NW,
                   HB, N, W, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr,
                   BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale, h = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, tab_h, pid % HB)
    qk_scale = scale * 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    base = qkv + b * N * W + in_off
    mask_q = mask_m[:, None] & (offs_dq[None, :] < dq)
    q = tl.load(base + offs_m[:, None] * W + offs_dq[None, :], mask=mask_q, other=0.0)
    do = tl.load(gout + b * N * OW + out_off + offs_m[:, None] * OW + offs_dv[None, :],
                 mask=mask_m[:, None] & (offs_dv[None, :] < dv), other=0.0)
    row = pid.to(tl.int64) * N + offs_m
    l = tl.load(lse + row, mask=mask_m, other=0.0)
    d = tl.load(delta + row, mask=mask_m, other=0.0)
    dqacc = tl.zeros([BLOCK_M, BLOCK_DQ], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kt = tl.load(base + dq + offs_n[None, :] * W + offs_dq[:, None],
                     mask=mask_n[None, :] & (offs_dq[:, None] < dq), other=0.0)        # [DQ, N]
        vt = tl.load(base + 2 * dq + offs_n[None, :] * W + offs_dv[:, None],
                     mask=mask_n[None, :] & (offs_dv[:, None] < dv), other=0.0)        # [DV, N]
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
            dp = tl.dot(do, vt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
            dp = tl.dot(do, vt)
        if HAS_BIAS or HAS_MASK:
            s = s * qk_scale + _additive(bias, mask, h, b, NW, N, offs_m[:, None], offs_n[None, :],
                                         mask_m[:, None] & mask_n[None, :], HAS_BIAS, HAS_MASK)
            p = tl.math.exp2(s - l[:, None])
        else:
            p = tl.math.exp2(s * qk_scale - l[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        ds = p * (dp - d[:, None])
        if IEEE:
            dqacc += tl.dot(ds, tl.trans(kt), input_precision="ieee")
        else:
            dqacc += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    tl.store(gqkv + b * N * W + in_off + offs_m[:, None] * W + offs_dq[None, :],
             (dqacc * scale).to(gqkv.dtype.element_ty), mask=mask_q)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))  # tl.dot needs every dim >= 16


def _groups(qk_dims, v_dims, bucketed: bool) -> list[list[int]]:
    if not bucketed:
        return [list(range(len(qk_dims)))]
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (q, v) in enumerate(zip(qk_dims, v_dims)):
        groups.setdefault((_pow2(q), _pow2(v)), []).append(h)
    return list(groups.values())


_TABLES: dict = {}


def _tables(heads, qk_dims, v_dims, scales, device):
    # Cached per (heads, dims, scales, device): a model calls the same few blocks over and over, and a
    # host-to-device copy per call would cost more than the launch.
    key = (tuple(heads), tuple(qk_dims), tuple(v_dims), tuple(scales), str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    if len(_TABLES) > 256:
        _TABLES.clear()
    in_off, out_off = head_offsets(qk_dims, v_dims)
    ints = torch.tensor([[in_off[h] for h in heads], [out_off[h] for h in heads], [qk_dims[h] for h in heads],
                         [v_dims[h] for h in heads], list(heads)], dtype=torch.int32).to(device)
    sc = torch.tensor([scales[h] for h in heads], dtype=torch.float32).to(device)
    _TABLES[key] = hit = (ints[0], ints[1], ints[2], ints[3], sc, ints[4])  # the kernels' tab_* order
    return hit


def _blocks(bdq: int, bdv: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): small tiles under the interpreter, register-sized ones on a GPU."""
    if triton_interpreter():
        return 16, 16, 1
    widest = max(bdq, bdv)
    if backward:
        return (64, 64, 4) if widest <= 64 else (32, 32, 4)
    return (64, 64, 4) if widest <= 64 else (64, 32, 4)


def _launch_args(qkv, qk_dims, v_dims, scales, bucketed):
    for heads in _groups(qk_dims, v_dims, bucketed):
        bdq = _pow2(max(qk_dims[h] for h in heads))
        bdv = _pow2(max(v_dims[h] for h in heads))
        yield heads, _tables(heads, qk_dims, v_dims, scales, qkv.device), bdq, bdv


def _extras(qkv, bias, mask):
    """(bias, mask, nW, launch options) as the kernels take them: fp32 contiguous tables; an absent one is
    a placeholder pointer (qkv) its constexpr switch keeps from being read. With either, fewer pipeline
    stages keep shared memory within every supported GPU's limit (see the module docstring)."""
    b = qkv if bias is None else bias.to(torch.float32).contiguous()
    m = qkv if mask is None else mask.to(torch.float32).contiguous()
    opts = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None)
    if bias is not None or mask is not None:
        opts["num_stages"] = 1 if qkv.dtype == torch.float32 else 2
    return b, m, (1 if mask is None else mask.shape[0]), opts


def forward(qkv: torch.Tensor, qk_dims, v_dims, scales, bucketed: bool = False, bias=None, mask=None) -> torch.Tensor:
    B, N, W = qkv.shape
    OW = sum(v_dims)
    out = torch.empty((B, N, OW), dtype=qkv.dtype, device=qkv.device)
    ieee = qkv.dtype == torch.float32
    bias_t, mask_t, nw, opts = _extras(qkv, bias, mask)
    for heads, tabs, bdq, bdv in _launch_args(qkv, qk_dims, v_dims, scales, bucketed):
        bm, bn, nwarps = _blocks(bdq, bdv, False)
        grid = (triton.cdiv(N, bm), B * len(heads))
        _fwd_kernel[grid](qkv, out, *tabs, bias_t, mask_t, nw, len(heads), N, W, OW, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_DQ=bdq, BLOCK_DV=bdv, IEEE=ieee, num_warps=nwarps, **opts)
    return out


def backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, qk_dims, v_dims, scales,
             bucketed: bool = False, bias=None, mask=None):
    """(grad_qkv, grad_bias as fp32 [H, N, N], or None without bias)."""
    B, N, W = qkv.shape
    OW = sum(v_dims)
    H = len(qk_dims)
    grad_out = grad_out.to(qkv.dtype).contiguous()
    out = out.contiguous()
    gqkv = torch.empty_like(qkv)
    ieee = qkv.dtype == torch.float32
    bias_t, mask_t, nw, opts = _extras(qkv, bias, mask)
    slots = min(B, _GBIAS_SLOTS)
    gslots = (torch.zeros((slots, H, N, N), dtype=torch.float32, device=qkv.device) if bias is not None
              else qkv)  # placeholder when HAS_BIAS is off
    for heads, tabs, bdq, bdv in _launch_args(qkv, qk_dims, v_dims, scales, bucketed):
        bm, bn, nwarps = _blocks(bdq, bdv, True)
        hb = len(heads)
        lse = torch.empty((B * hb, N), dtype=torch.float32, device=qkv.device)
        delta = torch.empty_like(lse)
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQ=bdq, BLOCK_DV=bdv, IEEE=ieee, num_warps=nwarps, **opts)
        extra = (bias_t, mask_t, nw)
        _bwd_stats_kernel[(triton.cdiv(N, bm), B * hb)](qkv, out, grad_out, lse, delta, *tabs, *extra, hb, N, W, OW,
                                                        **common)
        _bwd_dkdv_kernel[(triton.cdiv(N, bn), B * hb)](qkv, grad_out, gqkv, lse, delta, *tabs, *extra, gslots, slots,
                                                       H, hb, N, W, OW, **common)
        _bwd_dq_kernel[(triton.cdiv(N, bm), B * hb)](qkv, grad_out, gqkv, lse, delta, *tabs, *extra, hb, N, W, OW,
                                                     **common)
    return gqkv, (gslots.sum(0) if bias is not None else None)

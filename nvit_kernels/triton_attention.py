"""Triton kernels for uneven per-head attention: one launch covers every head of a block.

Per-head facts (start column in qkv and in the output, QK dim, V dim, scale) live in small device
tables; program (query tile, batch*head) reads its head's row. Head dims are padded only inside
registers, to the next power of two of the widest head of the launch (``tl.arange`` needs powers of
two), with masked loads/stores for the tail. With ``bucketed=True`` heads are grouped by their
(pow2 QK, pow2 V) pair and each group gets its own launch, so a block mixing QK 8 and QK 64 heads
does not pad the narrow ones to 64 (one launch per distinct pair, usually 1 to 3).

Forward: flash-style online softmax over key tiles in fp32 (exp2 with log2(e) folded into the scale).
Backward (flash-attention-2 style, three launches for all heads): per-row logsumexp and
D = rowsum(dO * O); dK/dV per key tile looping over query tiles; dQ per query tile looping over key
tiles. Nothing is atomically accumulated, so every element of grad_qkv is written exactly once.
fp32 inputs use IEEE fp32 dots (no TF32) so results match fp32 PyTorch matmul accuracy.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .attention import _head_offsets
from .dispatch import triton_interpreter

LOG2E = 1.4426950408889634


@triton.jit
def _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, hb):
    return (tl.load(tab_in + hb), tl.load(tab_out + hb), tl.load(tab_qk + hb), tl.load(tab_v + hb),
            tl.load(tab_scale + hb))


@triton.jit
def _fwd_kernel(qkv, out, tab_in, tab_out, tab_qk, tab_v, tab_scale, HB, N, W, OW,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
                IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, pid % HB)
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
        kt = tl.load(base + dq + offs_n[None, :] * W + offs_dq[:, None],
                     mask=mask_n[None, :] & (offs_dq[:, None] < dq), other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(base + 2 * dq + offs_n[:, None] * W + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < dv), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptr = out + b * N * OW + out_off + offs_m[:, None] * OW + offs_dv[None, :]
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < dv))


@triton.jit
def _bwd_stats_kernel(qkv, out, gout, lse, delta, tab_in, tab_out, tab_qk, tab_v, tab_scale, HB, N, W, OW,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr,
                      BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    # Row logsumexp (base 2, of the scaled logits) and D = rowsum(dO * O), both [B*HB, N] fp32.
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, pid % HB)
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
        kt = tl.load(base + dq + offs_n[None, :] * W + offs_dq[:, None],
                     mask=mask_n[None, :] & (offs_dq[:, None] < dq), other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    o_off = b * N * OW + out_off + offs_m[:, None] * OW + offs_dv[None, :]
    mask_o = mask_m[:, None] & (offs_dv[None, :] < dv)
    o = tl.load(out + o_off, mask=mask_o, other=0.0).to(tl.float32)
    do = tl.load(gout + o_off, mask=mask_o, other=0.0).to(tl.float32)
    row = pid.to(tl.int64) * N + offs_m
    tl.store(lse + row, m_i + tl.math.log2(l_i), mask=mask_m)
    tl.store(delta + row, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _bwd_dkdv_kernel(qkv, gout, gqkv, lse, delta, tab_in, tab_out, tab_qk, tab_v, tab_scale, HB, N, W, OW,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr,
                     BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, pid % HB)
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
        pt = tl.math.exp2(st * qk_scale - l[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        if IEEE:
            dvacc += tl.dot(pt, do, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")                       # dP^T [N, M]
        else:
            dvacc += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - d[None, :])
        if IEEE:
            dk += tl.dot(dst, tl.trans(qt), input_precision="ieee")
        else:
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    gb = gqkv + b * N * W + in_off
    tl.store(gb + dq + offs_n[:, None] * W + offs_dq[None, :], (dk * scale).to(gqkv.dtype.element_ty), mask=mask_k)
    tl.store(gb + 2 * dq + offs_n[:, None] * W + offs_dv[None, :], dvacc.to(gqkv.dtype.element_ty), mask=mask_v)


@triton.jit
def _bwd_dq_kernel(qkv, gout, gqkv, lse, delta, tab_in, tab_out, tab_qk, tab_v, tab_scale, HB, N, W, OW,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr,
                   BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HB).to(tl.int64)
    in_off, out_off, dq, dv, scale = _head(tab_in, tab_out, tab_qk, tab_v, tab_scale, pid % HB)
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
    in_off, out_off = _head_offsets(qk_dims, v_dims)
    ints = torch.tensor([[in_off[h] for h in heads], [out_off[h] for h in heads], [qk_dims[h] for h in heads],
                         [v_dims[h] for h in heads]], dtype=torch.int32).to(device)
    sc = torch.tensor([scales[h] for h in heads], dtype=torch.float32).to(device)
    _TABLES[key] = hit = (ints[0], ints[1], ints[2], ints[3], sc)
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


def forward(qkv: torch.Tensor, qk_dims, v_dims, scales, bucketed: bool = False, bias=None, mask=None) -> torch.Tensor:
    if bias is not None or mask is not None:
        raise NotImplementedError("nvit: uneven_attention: the Triton kernels take no bias/mask yet")
    B, N, W = qkv.shape
    OW = sum(v_dims)
    out = torch.empty((B, N, OW), dtype=qkv.dtype, device=qkv.device)
    ieee = qkv.dtype == torch.float32
    for heads, tabs, bdq, bdv in _launch_args(qkv, qk_dims, v_dims, scales, bucketed):
        bm, bn, nw = _blocks(bdq, bdv, False)
        grid = (triton.cdiv(N, bm), B * len(heads))
        _fwd_kernel[grid](qkv, out, *tabs, len(heads), N, W, OW, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQ=bdq,
                          BLOCK_DV=bdv, IEEE=ieee, num_warps=nw)
    return out


def backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, qk_dims, v_dims, scales,
             bucketed: bool = False, bias=None, mask=None):
    """(grad_qkv, grad_bias or None)."""
    if bias is not None or mask is not None:
        raise NotImplementedError("nvit: uneven_attention: the Triton kernels take no bias/mask yet")
    B, N, W = qkv.shape
    OW = sum(v_dims)
    grad_out = grad_out.to(qkv.dtype).contiguous()
    out = out.contiguous()
    gqkv = torch.empty_like(qkv)
    ieee = qkv.dtype == torch.float32
    for heads, tabs, bdq, bdv in _launch_args(qkv, qk_dims, v_dims, scales, bucketed):
        bm, bn, nw = _blocks(bdq, bdv, True)
        hb = len(heads)
        lse = torch.empty((B * hb, N), dtype=torch.float32, device=qkv.device)
        delta = torch.empty_like(lse)
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQ=bdq, BLOCK_DV=bdv, IEEE=ieee, num_warps=nw)
        _bwd_stats_kernel[(triton.cdiv(N, bm), B * hb)](qkv, out, grad_out, lse, delta, *tabs, hb, N, W, OW, **common)
        _bwd_dkdv_kernel[(triton.cdiv(N, bn), B * hb)](qkv, grad_out, gqkv, lse, delta, *tabs, hb, N, W, OW, **common)
        _bwd_dq_kernel[(triton.cdiv(N, bm), B * hb)](qkv, grad_out, gqkv, lse, delta, *tabs, hb, N, W, OW, **common)
    return gqkv, None

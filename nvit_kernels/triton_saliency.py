"""Triton backend of the fused saliency pass (see nvit_kernels/saliency.py for the contract).

One launch of the tile kernel covers every tensor and dtype of the parameter list: program b finds
its tensor by binary search over the plan table's first-tile column, casts that row's int64 data
pointers to typed pointers and reduces a 32 x 256 tile (vectors: 1 x 4096) to row and column sums
in fp32. Fast mode atomically adds them into unit sums (then scores += sums²); deterministic mode
writes them to fixed partial slots, sums each line in tile order and gathers each unit's lines in
CSR order (the partial layout is the same as the CUDA kernel's; csrc/saliency.h, mirrored by
nvit_kernels.layout, whose column numbers the kernels read as constexprs).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests; no bf16 there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout

_NC = layout.NUM_COLS
# Plan-table columns the tile kernel reads (a Triton kernel sees module globals only as constexprs).
_W_PTR, _G_PTR, _DTYPE = tl.constexpr(layout.W_PTR), tl.constexpr(layout.G_PTR), tl.constexpr(layout.DTYPE)
_ROWS, _COLS, _MAP_OFF = tl.constexpr(layout.ROWS), tl.constexpr(layout.COLS), tl.constexpr(layout.MAP_OFF)
_N_ROW_MAPS, _N_COL_MAPS = tl.constexpr(layout.N_ROW_MAPS), tl.constexpr(layout.N_COL_MAPS)
_TILE0, _N_COL_TILES = tl.constexpr(layout.TILE0), tl.constexpr(layout.N_COL_TILES)
_ROW_PART_OFF, _COL_PART_OFF = tl.constexpr(layout.ROW_PART_OFF), tl.constexpr(layout.COL_PART_OFF)


@triton.jit
def _load_f32(addr, dt, offs, mask):
    # dt: 0 float32, 1 float16, 2 bfloat16 (csrc/common.h codes); always returns fp32.
    if dt == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    elif dt == 1:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
    return x


@triton.jit
def _emit(vals, line, mask, n_maps, map_base, n_lines, slot_base, index, part, usum, U, DET: tl.constexpr):
    """Sums `vals` of rows/columns `line` of a tile: to partial slots slot_base + line (DET) or, through
    the n_maps maps at map_base (n_lines ids each), atomically into unit sums."""
    if DET:
        tl.store(part + slot_base + line, vals, mask=mask)
    else:
        for k in range(0, n_maps):
            u = tl.load(index + map_base + k * n_lines + line, mask=mask, other=U)
            tl.atomic_add(usum + u, vals, mask=mask & (u < U))


@triton.jit
def _tiles_kernel(table, T, index, part, usum, U, NC: tl.constexpr, DET: tl.constexpr,
                  TR: tl.constexpr, TC: tl.constexpr, VT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lo = b * 0  # tensors, not constexprs: T == 1 would be specialised to a constant
    hi = lo + T
    while hi - lo > 1:  # last tensor whose first tile <= b (tensors without tiles are skipped)
        mid = (lo + hi) // 2
        ok = tl.load(table + mid * NC + _TILE0) <= b
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    m = table + lo * NC
    w_addr = tl.load(m + _W_PTR)
    g_addr = tl.load(m + _G_PTR)
    dt = tl.load(m + _DTYPE)
    R = tl.load(m + _ROWS)
    C = tl.load(m + _COLS)
    nrm = tl.load(m + _N_ROW_MAPS)
    ncm = tl.load(m + _N_COL_MAPS)
    map_off = tl.load(m + _MAP_OFF)
    lt = b - tl.load(m + _TILE0)
    nct = tl.load(m + _N_COL_TILES)
    rp_off = tl.load(m + _ROW_PART_OFF)
    cp_off = tl.load(m + _COL_PART_OFF)
    rt = lt // nct
    ct = lt % nct
    # Names differ between the branches: compiled Triton merges same-named values of an if/else,
    # and the two tiles have different shapes.
    if R == 1:  # one long row
        vc = ct * VT + tl.arange(0, VT)
        vcm = vc < C
        vp = _load_f32(w_addr, dt, vc, vcm) * _load_f32(g_addr, dt, vc, vcm)
        if nrm > 0:
            r1 = tl.arange(0, 1)
            s = tl.sum(vp, 0) + tl.zeros([1], dtype=tl.float32)
            _emit(s, r1, r1 < 1, nrm, map_off, 1, rp_off + ct, index, part, usum, U, DET)
        if ncm > 0:
            _emit(vp, vc, vcm, ncm, map_off + nrm, C, cp_off, index, part, usum, U, DET)
    else:
        r = rt * TR + tl.arange(0, TR)
        c = ct * TC + tl.arange(0, TC)
        rm = r < R
        cm = c < C
        offs = r[:, None] * C + c[None, :]
        mask = rm[:, None] & cm[None, :]
        p = _load_f32(w_addr, dt, offs, mask) * _load_f32(g_addr, dt, offs, mask)
        if nrm > 0:
            _emit(tl.sum(p, 1), r, rm, nrm, map_off, R, rp_off + ct * R, index, part, usum, U, DET)
        if ncm > 0:
            _emit(tl.sum(p, 0), c, cm, ncm, map_off + nrm * R, C, cp_off + rt * C, index, part, usum, U, DET)


@triton.jit
def _lines_kernel(tab, part, lines, L, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < L
    base = tl.load(tab + 3 * i, mask=mask, other=0).to(tl.int64)
    stride = tl.load(tab + 3 * i + 1, mask=mask, other=0).to(tl.int64)
    count = tl.load(tab + 3 * i + 2, mask=mask, other=0)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, tl.max(count, 0)):  # partials in tile order
        s += tl.load(part + base + k * stride, mask=mask & (k < count), other=0.0)
    tl.store(lines + i, s, mask=mask)


@triton.jit
def _units_kernel(ptr, idx, lines, scores, U, BLOCK: tl.constexpr):
    u = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = u < U
    beg = tl.load(ptr + u, mask=mask, other=0)
    deg = tl.load(ptr + u + 1, mask=mask, other=0) - beg
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, tl.max(deg, 0)):  # lines in CSR order
        live = mask & (k < deg)
        j = tl.load(idx + beg + k, mask=live, other=0)
        s += tl.load(lines + j, mask=live, other=0.0)
    sc = tl.load(scores + u, mask=mask, other=0.0)
    tl.store(scores + u, sc + s * s, mask=mask)


def accumulate(table: torch.Tensor, meta: torch.Tensor, index: torch.Tensor, scores: torch.Tensor,
               deterministic: bool) -> None:
    """`table`: the plan table with this call's data pointers and dtype codes (nvit_kernels.saliency fills
    it; the inputs are validated there); `meta`: the plan's own table. scores updated in place."""
    dev = scores.device
    g = meta[-1].tolist()
    U, tiles, nl = g[layout.G_UNITS], g[layout.G_TILES], g[layout.G_LINES]
    if dev.type != "cpu":
        table = table.to(dev, non_blocking=True)
    T = table.shape[0] - 1
    if deterministic:
        part = torch.empty(max(g[layout.G_PARTIALS], 1), dtype=torch.float32, device=dev)
        lines = torch.empty(max(nl, 1), dtype=torch.float32, device=dev)
        if tiles:
            _tiles_kernel[(tiles,)](table, T, index, part, part, U, NC=_NC, DET=True, TR=layout.TILE_ROWS,
                                    TC=layout.TILE_COLS, VT=layout.VEC_TILE, num_warps=8)
        if nl:
            tab = index[g[layout.G_LINE_TAB_OFF]:]
            _lines_kernel[(triton.cdiv(nl, 256),)](tab, part, lines, nl, BLOCK=256, num_warps=4)
        ptr = index[g[layout.G_CSR_PTR_OFF]:]
        idx = index[g[layout.G_CSR_IDX_OFF]:]
        _units_kernel[(triton.cdiv(U, 256),)](ptr, idx, lines, scores, U, BLOCK=256, num_warps=4)
    else:
        usum = torch.zeros(U, dtype=torch.float32, device=dev)
        if tiles:
            _tiles_kernel[(tiles,)](table, T, index, usum, usum, U, NC=_NC, DET=False, TR=layout.TILE_ROWS,
                                    TC=layout.TILE_COLS, VT=layout.VEC_TILE, num_warps=8)
        scores.addcmul_(usum, usum)

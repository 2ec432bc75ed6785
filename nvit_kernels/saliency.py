"""Fused Hessian-saliency accumulation: scores[u] += (Σ_{(r,c)∈u} w·g)² for every unit u.

After a backward, one pass reads every (weight, grad) pair once, reduces w·g into per-unit fp32 sums
(a unit may span several tensors: an embedding channel spans every block) and adds each squared sum
into a persistent fp32 `scores` buffer. Which elements feed which unit comes from the
:class:`TensorMap` of each parameter (row maps and column maps of its [rows, cols] view: segment maps
of unit ids; this package knows no model -- nvit.spec derives the maps from a model family); :class:`SaliencyPlan` packs those maps once into device-resident tables.

Public API::

    plan = SaliencyPlan.build(maps, num_units, device)
    saliency_accumulate(weights, grads, plan, scores, deterministic=False)   # in place
    saliency_reference(weights, grads, maps, num_units)                      # float64, for tests

The work runs in the custom op ``nvit::saliency_accumulate`` (opcheck-clean, traceable by
``torch.compile``), which picks a backend with :func:`nvit_kernels.dispatch.select`: the C++ kernel
for CPU tensors, Triton or CUDA for CUDA tensors, or the eager PyTorch version ("reference").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from . import _native, dispatch
# The plan table's layout (mirrors csrc/saliency.h); re-exported here, where the plan is built.
from .layout import (COL_LINE_OFF, COL_PART_OFF, COLS, DTYPE, G_CSR_IDX_OFF, G_CSR_PTR_OFF,  # noqa: F401
                     G_ENTRIES, G_LINE_TAB_OFF, G_LINES, G_PARTIALS, G_PTR, G_TENSORS, G_TILE_COLS, G_TILE_ROWS,
                     G_TILES, G_UNITS, G_VEC_TILE, G_VERSION, LAYOUT_VERSION, MAP_OFF, N_COL_MAPS, N_COL_TILES,
                     N_ROW_MAPS, N_ROW_TILES, NUM_COLS, NUMEL, ROW_LINE_OFF, ROW_PART_OFF, ROWS, TILE0, TILE_COLS,
                     TILE_ROWS, VEC_TILE, W_PTR)

_INT32_MAX = 2**31 - 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["SaliencyPlan", "TensorMap", "saliency_accumulate", "saliency_reference"]


@dataclass
class TensorMap:
    """How one parameter (viewed as a contiguous [rows, cols] matrix) feeds units.

    Each row map holds one unit id per row (-1: none), each column map one per column; an element
    (r, c) adds w·g to every unit its row and column maps name.
    """

    rows: int
    cols: int
    row_maps: list[torch.Tensor] = field(default_factory=list)
    col_maps: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        for m in self.row_maps:
            if m.numel() != self.rows:
                raise ValueError(f"nvit: row map has {m.numel()} entries for {self.rows} rows")
        for m in self.col_maps:
            if m.numel() != self.cols:
                raise ValueError(f"nvit: column map has {m.numel()} entries for {self.cols} columns")


@dataclass(frozen=True)
class _TensorSpec:
    """One tensor in canonical form for the eager backend: [rows, cols] view and its map slices."""

    rows: int
    cols: int
    row_maps: tuple[Tensor, ...]
    col_maps: tuple[Tensor, ...]


class SaliencyPlan:
    """The maps of a parameter list packed once: an int64 table on the CPU (per-tensor shape, map
    offsets, tiling; see csrc/saliency.h) and an int32 index on the plan's device (unit maps, line
    table, unit→line CSR). The data pointers are not part of the plan: they are filled in per call.

    Column vectors ([n, 1]) are stored as one row [1, n] with their row and column maps swapped, so
    every kernel sees long rows."""

    def __init__(self, meta: Tensor, index: Tensor, numels: list[int]):
        self.meta = meta
        self.index = index
        self._numels = numels
        self.num_tensors = int(meta.shape[0]) - 1
        self.num_units = int(meta[-1, G_UNITS])

    @property
    def device(self) -> torch.device:
        return self.index.device

    @classmethod
    def build(cls, maps: Sequence[TensorMap], num_units: int, device=None) -> "SaliencyPlan":
        U = int(num_units)
        if U < 1:
            raise ValueError(f"nvit: saliency plan needs num_units >= 1, got {num_units}")
        if U >= _INT32_MAX:
            raise ValueError(f"nvit: saliency plan: {U} units do not fit int32 unit ids")
        T = len(maps)
        meta = torch.zeros(T + 1, NUM_COLS, dtype=torch.int64)
        pieces: list[Tensor] = []
        map_len = tile = part = line = 0
        line_tab: list[Tensor] = []
        csr_units: list[Tensor] = []
        csr_lines: list[Tensor] = []
        numels = []
        for i, tm in enumerate(maps):
            if not isinstance(tm, TensorMap):
                raise TypeError(f"nvit: saliency plan: maps[{i}] is {type(tm).__name__}, expected TensorMap")
            R, C = int(tm.rows), int(tm.cols)
            if R < 1 or C < 1:
                raise ValueError(f"nvit: saliency plan: maps[{i}] has shape [{R}, {C}]; rows and cols must be >= 1")
            rmaps, cmaps = list(tm.row_maps), list(tm.col_maps)
            for kind, ms, n in (("row", rmaps, R), ("column", cmaps, C)):
                for k, m in enumerate(ms):
                    if m.dtype.is_floating_point or m.dtype.is_complex or m.dtype == torch.bool:
                        raise TypeError(f"nvit: saliency plan: maps[{i}] {kind} map {k} has dtype {m.dtype}; "
                                        "expected integer unit ids")
                    if m.numel() != n:
                        raise ValueError(f"nvit: saliency plan: maps[{i}] {kind} map {k} has {m.numel()} "
                                         f"entries for {n} {kind}s")
                    if m.numel() and (int(m.min()) < -1 or int(m.max()) >= U):
                        raise ValueError(f"nvit: saliency plan: maps[{i}] {kind} map {k} has unit ids outside "
                                         f"[-1, {U}) (range {int(m.min())}..{int(m.max())})")
            numels.append(R * C)
            if C == 1 and R > 1:  # column vector -> one row: rows become columns
                R, C, rmaps, cmaps = 1, R, cmaps, rmaps
            row = meta[i]
            row[ROWS], row[COLS], row[NUMEL] = R, C, R * C
            row[N_ROW_MAPS], row[N_COL_MAPS], row[MAP_OFF] = len(rmaps), len(cmaps), map_len
            row[TILE0] = tile
            for m in rmaps + cmaps:
                m = m.reshape(-1).to(torch.int64)
                pieces.append(torch.where(m < 0, torch.full_like(m, U), m))
                map_len += m.numel()
            if not rmaps and not cmaps:
                continue  # feeds no unit: no tiles, no lines, never read
            nrt, nct = (1, -(-C // VEC_TILE)) if R == 1 else (-(-R // TILE_ROWS), -(-C // TILE_COLS))
            row[N_ROW_TILES], row[N_COL_TILES] = nrt, nct
            tile += nrt * nct
            if rmaps:
                row[ROW_PART_OFF], row[ROW_LINE_OFF] = part, line
                r = torch.arange(R, dtype=torch.int64)
                line_tab.append(torch.stack([part + r, torch.full_like(r, R), torch.full_like(r, nct)], 1))
                for k in range(len(rmaps)):
                    csr_units.append(pieces[-len(rmaps) - len(cmaps) + k])
                    csr_lines.append(line + r)
                part += nct * R
                line += R
            if cmaps:
                row[COL_PART_OFF], row[COL_LINE_OFF] = part, line
                c = torch.arange(C, dtype=torch.int64)
                line_tab.append(torch.stack([part + c, torch.full_like(c, C), torch.full_like(c, nrt)], 1))
                for k in range(len(cmaps)):
                    csr_units.append(pieces[-len(cmaps) + k])
                    csr_lines.append(line + c)
                part += nrt * C
                line += C
        units = torch.cat(csr_units) if csr_units else torch.zeros(0, dtype=torch.int64)
        lines = torch.cat(csr_lines) if csr_lines else torch.zeros(0, dtype=torch.int64)
        keep = units < U
        units, lines = units[keep], lines[keep]
        order = torch.sort(units, stable=True).indices  # stable: lines of a unit stay in plan order
        csr_idx = lines[order]
        csr_ptr = torch.zeros(U + 1, dtype=torch.int64)
        csr_ptr[1:] = torch.cumsum(torch.bincount(units, minlength=U), 0)
        tab = torch.cat(line_tab).reshape(-1) if line_tab else torch.zeros(0, dtype=torch.int64)
        maps_flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        g = meta[T]
        g[G_UNITS], g[G_TENSORS], g[G_TILES], g[G_PARTIALS], g[G_LINES] = U, T, tile, part, line
        g[G_LINE_TAB_OFF] = maps_flat.numel()
        g[G_CSR_PTR_OFF] = g[G_LINE_TAB_OFF] + tab.numel()
        g[G_CSR_IDX_OFF] = g[G_CSR_PTR_OFF] + csr_ptr.numel()
        g[G_ENTRIES] = csr_idx.numel()
        g[G_VERSION], g[G_TILE_ROWS], g[G_TILE_COLS], g[G_VEC_TILE] = LAYOUT_VERSION, TILE_ROWS, TILE_COLS, VEC_TILE
        index = torch.cat([maps_flat, tab, csr_ptr, csr_idx])
        if index.numel() > _INT32_MAX or part > _INT32_MAX or tile > _INT32_MAX or \
                (index.numel() and int(index.max()) > _INT32_MAX):
            raise ValueError("nvit: saliency plan too large for int32 index tables")
        index = index.to(torch.int32)
        if device is not None:
            index = index.to(device)
        return cls(meta, index, numels)

    def to(self, device) -> "SaliencyPlan":
        """The same plan with its index on `device` (the table stays on the CPU: it is small and the
        host needs it; the GPU backends upload it with the pointers on every call)."""
        device = torch.device(device)
        if device == self.index.device:
            return self
        return SaliencyPlan(self.meta, self.index.to(device), self._numels)

    def __repr__(self) -> str:
        return f"SaliencyPlan(num_tensors={self.num_tensors}, num_units={self.num_units}, device={self.device})"


# ----------------------------------------------------------------------------------------- checks

def _check_inputs(weights, grads, numels: Sequence[int], num_units: int, scores: Tensor, index: Tensor) -> None:
    """Raise a clear error for anything the kernels cannot take."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"nvit: saliency: scores must be a Tensor, got {type(scores).__name__}")
    if scores.dtype != torch.float32:
        raise TypeError(f"nvit: saliency: scores must be float32, got {scores.dtype}")
    if scores.dim() != 1 or scores.numel() != num_units:
        raise ValueError(f"nvit: saliency: scores must have shape [{num_units}] (the plan's units), "
                         f"got {list(scores.shape)}")
    if not scores.is_contiguous():
        raise ValueError("nvit: saliency: scores must be contiguous")
    if index.device != scores.device:
        raise ValueError(f"nvit: saliency: the plan is on {index.device} but scores are on {scores.device}; "
                         "use plan.to(device)")
    if len(weights) != len(numels) or len(grads) != len(numels):
        raise ValueError(f"nvit: saliency: the plan has {len(numels)} tensors but got {len(weights)} weights "
                         f"and {len(grads)} grads")
    for i, (w, g, n) in enumerate(zip(weights, grads, numels)):
        for name, t in (("weight", w), ("grad", g)):
            if not isinstance(t, Tensor):
                raise TypeError(f"nvit: saliency: {name} {i} is {type(t).__name__}, expected a Tensor "
                                "(a parameter without .grad?)")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"nvit: saliency: {name} {i} has dtype {t.dtype}; expected float32, float16 "
                                "or bfloat16")
            if t.device != scores.device:
                raise ValueError(f"nvit: saliency: {name} {i} is on {t.device} but scores are on {scores.device}")
            if not t.is_contiguous():
                raise ValueError(f"nvit: saliency: {name} {i} (shape {list(t.shape)}) is not contiguous")
            if t.numel() != n:
                raise ValueError(f"nvit: saliency: {name} {i} has {t.numel()} elements (shape {list(t.shape)}) "
                                 f"but its map is rows*cols = {n}")
        if w.shape != g.shape:
            raise ValueError(f"nvit: saliency: weight {i} has shape {list(w.shape)} but its grad {list(g.shape)}")
        if w.dtype != g.dtype:
            raise TypeError(f"nvit: saliency: weight {i} is {w.dtype} but its grad is {g.dtype}; "
                            "a pair must share its dtype")


def _plan_facts(meta: Tensor) -> tuple[list[int], int]:
    if meta.dtype != torch.int64 or meta.dim() != 2 or meta.shape[1] != NUM_COLS or meta.device.type != "cpu":
        raise ValueError(f"nvit: saliency: meta must be the plan's CPU int64 [T+1, {NUM_COLS}] table")
    if int(meta[-1, G_VERSION]) != LAYOUT_VERSION:
        raise ValueError("nvit: saliency: meta is not a saliency plan table of this version")
    return meta[:-1, NUMEL].tolist(), int(meta[-1, G_UNITS])


# ------------------------------------------------------------------------------------ the backends

def _fill_table(meta: Tensor, weights, grads) -> Tensor:
    """The plan table with this call's data pointers and dtype codes."""
    table = meta.clone()
    T = len(weights)
    if T:
        table[:T, W_PTR] = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64)
        table[:T, G_PTR] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        table[:T, DTYPE] = torch.tensor([_native.dtype_code(w) for w in weights], dtype=torch.int64)
    return table


def _run_cpp(weights, grads, meta, index, scores, deterministic: bool) -> None:
    # The CPU kernel sums in a fixed order: deterministic either way.
    table = _fill_table(meta, weights, grads)
    _native._C.saliency_accumulate_cpu(table.data_ptr(), len(weights), index.data_ptr(), scores.data_ptr())


def _gpu_scratch(meta: Tensor, device, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(partials, line sums, unit sums); only the ones the mode uses are real buffers."""
    g = meta[-1].tolist()
    if deterministic:
        part = torch.empty(max(g[G_PARTIALS], 1), dtype=torch.float32, device=device)
        lines = torch.empty(max(g[G_LINES], 1), dtype=torch.float32, device=device)
        return part, lines, lines
    usum = torch.empty(g[G_UNITS], dtype=torch.float32, device=device)  # zeroed by the kernel's memset
    return usum, usum, usum


def _run_cuda(weights, grads, meta, index, scores, deterministic: bool) -> None:
    dev = scores.device
    table = _fill_table(meta, weights, grads).to(dev, non_blocking=True)
    part, lines, usum = _gpu_scratch(meta, dev, deterministic)
    g = meta[-1].tolist()
    _native._C.saliency_accumulate_cuda(
        table.data_ptr(), len(weights), index.data_ptr(), scores.data_ptr(), g[G_UNITS], g[G_TILES], g[G_LINES],
        g[G_LINE_TAB_OFF], g[G_CSR_PTR_OFF], g[G_CSR_IDX_OFF], part.data_ptr(), lines.data_ptr(),
        usum.data_ptr(), deterministic, dev.index if dev.index is not None else torch.cuda.current_device(),
        _native.stream_handle(dev))


def _specs(meta: Tensor, index: Tensor) -> list[_TensorSpec]:
    """Canonical shapes and map slices (views of the plan index) for the eager backend."""
    out = []
    for row in meta[:-1].tolist():
        R, C, nr, nc, off = row[ROWS], row[COLS], row[N_ROW_MAPS], row[N_COL_MAPS], row[MAP_OFF]
        rm = tuple(index[off + k * R: off + (k + 1) * R] for k in range(nr))
        off += nr * R
        cm = tuple(index[off + k * C: off + (k + 1) * C] for k in range(nc))
        out.append(_TensorSpec(R, C, rm, cm))
    return out


def eager_accumulate(weights: Sequence[Tensor], grads: Sequence[Tensor], specs: Sequence[_TensorSpec],
                     num_units: int, scores: Tensor) -> None:
    """Plain PyTorch: per tensor one product, its row/column sums, index_add into unit sums (slot
    `num_units` collects "no unit"), then scores += sums². The eager baseline of the benchmarks."""
    acc = torch.zeros(num_units + 1, dtype=torch.float32, device=scores.device)
    for w, g, s in zip(weights, grads, specs):
        if not s.row_maps and not s.col_maps:
            continue
        p = (w.float() * g.float()).view(s.rows, s.cols)
        if s.row_maps:
            rs = p.sum(1)
            for m in s.row_maps:
                acc.index_add_(0, m, rs)
        if s.col_maps:
            cs = p.sum(0)
            for m in s.col_maps:
                acc.index_add_(0, m, cs)
    scores.add_(acc[:num_units].square())


def _eager_deterministic(weights, grads, specs, meta: Tensor, index: Tensor, scores: Tensor) -> None:
    """Like eager_accumulate but gathers each unit's line sums in CSR order (index_add_ on CUDA uses
    atomics, so its order is not fixed)."""
    g = meta[-1].tolist()
    U = g[G_UNITS]
    lines = []
    for w, gr, s in zip(weights, grads, specs):
        if not s.row_maps and not s.col_maps:
            continue
        p = (w.float() * gr.float()).view(s.rows, s.cols)
        if s.row_maps:
            lines.append(p.sum(1))
        if s.col_maps:
            lines.append(p.sum(0))
    if not lines:
        return
    ls = torch.cat(lines)
    ptr = index[g[G_CSR_PTR_OFF]: g[G_CSR_PTR_OFF] + U + 1].long()
    idx = index[g[G_CSR_IDX_OFF]: g[G_CSR_IDX_OFF] + g[G_ENTRIES]].long()
    sums = torch.segment_reduce(ls[idx], "sum", offsets=ptr, unsafe=True)
    scores.add_(sums.square())


def _run_reference(weights, grads, meta, index, scores, deterministic: bool) -> None:
    specs = _specs(meta, index)
    if deterministic and scores.device.type != "cpu":
        _eager_deterministic(weights, grads, specs, meta, index, scores)
    else:  # index_add_ on the CPU is sequential: already deterministic
        eager_accumulate(weights, grads, specs, int(meta[-1, G_UNITS]), scores)


def _run_triton(weights, grads, meta, index, scores, deterministic: bool) -> None:
    from . import triton_saliency  # imports triton: loaded when the Triton backend first runs

    triton_saliency.accumulate(_fill_table(meta, weights, grads), meta, index, scores, deterministic)


# One implementation per backend, each (weights, grads, meta, index, scores, deterministic) -> None.
_RUN = dispatch.Backends("saliency", cpp=_run_cpp, cuda=_run_cuda, triton=_run_triton, reference=_run_reference)


# --------------------------------------------------------------------------------------- the op

# Explicit schema: torch < 2.5 cannot infer it from postponed (string) annotations.
@torch.library.custom_op("nvit::saliency_accumulate", mutates_args=("scores",),
                         schema="(Tensor[] weights, Tensor[] grads, Tensor meta, Tensor index, Tensor(a!) scores, "
                                "bool deterministic) -> ()")
def _saliency_op(weights: list[Tensor], grads: list[Tensor], meta: Tensor, index: Tensor, scores: Tensor,
                 deterministic: bool) -> None:
    numels, U = _plan_facts(meta)
    _check_inputs(weights, grads, numels, U, scores, index)
    _RUN.select(scores.device)(weights, grads, meta, index, scores, deterministic)


@_saliency_op.register_fake
def _(weights, grads, meta, index, scores, deterministic) -> None:
    # Shapes only: fake tensors carry no data, so the plan's numbers come from the wrapper's check.
    if len(weights) != len(grads) or len(weights) != meta.shape[0] - 1:
        raise ValueError(f"nvit: saliency: the plan has {meta.shape[0] - 1} tensors but got {len(weights)} "
                         f"weights and {len(grads)} grads")
    return None


def saliency_accumulate(weights: Sequence[Tensor], grads: Sequence[Tensor], plan: SaliencyPlan, scores: Tensor,
                        *, deterministic: bool = False) -> None:
    """scores[u] += (Σ_{elements of unit u} w·g)² for every unit of `plan`, in place.

    weights[i], grads[i]: the i-th parameter of the plan and its gradient; contiguous, float32,
    float16 or bfloat16 (a pair shares its dtype), numel == rows·cols of its map, on scores' device.
    scores: float32 [plan.num_units]. Products and sums accumulate in fp32 (fp64 for the final
    per-unit gathers on the CPU). deterministic=True: bit-identical results across runs (fixed
    reduction order; the CPU kernel always is); False lets GPU backends use atomics.
    """
    if not isinstance(plan, SaliencyPlan):
        raise TypeError(f"nvit: saliency: plan must be a SaliencyPlan, got {type(plan).__name__}")
    weights, grads = list(weights), list(grads)
    _check_inputs(weights, grads, plan._numels, plan.num_units, scores, plan.index)
    _saliency_op(weights, grads, plan.meta, plan.index, scores, bool(deterministic))


def saliency_reference(weights: Sequence[Tensor], grads: Sequence[Tensor], maps: Sequence[TensorMap],
                       num_units: int) -> Tensor:
    """float64 [num_units]: (Σ w·g)² per unit, straight from the maps (the ground truth of the tests)."""
    if len(weights) != len(maps) or len(grads) != len(maps):
        raise ValueError(f"nvit: saliency_reference: {len(maps)} maps but {len(weights)} weights, {len(grads)} grads")
    dev = weights[0].device if len(weights) else torch.device("cpu")
    acc = torch.zeros(num_units + 1, dtype=torch.float64, device=dev)

    def ids(m: Tensor) -> Tensor:
        m = m.reshape(-1).to(device=dev, dtype=torch.int64)
        return torch.where(m < 0, torch.full_like(m, num_units), m)

    for w, g, tm in zip(weights, grads, maps):
        p = (w.detach().double() * g.detach().double()).reshape(tm.rows, tm.cols)
        for m in tm.row_maps:
            acc.index_add_(0, ids(m), p.sum(1))
        for m in tm.col_maps:
            acc.index_add_(0, ids(m), p.sum(0))
    return acc[:num_units].square()

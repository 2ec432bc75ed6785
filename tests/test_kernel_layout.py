"""The kernel package's structure: one layout module (per-head qkv, the saliency plan table that mirrors
csrc/saliency.h), one backend table per op, no import cycle, and the private torch probes the eager fast
path of ``uneven_attention`` relies on."""
from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

from nvit_kernels import attention as A
from nvit_kernels import dispatch, layout
from nvit_kernels import saliency as S

ROOT = Path(__file__).resolve().parent.parent
KERNELS = Path(layout.__file__).resolve().parent

QK, VD = [2, 3, 1], [4, 1, 2]  # uneven on purpose


# ------------------------------------------------------------------------------------- per-head qkv

def test_head_spans_tile_the_packed_qkv_in_head_order():
    spans = layout.head_spans(QK, VD)
    cols, out = [], []
    for h, sp in enumerate(spans):
        assert (sp.q.stop - sp.q.start, sp.k.stop - sp.k.start, sp.v.stop - sp.v.start) == (QK[h], QK[h], VD[h])
        assert sp.q.stop == sp.k.start and sp.k.stop == sp.v.start and sp.start == sp.q.start
        assert [sp.part(p) for p in (layout.Q, layout.K, layout.V)] == [sp.q, sp.k, sp.v]
        cols += list(range(sp.q.start, sp.v.stop))
        out += list(range(sp.out.start, sp.out.stop))
        assert sp.out.stop - sp.out.start == VD[h]
    assert cols == list(range(layout.qkv_width(QK, VD))) == list(range(sum(2 * q + v for q, v in zip(QK, VD))))
    assert out == list(range(sum(VD)))
    assert layout.head_offsets(QK, VD) == ([sp.start for sp in spans], [sp.out.start for sp in spans])


def test_packed_rows_pack_and_order_agree_with_the_spans():
    part, head, dim = layout.packed_rows(QK, VD)
    spans = layout.head_spans(QK, VD)
    for h, sp in enumerate(spans):
        for p in (layout.Q, layout.K, layout.V):
            rows = torch.arange(sp.part(p).start, sp.part(p).stop)
            assert (part[rows] == p).all() and (head[rows] == h).all()
            assert dim[rows].tolist() == list(range(len(rows)))
    # pack(): head-major q, k, v -> per head [q_h | k_h | v_h]
    q, k, v = torch.arange(sum(QK)), 100 + torch.arange(sum(QK)), 200 + torch.arange(sum(VD))
    packed = layout.pack(q, k, v, QK, VD)
    qh, kh, vh = q.split(QK), k.split(QK), v.split(VD)
    for h, sp in enumerate(spans):
        assert packed[sp.q].equal(qh[h]) and packed[sp.k].equal(kh[h]) and packed[sp.v].equal(vh[h])
    # packed_order(): rows labelled in timm's sections layout (all q | all k | all v) sort into the packed one
    sec = [(p, h, d) for p, dims in ((layout.Q, QK), (layout.K, QK), (layout.V, VD))
           for h in range(len(QK)) for d in range(dims[h])]
    sp_, sh, sd = (torch.tensor(c) for c in zip(*sec))
    perm = torch.argsort(layout.packed_order(sp_, sh, sd), stable=True)
    assert sp_[perm].equal(part) and sh[perm].equal(head) and sd[perm].equal(dim)


def test_head_major_labels_the_output_columns():
    head, dim = layout.head_major(VD)
    for h, sp in enumerate(layout.head_spans(QK, VD)):
        assert (head[sp.out] == h).all() and dim[sp.out].tolist() == list(range(VD[h]))


def test_the_op_reads_the_layout():
    """Each head's output is softmax(s q_h k_hᵀ) v_h of the columns its span names, at its out span."""
    torch.manual_seed(0)
    scales = [0.5, 0.25, 1.0]
    qkv = torch.randn(2, 5, layout.qkv_width(QK, VD), dtype=torch.float64)
    out = A.uneven_attention_reference(qkv, QK, VD, scales)
    for sp, s in zip(layout.head_spans(QK, VD), scales):
        q, k, v = qkv[..., sp.q], qkv[..., sp.k], qkv[..., sp.v]
        torch.testing.assert_close(out[..., sp.out], torch.softmax(s * q @ k.transpose(-1, -2), -1) @ v)


# ---------------------------------------------------------------------------------- saliency plan

def _enum(header: str, name: str) -> list[str]:
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{([^}]*)\}", header).group(1)
    names = [e.split("=")[0].strip() for e in body.split(",") if e.strip()]
    assert re.search(names[0] + r"\s*=\s*0\b", body), "the enum must start at 0"
    return names


def _snake(cpp_name: str) -> str:
    special = {"kDType": "DTYPE", "kSalCols": "NUM_COLS", "kTile0": "TILE0"}
    if cpp_name in special:
        return special[cpp_name]
    prefix = "G_" if cpp_name.startswith("g") else ""
    return prefix + re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:]).upper()


def test_plan_layout_mirrors_csrc_saliency_h():
    header_path = ROOT / "csrc" / "saliency.h"
    if not header_path.is_file():
        pytest.skip("no csrc/ beside the package (an installed copy)")
    header = header_path.read_text()
    for enum in ("Col", "Global"):
        for i, cpp_name in enumerate(_enum(header, enum)):
            assert getattr(layout, _snake(cpp_name)) == i, (enum, cpp_name)
    consts = dict(re.findall(r"\b(k\w+)\s*=\s*(\d+)", header.split("enum Global")[1]))
    assert int(consts["kVersion"]) == layout.LAYOUT_VERSION
    assert (int(consts["kTileRows"]), int(consts["kTileCols"]), int(consts["kVecTile"])) == (
        layout.TILE_ROWS, layout.TILE_COLS, layout.VEC_TILE)
    # the plan module's names are the layout's (tests and benchmarks read them there)
    for name in ("NUM_COLS", "TILE0", "G_UNITS", "G_VERSION", "LAYOUT_VERSION", "TILE_ROWS", "TILE_COLS", "VEC_TILE"):
        assert getattr(S, name) == getattr(layout, name)


# ------------------------------------------------------------------------------------- import graph

def _modules(pkg_dir: Path) -> dict[str, tuple[Path | None, bool]]:
    out = {}
    for p in pkg_dir.rglob("*.py"):
        parts = list(p.relative_to(pkg_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    for p in pkg_dir.rglob("_C.*"):  # the compiled extension: a leaf
        out[".".join(p.relative_to(pkg_dir.parent).parent.parts + ("_C",))] = (None, False)
    return out


def import_graph(*pkg_dirs: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions (lazy imports count)."""
    mods = {}
    for d in pkg_dirs:
        mods.update(_modules(d))
    graph = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        if path is None:
            continue
        pkg = m if is_pkg else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b` of an attribute b: the module a
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def simple_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, nodes = [], sorted(graph)
    for i, s in enumerate(nodes):  # the cycles whose smallest module is s
        allowed, stack = set(nodes[i:]), [(s, [s])]
        while stack:
            v, path = stack.pop()
            for w in graph[v]:
                if w == s:
                    cycles.append(path)
                elif w in allowed and w not in path:
                    stack.append((w, path + [w]))
    return cycles


def test_no_import_cycle_in_the_kernel_package():
    graph = import_graph(KERNELS)
    assert simple_cycles(graph) == []
    assert graph["nvit_kernels.layout"] == set(), "layout must stay importable from anywhere"
    assert not any(t.startswith("nvit_kernels.attention") for t in graph["nvit_kernels.triton_attention"])
    assert "nvit_kernels.saliency" not in graph["nvit_kernels.triton_saliency"]


def test_the_kernel_package_imports_nothing_from_nvit():
    for path in KERNELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "nvit" or n.startswith("nvit.") for n in names), path


# ---------------------------------------------------------------------------------- backend tables

def test_every_op_has_one_implementation_per_backend():
    for table in (A._FORWARD, A._BACKWARD, S._RUN):
        assert set(table.impls) == set(dispatch.BACKENDS), table
        assert all(callable(f) for f in table.impls.values())
    with pytest.raises(ValueError, match="missing"):
        dispatch.Backends("x", reference=lambda: None)
    with pytest.raises(ValueError, match="unknown"):
        dispatch.Backends("x", **{b: (lambda: None) for b in dispatch.BACKENDS}, tpu=lambda: None)


def test_a_table_runs_the_backend_dispatch_selects():
    cpu = torch.device("cpu")
    with dispatch.use_backend("reference"):
        assert A._FORWARD.select(cpu) is A._reference_forward
        assert S._RUN.select(cpu) is S._run_reference
    assert A._FORWARD.select(cpu) is A._FORWARD.impls[dispatch.resolve("attention", cpu)]


def test_no_module_reads_dispatch_privates():
    """The ops and info go through dispatch's public functions (warn_fallback, cuda_backend, ...)."""
    for path in KERNELS.glob("*.py"):
        if path.name == "dispatch.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dispatch":
                assert not node.attr.startswith("_"), f"{path.name} reads dispatch.{node.attr}"


def test_warn_fallback_is_public_and_warns_once():
    op = "test_kernel_layout op"
    with pytest.warns(RuntimeWarning, match=r"test_kernel_layout op: cuda backend unavailable \(why\); running "
                                              r"the reference backend"):
        dispatch.warn_fallback(op, "cuda", "why", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.warn_fallback(op, "cuda", "why", "reference")  # already said
    assert not hasattr(dispatch, "_warn_once")


# ------------------------------------------------------------------------------ private torch probes

def test_the_private_torch_probes_exist_and_mean_what_the_fast_path_assumes():
    """The eager fast path of uneven_attention (~30 µs a call) reads four private torch functions; when a
    torch release removes or changes one, this fails (the op still works: every call then goes through
    torch.ops, only slower)."""
    probes = A._private_probes()
    assert probes is not None, "torch removed one of the probes the eager fast path reads"
    dispatch_depth, function_mode, functorch_wrapped, profiling = probes
    x = torch.randn(2, 3)
    assert (dispatch_depth(), function_mode(), functorch_wrapped(x), profiling()) == (0, False, False, False)

    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert dispatch_depth() > 0

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert function_mode()
    seen = []
    torch.func.vmap(lambda t: (seen.append(functorch_wrapped(t)), t)[1])(x)
    assert seen == [True]
    with torch.autograd.profiler.profile():
        assert profiling()
    assert not profiling()


def test_plain_eager_calls_take_the_fast_path_and_watched_ones_do_not():
    qkv = torch.randn(1, 4, layout.qkv_width(QK, VD))
    with torch.no_grad():
        assert A._plain_eager(qkv)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False):
        assert not A._plain_eager(qkv)
    assert not A._plain_eager(qkv.requires_grad_())

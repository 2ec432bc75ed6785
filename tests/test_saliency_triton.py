"""Triton saliency kernels under the Triton interpreter (CPU tensors, tiny shapes, fp32/fp16).

TRITON_INTERPRET must be set before triton is imported, so without it this module only launches
itself in a subprocess with the variable set; the cases below run there (and skip here).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _saliency_common import assert_scores_close, make_tensors, mini_vit_maps, odd_maps, reference  # noqa: E402

from nvit_kernels import dispatch  # noqa: E402
from nvit_kernels.dispatch import use_backend  # noqa: E402
from nvit_kernels.saliency import SaliencyPlan, saliency_accumulate  # noqa: E402
from nvit_kernels.saliency import TensorMap  # noqa: E402

INTERP = dispatch.triton_interpreter()
in_interp = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess "
                               "(test_triton_interpreter_cases)")


@pytest.mark.skipif(INTERP, reason="already inside the interpreter run")
@pytest.mark.skipif(not dispatch.triton_status()[0], reason=dispatch.triton_status()[1])
def test_triton_interpreter_cases():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                        "-W", "ignore::DeprecationWarning"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-3000:]


def run(ws, gs, plan, scores, deterministic):
    with use_backend("triton"):
        saliency_accumulate(ws, gs, plan, scores, deterministic=deterministic)
    return scores


def small_odd_maps(seed):
    """odd_maps without its large tensors, and fewer of the many small ones (the interpreter is slow)."""
    maps, shapes, U = odd_maps(seed, big=False)
    return maps[:20], shapes[:20], U


@in_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_odd_shapes(dtype, deterministic):
    maps, shapes, U = small_odd_maps(20)
    ws, gs = make_tensors(maps, dtype, seed=20, shapes=shapes)
    plan = SaliencyPlan.build(maps, U)
    start = torch.rand(U, generator=torch.Generator().manual_seed(2)) * 1e-3
    scores = run(ws, gs, plan, start.clone(), deterministic)
    assert_scores_close(scores, start.double() + reference(ws, gs, maps, U), ws, gs, maps, U)


@in_interp
def test_column_tiles_and_vector_tiles():
    """Several column tiles (cols > 256), row tiles (rows > 32) and vector tiles (> 4096)."""
    g = torch.Generator().manual_seed(3)
    maps = [TensorMap(70, 300, [torch.randint(-1, 9, (70,), generator=g)], [torch.randint(-1, 9, (300,), generator=g)]),
            TensorMap(9000, 1, [torch.randint(-1, 9, (9000,), generator=g)], [torch.tensor([4])])]
    ws, gs = make_tensors(maps, seed=21)
    plan = SaliencyPlan.build(maps, 9)
    for det in (False, True):
        scores = run(ws, gs, plan, torch.zeros(9), det)
        assert_scores_close(scores, reference(ws, gs, maps, 9), ws, gs, maps, 9)


@in_interp
def test_mini_vit_embedding_spans_12_blocks():
    maps, U = mini_vit_maps("per-head")
    ws, gs = make_tensors(maps, torch.float16, seed=22)
    plan = SaliencyPlan.build(maps, U)
    scores = run(ws, gs, plan, torch.zeros(U), False)
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


@in_interp
def test_mixed_dtypes_one_launch():
    maps, U = mini_vit_maps("aligned", blocks=2)
    ws, gs = make_tensors(maps, seed=23)
    ws = [w.half() if i % 2 else w for i, w in enumerate(ws)]
    gs = [x.half() if i % 2 else x for i, x in enumerate(gs)]
    plan = SaliencyPlan.build(maps, U)
    scores = run(ws, gs, plan, torch.zeros(U), True)
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


@in_interp
def test_deterministic_bit_identical_and_accumulates():
    maps, shapes, U = small_odd_maps(24)
    plan = SaliencyPlan.build(maps, U)
    ws, gs = make_tensors(maps, seed=24, shapes=shapes)
    a = run(ws, gs, plan, torch.zeros(U), True)
    b = run(ws, gs, plan, torch.zeros(U), True)
    assert torch.equal(a, b)
    ws2, gs2 = make_tensors(maps, seed=25, shapes=shapes)
    run(ws2, gs2, plan, a, True)
    want = reference(ws, gs, maps, U) + reference(ws2, gs2, maps, U)
    assert_scores_close(a, want, ws + ws2, gs + gs2, maps * 2, U)


@in_interp
def test_single_tensor_plan():
    """One tensor (T == 1: Triton would specialise the count to a constant)."""
    maps = [TensorMap(3, 5, [torch.tensor([0, -1, 1])], [torch.tensor([2, 2, -1, 0, 1])])]
    ws, gs = make_tensors(maps, seed=26)
    plan = SaliencyPlan.build(maps, 3)
    for det in (False, True):
        scores = run(ws, gs, plan, torch.zeros(3), det)
        assert_scores_close(scores, reference(ws, gs, maps, 3), ws, gs, maps, 3)


@pytest.mark.skipif(INTERP, reason="compiles for a GPU target; the interpreter run checks the numbers")
@pytest.mark.skipif(not dispatch.triton_status()[0], reason=dispatch.triton_status()[1])
@pytest.mark.slow
def test_tile_kernel_compiles_for_gpu():
    """Lower the tile kernel to a cubin for sm_80 without a GPU: the interpreter accepts code that
    compiled Triton rejects (e.g. differently shaped values under one name in an if/else)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from nvit_kernels import saliency as S
    from nvit_kernels import triton_saliency as TS

    sig = {"table": "*i64", "T": "constexpr", "index": "*i32", "part": "*fp32", "usum": "*fp32", "U": "i32",
           "NC": "constexpr", "DET": "constexpr", "TR": "constexpr", "TC": "constexpr", "VT": "constexpr"}
    for det in (False, True):
        consts = {"T": 1, "NC": S.NUM_COLS, "DET": det, "TR": S.TILE_ROWS, "TC": S.TILE_COLS, "VT": S.VEC_TILE}
        k = triton_compile(ASTSource(fn=TS._tiles_kernel, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 80, 32), options={"num_warps": 8})
        assert k.asm["cubin"]

"""Fused saliency pass: every backend that runs here against the float64 reference, plus API checks.

Triton cases run in the interpreter in test_saliency_triton.py; CUDA cases are skipped without a GPU.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _saliency_common import (abs_sums, assert_scores_close, deit_case, make_tensors, mini_vit_maps,  # noqa: E402
                              odd_maps, reference)

from nvit_kernels import _native, dispatch  # noqa: E402
from nvit_kernels.dispatch import use_backend  # noqa: E402
from nvit_kernels.saliency import (SaliencyPlan, _saliency_op, saliency_accumulate,  # noqa: E402
                                   saliency_reference)
from nvit_kernels.saliency import TensorMap  # noqa: E402

CPU_BACKENDS = ["cpp", "reference"]
HAS_CUDA = torch.cuda.is_available()
needs_cpp = pytest.mark.skipif(not _native.available(), reason=f"extension not built: {_native.LOAD_ERROR}")


def _backend_param(b):
    return pytest.param(b, marks=needs_cpp) if b == "cpp" else b


BACKENDS = [_backend_param(b) for b in CPU_BACKENDS]


def run(backend, ws, gs, plan, scores, deterministic=False):
    with use_backend(backend):
        saliency_accumulate(ws, gs, plan, scores, deterministic=deterministic)
    return scores


# ------------------------------------------------------------------------------------ correctness

@pytest.fixture(scope="module")
def deit_tiny():
    maps, U = deit_case("tiny")
    ws, gs = make_tensors(maps, seed=1)
    return maps, U, ws, gs, SaliencyPlan.build(maps, U), reference(ws, gs, maps, U), abs_sums(ws, gs, maps, U)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_deit_tiny_all_blocks(backend, deterministic, deit_tiny):
    """All DeiT-T parameters: embedding units sum over 12 blocks and every embedding-carrying tensor."""
    maps, U, ws, gs, plan, ref, scale = deit_tiny
    scores = run(backend, ws, gs, plan, torch.zeros(U), deterministic)
    assert_scores_close(scores, ref, ws, gs, maps, U, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deit_tiny_per_head_subset(backend):
    """Per-head granularity (a unit per head and dim) on the first blocks of DeiT-T."""
    maps, U = deit_case("tiny", "per-head")
    maps = maps[:26]  # patch embed, pos/cls and two blocks
    ws, gs = make_tensors(maps, seed=2)
    plan = SaliencyPlan.build(maps, U)
    scores = run(backend, ws, gs, plan, torch.zeros(U))
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_odd_shapes(backend, dtype):
    maps, shapes, U = odd_maps(seed=3)
    ws, gs = make_tensors(maps, dtype, seed=4, shapes=shapes)
    plan = SaliencyPlan.build(maps, U)
    scores = run(backend, ws, gs, plan, torch.zeros(U))
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["aligned", "per-head"])
def test_mini_vit_mixed_dtypes(backend, granularity):
    """A 12-block mini ViT whose parameters alternate fp32/fp16/bf16 (a pair shares its dtype)."""
    maps, U = mini_vit_maps(granularity)
    ws, gs = make_tensors(maps, seed=5)
    dts = [torch.float32, torch.float16, torch.bfloat16]
    ws = [w.to(dts[i % 3]) for i, w in enumerate(ws)]
    gs = [g.to(dts[i % 3]) for i, g in enumerate(gs)]
    plan = SaliencyPlan.build(maps, U)
    scores = run(backend, ws, gs, plan, torch.zeros(U))
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


def test_element_feeds_several_units():
    """Hand-checked: one 2x3 tensor with a row map and two column maps, and a unit spanning tensors."""
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    g = torch.tensor([[1.0, 1.0, 2.0], [0.5, -1.0, 1.0]])  # w·g = [[1, 2, 6], [2, -5, 6]]
    maps = [TensorMap(2, 3, [torch.tensor([0, 1])], [torch.tensor([2, -1, 2]), torch.tensor([3, 3, 3])]),
            TensorMap(3, 1, [torch.tensor([0, -1, 4])])]
    w2, g2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 7.0, -1.0])  # w·g = [2, 14, -3]
    # unit 0: row 0 (9) + w2[0] (2) = 11; unit 1: row 1 (3); unit 2: cols 0, 2 (1+2+6+6 = 15);
    # unit 3: all of the first tensor (12); unit 4: w2[2] (-3)
    want = torch.tensor([121.0, 9.0, 225.0, 144.0, 9.0])
    torch.testing.assert_close(saliency_reference([w, w2], [g, g2], maps, 5), want.double())
    plan = SaliencyPlan.build(maps, 5)
    for backend in [b for b in CPU_BACKENDS if b != "cpp" or _native.available()]:
        torch.testing.assert_close(run(backend, [w, w2], [g, g2], plan, torch.zeros(5)), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulates_over_calls(backend):
    maps, shapes, U = odd_maps(seed=6, big=False)
    plan = SaliencyPlan.build(maps, U)
    start = torch.rand(U, generator=torch.Generator().manual_seed(0))
    scores, want = start.clone(), start.double()
    all_w, all_g = [], []
    for step in range(3):
        ws, gs = make_tensors(maps, seed=10 + step, shapes=shapes)
        run(backend, ws, gs, plan, scores)
        want += reference(ws, gs, maps, U)
        all_w += ws
        all_g += gs
    assert_scores_close(scores, want, all_w, all_g, maps * 3, U)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bit_identical(backend):
    maps, shapes, U = odd_maps(seed=7)
    ws, gs = make_tensors(maps, seed=8, shapes=shapes)
    plan = SaliencyPlan.build(maps, U)
    start = torch.rand(U, generator=torch.Generator().manual_seed(1))
    a = run(backend, ws, gs, plan, start.clone(), deterministic=True)
    b = run(backend, ws, gs, plan, start.clone(), deterministic=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, start)


def test_backends_agree_and_skip_unmapped():
    """A tensor that feeds no unit is never read (even a NaN there changes nothing)."""
    maps, shapes, U = odd_maps(seed=9, big=False)
    ws, gs = make_tensors(maps, seed=9, shapes=shapes)
    i = next(k for k, m in enumerate(maps) if not m.row_maps and not m.col_maps)
    ws[i].fill_(float("nan"))
    plan = SaliencyPlan.build(maps, U)
    for backend in [b for b in CPU_BACKENDS if b != "cpp" or _native.available()]:
        s = run(backend, ws, gs, plan, torch.zeros(U))
        assert torch.isfinite(s).all(), backend


# ---------------------------------------------------------------------------------- the extension

@needs_cpp
def test_cpu_dispatch_uses_the_extension(monkeypatch):
    """On CPU tensors the dispatcher picks the C++ kernel, without a fallback warning, and the
    extension function really runs."""
    assert _native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("saliency", torch.device("cpu")) == "cpp"
    calls = []
    real = _native._C.saliency_accumulate_cpu

    def spy(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(_native._C, "saliency_accumulate_cpu", spy)
    maps, shapes, U = odd_maps(seed=11, big=False)
    ws, gs = make_tensors(maps, seed=11, shapes=shapes)
    plan = SaliencyPlan.build(maps, U)
    scores = torch.zeros(U)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saliency_accumulate(ws, gs, plan, scores)
    assert len(calls) == 1
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


# -------------------------------------------------------------------------------------- bad input

def _small():
    maps = [TensorMap(4, 6, [torch.tensor([0, 1, -1, 2])], [torch.arange(6) % 3]), TensorMap(5, 1, [torch.arange(5) % 3])]
    ws = [torch.randn(4, 6), torch.randn(5)]
    gs = [torch.randn(4, 6), torch.randn(5)]
    return maps, ws, gs, SaliencyPlan.build(maps, 3)


@pytest.mark.parametrize("case,err,match", [
    ("noncontig_w", ValueError, "weight 0 .*not contiguous"),
    ("noncontig_g", ValueError, "grad 0 .*not contiguous"),
    ("numel", ValueError, "weight 1 has 4 elements"),
    ("shape_mismatch", ValueError, "weight 0 has shape \\[4, 6\\] but its grad \\[6, 4\\]"),
    ("dtype_mismatch", TypeError, "weight 1 is torch.float32 but its grad is torch.float16"),
    ("int_dtype", TypeError, "grad 1 has dtype torch.int64"),
    ("f64", TypeError, "weight 0 has dtype torch.float64"),
    ("device", ValueError, "grad 1 is on meta"),
    ("scores_dtype", TypeError, "scores must be float32"),
    ("scores_size", ValueError, "scores must have shape \\[3\\]"),
    ("count", ValueError, "the plan has 2 tensors but got 1 weights"),
    ("none_grad", TypeError, "grad 1 is NoneType"),
    ("plan_type", TypeError, "plan must be a SaliencyPlan"),
])
def test_bad_inputs(case, err, match):
    maps, ws, gs, plan = _small()
    scores = torch.zeros(3)
    if case == "noncontig_w":
        ws[0] = torch.randn(6, 4).t()
    elif case == "noncontig_g":
        gs[0] = torch.randn(6, 4).t()
    elif case == "numel":
        ws[1], gs[1] = torch.randn(4), torch.randn(4)
    elif case == "shape_mismatch":
        gs[0] = torch.randn(6, 4)
    elif case == "dtype_mismatch":
        gs[1] = gs[1].half()
    elif case == "int_dtype":
        gs[1] = torch.ones(5, dtype=torch.int64)
    elif case == "f64":
        ws[0] = ws[0].double()
    elif case == "device":
        gs[1] = torch.empty(5, device="meta")
    elif case == "scores_dtype":
        scores = torch.zeros(3, dtype=torch.float64)
    elif case == "scores_size":
        scores = torch.zeros(4)
    elif case == "count":
        ws, gs = ws[:1], gs[:1]
    elif case == "none_grad":
        gs[1] = None
    with pytest.raises(err, match=match):
        saliency_accumulate(ws, gs, "plan" if case == "plan_type" else plan, scores)


def test_bad_maps():
    with pytest.raises(ValueError, match="unit ids outside"):
        SaliencyPlan.build([TensorMap(2, 2, [torch.tensor([0, 5])])], 3)
    with pytest.raises(ValueError, match="unit ids outside"):
        SaliencyPlan.build([TensorMap(2, 2, [], [torch.tensor([-2, 0])])], 3)
    with pytest.raises(TypeError, match="expected integer unit ids"):
        SaliencyPlan.build([TensorMap(2, 2, [torch.tensor([0.0, 1.0])])], 3)
    with pytest.raises(TypeError, match="expected TensorMap"):
        SaliencyPlan.build([(2, 2)], 3)
    with pytest.raises(ValueError, match="num_units >= 1"):
        SaliencyPlan.build([], 0)


def test_plan_on_other_device_is_refused():
    maps, ws, gs, plan = _small()
    with pytest.raises(ValueError, match="the plan is on cpu but scores are on meta"):
        saliency_accumulate([w.to("meta") for w in ws], [g.to("meta") for g in gs], plan,
                            torch.zeros(3, device="meta"))


def test_forced_backend_that_cannot_run():
    maps, ws, gs, plan = _small()
    with use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        saliency_accumulate(ws, gs, plan, torch.zeros(3))


# ----------------------------------------------------------------------------- op and compilation

@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck(deterministic):
    maps, shapes, U = odd_maps(seed=12, big=False)
    ws, gs = make_tensors(maps, seed=12, shapes=shapes)
    plan = SaliencyPlan.build(maps, U)
    torch.library.opcheck(_saliency_op, (ws, gs, plan.meta, plan.index, torch.zeros(U), deterministic))


def test_torch_compile_fullgraph():
    """The op traces into one graph (inductor; nothing else in the graph, so no C++ codegen to wait for)."""
    maps, U = mini_vit_maps("per-head", blocks=1)
    ws, gs = make_tensors(maps, seed=13)
    plan = SaliencyPlan.build(maps, U)

    def step(ws, gs, scores):
        saliency_accumulate(ws, gs, plan, scores)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    s_eager, s_comp = torch.zeros(U), torch.zeros(U)
    step(ws, gs, s_eager)
    compiled(ws, gs, s_comp)
    compiled(ws, gs, s_comp)  # second call: the compiled graph, no retrace
    torch.testing.assert_close(s_comp, 2 * s_eager)
    assert_scores_close(s_eager, reference(ws, gs, maps, U), ws, gs, maps, U)


# ------------------------------------------------------------------------------------------- CUDA

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here)")
GPU_BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not dispatch.cuda_native_usable(),
                                                  reason="CUDA kernels not built or no device")),
    pytest.param("triton", marks=pytest.mark.skipif(not dispatch.triton_status()[0], reason=dispatch.triton_status()[1])),
    "reference",
]


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_odd_shapes(backend, dtype, deterministic):
    maps, shapes, U = odd_maps(seed=14)
    ws, gs = make_tensors(maps, dtype, seed=14, shapes=shapes, device="cuda")
    plan = SaliencyPlan.build(maps, U, device="cuda")
    start = torch.rand(U, device="cuda") * 1e-3
    scores = run(backend, ws, gs, plan, start.clone(), deterministic)
    assert_scores_close(scores, start.double() + reference(ws, gs, maps, U), ws, gs, maps, U)
    if deterministic:
        again = run(backend, ws, gs, plan, start.clone(), True)
        assert torch.equal(scores, again)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deit_tiny(backend):
    maps, U = deit_case("tiny")
    ws, gs = make_tensors(maps, seed=15, device="cuda")
    plan = SaliencyPlan.build(maps, U).to("cuda")
    scores = run(backend, ws, gs, plan, torch.zeros(U, device="cuda"))
    assert_scores_close(scores, reference(ws, gs, maps, U), ws, gs, maps, U)


@needs_gpu
@pytest.mark.cuda
def test_gpu_default_dispatch_and_compile():
    maps, U = mini_vit_maps("aligned", blocks=2)
    ws, gs = make_tensors(maps, seed=16, device="cuda")
    plan = SaliencyPlan.build(maps, U, device="cuda")
    assert dispatch.select("saliency", torch.device("cuda")) in ("triton", "cuda")
    s = torch.zeros(U, device="cuda")
    torch.compile(lambda: saliency_accumulate(ws, gs, plan, s), fullgraph=True)()
    assert_scores_close(s, reference(ws, gs, maps, U), ws, gs, maps, U)

"""uneven_attention: every backend that runs here vs a float64 per-head reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nvit_kernels import dispatch
from nvit_kernels.attention import uneven_attention, uneven_attention_reference

CPU = torch.device("cpu")
CPU_BACKENDS = [b for b in ("cpp", "reference") if dispatch.can_run(b, CPU)[0]]


def make_qkv(b, n, qk_dims, v_dims, dtype=torch.float32, device=CPU, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    width = sum(2 * q + v for q, v in zip(qk_dims, v_dims))
    x = torch.randn(b, n, width, generator=g, dtype=torch.float64) * spread
    return x.to(dtype=dtype, device=device)


def default_scales(qk_dims):
    return [1.0 / math.sqrt(d) for d in qk_dims]


def torch_same_precision(qkv, qk_dims, v_dims, scales):
    """What stock PyTorch gets in qkv's dtype: a per-head SDPA loop (the error budget for our kernels)."""
    outs, o = [], 0
    for dq, dv, s in zip(qk_dims, v_dims, scales):
        q, k, v = qkv[..., o:o + dq], qkv[..., o + dq:o + 2 * dq], qkv[..., o + 2 * dq:o + 2 * dq + dv]
        outs.append(F.scaled_dot_product_attention(q, k, v, scale=s))
        o += 2 * dq + dv
    return torch.cat(outs, -1)


# Uneven heads covering dim 1, odd dims, dims > 64, and QK != V within a head.
HEADS = [
    ([1, 3, 17], [3, 1, 40]),
    ([64, 40, 100, 8], [17, 64, 3, 100]),
]
SHAPES = [(1, 1), (2, 50), (1, 197)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS, ids=["small", "wide"])
@pytest.mark.parametrize("bn", SHAPES, ids=lambda s: f"B{s[0]}N{s[1]}")
def test_forward_matches_reference(backend, dtype, heads, bn):
    qk_dims, v_dims = heads
    b, n = bn
    qkv = make_qkv(b, n, qk_dims, v_dims, dtype, spread=2.0)
    scales = default_scales(qk_dims)
    ref = uneven_attention_reference(qkv, qk_dims, v_dims, scales)
    with dispatch.use_backend(backend):
        out = uneven_attention(qkv, qk_dims, v_dims, scales)
    assert out.dtype == dtype and out.shape == (b, n, sum(v_dims))
    err = (out.double() - ref).abs().max().item()
    base = (torch_same_precision(qkv, qk_dims, v_dims, scales).double() - ref).abs().max().item()
    eps = torch.finfo(dtype).eps
    tol = max(2 * base, 4 * eps)  # floor: a few ulps when stock PyTorch happens to land exactly
    assert err <= tol, f"{backend} {dtype}: max err {err:.3e} > tol {tol:.3e} (stock torch err {base:.3e})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_fp32_matches_reference(backend):
    qk_dims, v_dims = [3, 17, 1, 40], [5, 1, 17, 8]
    scales = [0.7, 0.2, 1.3, 1 / math.sqrt(40)]
    x = make_qkv(2, 50, qk_dims, v_dims, torch.float32, seed=1)
    g = torch.randn(2, 50, sum(v_dims), generator=torch.Generator().manual_seed(2))
    x64 = x.double().requires_grad_()
    uneven_attention_reference(x64, qk_dims, v_dims, scales).backward(g.double())
    x32 = x.clone().requires_grad_()
    with dispatch.use_backend(backend):
        uneven_attention(x32, qk_dims, v_dims, scales).backward(g)
    err = (x32.grad.double() - x64.grad).abs().max().item()
    assert err <= 1e-5 * max(1.0, x64.grad.abs().max().item()), err


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    qk_dims, v_dims = [1, 3, 2], [2, 1, 3]
    x = make_qkv(2, 5, qk_dims, v_dims, torch.float64, seed=3).requires_grad_()
    scales = [0.9, 0.5, 1.1]
    with dispatch.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: uneven_attention(t, qk_dims, v_dims, scales), (x,), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    qk_dims, v_dims = [3, 1, 5], [2, 4, 1]
    x = make_qkv(2, 7, qk_dims, v_dims, torch.float32, seed=4).requires_grad_()
    with dispatch.use_backend(backend):
        torch.library.opcheck(torch.ops.nvit.uneven_attention.default, (x, qk_dims, v_dims, [0.5, 1.0, 0.3]))


def test_torch_compile_fullgraph():
    qk_dims, v_dims = [4, 2], [3, 5]
    lin = torch.nn.Linear(6, sum(2 * q + v for q, v in zip(qk_dims, v_dims)))

    def block(x):
        return uneven_attention(lin(x), qk_dims, v_dims, [0.5, 0.7]).sum(-1)

    x = torch.randn(2, 9, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.parametrize("bad, match", [
    (lambda x: uneven_attention(x, [2, 3], [4], [1.0, 1.0]), "one entry per head"),
    (lambda x: uneven_attention(x, [2, 0], [4, 3], [1.0, 1.0]), r"qk_dims\[1\] = 0"),
    (lambda x: uneven_attention(x, [2, 3], [4, 4], [1.0, 1.0]), "last dim is 17"),
    (lambda x: uneven_attention(x[0], [2, 3], [4, 3], [1.0, 1.0]), "must be"),
    (lambda x: uneven_attention(x.int(), [2, 3], [4, 3], [1.0, 1.0]), "dtype"),
    (lambda x: uneven_attention(x.transpose(0, 1), [2, 3], [4, 3], [1.0, 1.0]), "contiguous"),
    (lambda x: uneven_attention(x, [2, 3], [4, 3], [1.0, float("nan")]), "not finite"),
], ids=["len", "dim0", "width", "rank", "dtype", "noncontig", "nan-scale"])
def test_bad_input(bad, match):
    x = torch.randn(2, 3, 17)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x)


def test_cpu_default_backend_is_cpp():
    if not dispatch.can_run("cpp", CPU)[0]:
        pytest.skip("extension not built: " + dispatch.can_run("cpp", CPU)[1])
    assert dispatch.select("attention", CPU) == "cpp"


def test_compiled_backward_matches_eager():
    qk_dims, v_dims = [3, 6], [5, 2]
    x = make_qkv(2, 11, qk_dims, v_dims, seed=5)
    f = lambda t: uneven_attention(t, qk_dims, v_dims, [0.4, 0.8]).square().sum()  # noqa: E731
    a = x.clone().requires_grad_()
    f(a).backward()
    b = x.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(b).backward()
    torch.testing.assert_close(b.grad, a.grad)


# ---- CUDA (Triton default, and the CUDA kernels; the CUDA backend's backward is the Triton one) ------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS, ids=["small", "wide"])
@pytest.mark.parametrize("bn", SHAPES, ids=lambda s: f"B{s[0]}N{s[1]}")
def test_cuda_forward_matches_reference(backend, dtype, heads, bn):
    if not dispatch.can_run(backend, torch.device("cuda"))[0]:
        pytest.skip(dispatch.can_run(backend, torch.device("cuda"))[1])
    qk_dims, v_dims = heads
    b, n = bn
    qkv = make_qkv(b, n, qk_dims, v_dims, dtype, device=torch.device("cuda"), spread=2.0)
    scales = default_scales(qk_dims)
    ref = uneven_attention_reference(qkv.cpu(), qk_dims, v_dims, scales)
    with dispatch.use_backend(backend):
        out = uneven_attention(qkv, qk_dims, v_dims, scales)
    err = (out.cpu().double() - ref).abs().max().item()
    base = (torch_same_precision(qkv, qk_dims, v_dims, scales).cpu().double() - ref).abs().max().item()
    tol = max(2 * base, 4 * torch.finfo(dtype).eps)
    assert err <= tol, f"{backend} {dtype}: max err {err:.3e} > tol {tol:.3e} (stock torch err {base:.3e})"


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("bucketed", [False, True])
def test_cuda_backward_matches_reference(backend, bucketed):
    if not dispatch.can_run(backend, torch.device("cuda"))[0]:
        pytest.skip(dispatch.can_run(backend, torch.device("cuda"))[1])
    from nvit_kernels import triton_attention

    qk_dims, v_dims = [64, 1, 17, 100], [3, 40, 64, 8]
    scales = default_scales(qk_dims)
    x = make_qkv(2, 197, qk_dims, v_dims, torch.float32, seed=6)
    g = torch.randn(2, 197, sum(v_dims), generator=torch.Generator().manual_seed(7))
    x64 = x.double().requires_grad_()
    uneven_attention_reference(x64, qk_dims, v_dims, scales).backward(g.double())
    xc = x.cuda().requires_grad_()
    with dispatch.use_backend(backend):
        out = uneven_attention(xc, qk_dims, v_dims, scales)
        out.backward(g.cuda())
    scale = max(1.0, x64.grad.abs().max().item())
    assert (xc.grad.cpu().double() - x64.grad).abs().max().item() <= 2e-5 * scale
    gb = triton_attention.backward(g.cuda(), xc.detach(), out.detach(), qk_dims, v_dims, scales, bucketed=bucketed)
    assert (gb.cpu().double() - x64.grad).abs().max().item() <= 2e-5 * scale


@needs_gpu
@pytest.mark.cuda
def test_cuda_opcheck():
    qk_dims, v_dims = [3, 1, 5], [2, 4, 1]
    x = make_qkv(2, 7, qk_dims, v_dims, torch.float32, device=torch.device("cuda"), seed=4).requires_grad_()
    torch.library.opcheck(torch.ops.nvit.uneven_attention.default, (x, qk_dims, v_dims, [0.5, 1.0, 0.3]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_task_layouts(threads, dtype):
    """Both task layouts of the C++ forward (whole (b, h) per task when B*H >= 8 * threads, one query
    tile per task otherwise), with query tails and head dims straddling the 16-wide transposes."""
    if not dispatch.can_run("cpp", CPU)[0]:
        pytest.skip("extension not built: " + dispatch.can_run("cpp", CPU)[1])
    qk_dims, v_dims = [17, 1, 33, 16], [16, 31, 2, 48]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, n in [(5, 37), (1, 70)]:  # 20 (b, h) pairs, then 4
            qkv = make_qkv(b, n, qk_dims, v_dims, dtype, seed=b + n, spread=2.0)
            scales = default_scales(qk_dims)
            ref = uneven_attention_reference(qkv, qk_dims, v_dims, scales)
            with dispatch.use_backend("cpp"):
                out = uneven_attention(qkv, qk_dims, v_dims, scales)
            base = (torch_same_precision(qkv, qk_dims, v_dims, scales).double() - ref).abs().max().item()
            err = (out.double() - ref).abs().max().item()
            assert err <= max(2 * base, 4 * torch.finfo(dtype).eps), (b, n, err, base)
    finally:
        torch.set_num_threads(prev)


def test_eager_fast_path_matches_op():
    """Inference calls skip the custom-op dispatch; they must give exactly what the op gives."""
    qk_dims, v_dims = [5, 12, 3], [7, 2, 20]
    qkv = make_qkv(3, 29, qk_dims, v_dims, seed=7)
    scales = [0.3, 0.9, 0.5]
    op = torch.ops.nvit.uneven_attention(qkv, qk_dims, v_dims, scales)
    with torch.inference_mode():
        fast = uneven_attention(qkv, qk_dims, v_dims, scales)
    with torch.no_grad():
        fast2 = uneven_attention(qkv.requires_grad_(), qk_dims, v_dims, scales)
    assert torch.equal(fast, op) and torch.equal(fast2, op)


def test_dispatch_modes_see_the_op():
    """Tools that watch the dispatcher (FlopCounterMode, tracers) must see the op, even without grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    qkv = make_qkv(1, 4, [2], [3])
    with torch.no_grad(), Record():
        uneven_attention(qkv, [2], [3], [1.0])
    assert torch.ops.nvit.uneven_attention.default in seen
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        uneven_attention(qkv, [2], [3], [1.0])
    assert any(e.key == "nvit::uneven_attention" for e in prof.key_averages())

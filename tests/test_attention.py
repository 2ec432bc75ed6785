"""uneven_attention: every backend that runs here vs a float64 per-head reference, without and with a
bias [H, N, N] and a mask [nW, N, N] (Swin window attention): each check is one test over `kind`
("none", "bias", "mask", "both")."""
from __future__ import annotations

import contextlib
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


def make_bias(heads, n, dtype=torch.float32, seed=10, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, n, n, generator=g, dtype=torch.float64) * spread).to(dtype)


def make_mask(nw, n, seed=11, neg=-100.0):
    """Shifted-window-like mask: 0 within a region, `neg` across regions (regions differ per window)."""
    g = torch.Generator().manual_seed(seed)
    region = torch.randint(0, 3, (nw, n), generator=g)
    region[0] = 0  # window 0 unshifted: no mask at all, as in Swin
    m = torch.zeros(nw, n, n, dtype=torch.float64)
    m[region[:, :, None] != region[:, None, :]] = neg
    return m.float()


def additive(bias, mask, b, heads, n):
    """bias[h] + mask[b % nW] as [B, H, N, N] float64 (timm's attn_mask)."""
    a = torch.zeros(b, heads, n, n, dtype=torch.float64)
    if bias is not None:
        a = a + bias.double()[None]
    if mask is not None:
        nw = mask.shape[0]
        a = a + mask.double().view(1, nw, 1, n, n).expand(b // nw, nw, heads, n, n).reshape(b, heads, n, n)
    return a


def stock(qkv, qk_dims, v_dims, scales, bias=None, mask=None):
    """What stock PyTorch gets in qkv's dtype: a per-head SDPA loop (the error budget for our kernels), with
    attn_mask = bias + mask where either is given (rounded to qkv's dtype, as SDPA needs)."""
    am = None
    if bias is not None or mask is not None:
        am = additive(bias, mask, qkv.shape[0], len(qk_dims), qkv.shape[1]).to(qkv.dtype).to(qkv.device)
    outs, o = [], 0
    for h, (dq, dv, s) in enumerate(zip(qk_dims, v_dims, scales)):
        q, k, v = qkv[..., o:o + dq], qkv[..., o + dq:o + 2 * dq], qkv[..., o + 2 * dq:o + 2 * dq + dv]
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=None if am is None else am[:, h], scale=s))
        o += 2 * dq + dv
    return torch.cat(outs, -1)


def extras_for(kind, heads, b, n, nw, bias_dtype=torch.float32):
    """(bias, mask) of a kind: "none" (neither), "bias", "mask" or "both"."""
    bias = make_bias(heads, n, bias_dtype) if kind in ("bias", "both") else None
    mask = make_mask(nw, n) if kind in ("mask", "both") else None
    return bias, mask


EXTRAS = ["bias", "mask", "both"]


def _case_id(case):
    b, n, nw, *rest = case
    return f"B{b}N{n}W{nw}" + "".join(f"-{r}" for r in rest)


def with_and_without(plain, extras, kinds=EXTRAS):
    """Parameters (kind, case) of a check made without extras (kind "none", on the `plain` cases) and with
    them (each of `kinds`, on the `extras` cases); a case is (B, N, nW, ...)."""
    return ([pytest.param("none", c, id=f"none-{_case_id(c)}") for c in plain]
            + [pytest.param(k, c, id=f"{k}-{_case_id(c)}") for k in kinds for c in extras])


# Uneven heads covering dim 1, odd dims, dims > 64, and QK != V within a head.
HEADS = [
    ([1, 3, 17], [3, 1, 40]),
    ([64, 40, 100, 8], [17, 64, 3, 100]),
]
SHAPES = [(1, 1, 1), (2, 50, 1), (1, 197, 1)]
# (B, N, nW): a single token; Swin's 7x7 windows with 4 windows per image (2 images) and with one;
# N straddling the kernels' tiles.
WINDOW_SHAPES = [(1, 1, 1), (8, 49, 4), (3, 49, 1), (4, 37, 2), (2, 70, 2)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS, ids=["small", "wide"])
@pytest.mark.parametrize("kind, bnw", with_and_without(SHAPES, WINDOW_SHAPES))
def test_forward_matches_reference(backend, dtype, heads, kind, bnw):
    qk_dims, v_dims = heads
    b, n, nw = bnw
    qkv = make_qkv(b, n, qk_dims, v_dims, dtype, spread=2.0)
    scales = default_scales(qk_dims)
    bias, mask = extras_for(kind, len(qk_dims), b, n, nw)  # fp32 bias with low-precision qkv: autocast's case
    ref = uneven_attention_reference(qkv, qk_dims, v_dims, scales, bias=bias, mask=mask)
    with dispatch.use_backend(backend):
        out = uneven_attention(qkv, qk_dims, v_dims, scales, bias=bias, mask=mask)
    assert out.dtype == dtype and out.shape == (b, n, sum(v_dims))
    err = (out.double() - ref).abs().max().item()
    base = (stock(qkv, qk_dims, v_dims, scales, bias, mask).double() - ref).abs().max().item()
    tol = max(2 * base, 4 * torch.finfo(dtype).eps)  # floor: a few ulps when stock PyTorch happens to land exactly
    assert err <= tol, f"{backend} {dtype} {kind}: max err {err:.3e} > tol {tol:.3e} (stock torch err {base:.3e})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind, case", with_and_without([(2, 50, 1, 40)],
                                                        [(1, 1, 1, 70), (8, 49, 4, 70), (4, 37, 2, 70)]))
def test_backward_fp32_matches_reference(backend, kind, case):
    b, n, nw, wide = case  # the last head's QK dim
    qk_dims, v_dims = [3, 17, 1, wide], [5, 1, 17, 8]
    scales = [0.7, 0.2, 1.3, 1 / math.sqrt(wide)]
    x = make_qkv(b, n, qk_dims, v_dims, torch.float32, seed=1)
    g = torch.randn(b, n, sum(v_dims), generator=torch.Generator().manual_seed(2))
    bias, mask = extras_for(kind, len(qk_dims), b, n, nw)
    x64 = x.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    uneven_attention_reference(x64, qk_dims, v_dims, scales, bias=b64, mask=mask).backward(g.double())
    x32 = x.clone().requires_grad_()
    b32 = None if bias is None else bias.clone().requires_grad_()
    with dispatch.use_backend(backend):
        uneven_attention(x32, qk_dims, v_dims, scales, bias=b32, mask=mask).backward(g)
    err = (x32.grad.double() - x64.grad).abs().max().item()
    assert err <= 1e-5 * max(1.0, x64.grad.abs().max().item()), err
    if bias is not None:
        assert b32.grad.dtype == torch.float32 and b32.grad.shape == bias.shape
        berr = (b32.grad.double() - b64.grad).abs().max().item()
        assert berr <= 1e-5 * max(1.0, b64.grad.abs().max().item()), berr


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind, bnw", with_and_without([(2, 5, 1)], [(4, 5, 2)]))
def test_gradcheck_float64(backend, kind, bnw):
    qk_dims, v_dims = [1, 3, 2], [2, 1, 3]
    scales = [0.9, 0.5, 1.1]
    b, n, nw = bnw
    x = make_qkv(b, n, qk_dims, v_dims, torch.float64, seed=3).requires_grad_()
    bias, mask = extras_for(kind, 3, b, n, nw, bias_dtype=torch.float64)
    if mask is not None:
        mask = mask.double()
    with dispatch.use_backend(backend):
        if bias is None:
            f = lambda t: uneven_attention(t, qk_dims, v_dims, scales, mask=mask)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
        else:
            f = lambda t, bb: uneven_attention(t, qk_dims, v_dims, scales, bias=bb, mask=mask)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x, bias.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind, bnw", with_and_without([(2, 7, 1)], [(4, 7, 2)]))
def test_opcheck(backend, kind, bnw):
    """The forward op (with the schema's defaults where there are no extras) and the backward op."""
    qk_dims, v_dims = [3, 1, 5], [2, 4, 1]
    b, n, nw = bnw
    x = make_qkv(b, n, qk_dims, v_dims, torch.float32, seed=4).requires_grad_()
    bias, mask = extras_for(kind, 3, b, n, nw)
    if bias is not None:
        bias.requires_grad_()
    extras = () if kind == "none" else (bias, mask)
    with dispatch.use_backend(backend):
        torch.library.opcheck(torch.ops.nvit.uneven_attention.default, (x, qk_dims, v_dims, [0.5, 1.0, 0.3], *extras))
        g = torch.randn(b, n, sum(v_dims))
        bias = None if bias is None else bias.detach()  # the backward op itself has no autograd formula
        out = torch.ops.nvit.uneven_attention(x.detach(), qk_dims, v_dims, [0.5, 1.0, 0.3], bias, mask)
        torch.library.opcheck(torch.ops.nvit.uneven_attention_backward.default,
                              (g, x.detach(), out, qk_dims, v_dims, [0.5, 1.0, 0.3], bias, mask))


@pytest.mark.parametrize("kind, bnw", with_and_without([(2, 9, 1)], [(4, 9, 2)], kinds=["both"]))
def test_torch_compile_fullgraph(kind, bnw):
    """fullgraph compile: the output, and the gradients of the weights before it and of the bias."""
    qk_dims, v_dims = [4, 2], [3, 5]
    b, n, nw = bnw
    lin = torch.nn.Linear(6, sum(2 * q + v for q, v in zip(qk_dims, v_dims)))
    bias, mask = extras_for(kind, 2, b, n, nw)
    bias = None if bias is None else torch.nn.Parameter(bias)

    def block(x):
        return uneven_attention(lin(x), qk_dims, v_dims, [0.5, 0.7], bias=None if bias is None else bias * 1.0,
                                mask=mask)

    x = torch.randn(b, n, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    params = [lin.weight] + ([] if bias is None else [bias])
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), params)
    out_e = block(x)
    grads_e = torch.autograd.grad(out_e.square().sum(), params)
    torch.testing.assert_close(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("bad, match", [
    (lambda x, b, m: uneven_attention(x, [2, 3], [4], [1.0, 1.0]), "one entry per head"),
    (lambda x, b, m: uneven_attention(x, [2, 0], [4, 3], [1.0, 1.0]), r"qk_dims\[1\] = 0"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 4], [1.0, 1.0]), "last dim is 17"),
    (lambda x, b, m: uneven_attention(x[0], [2, 3], [4, 3], [1.0, 1.0]), "must be"),
    (lambda x, b, m: uneven_attention(x.int(), [2, 3], [4, 3], [1.0, 1.0]), "dtype"),
    (lambda x, b, m: uneven_attention(x.transpose(0, 1), [2, 3], [4, 3], [1.0, 1.0]), "contiguous"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, float("nan")]), "not finite"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], bias=b[:1]), r"H = 2 heads"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], bias=b[:, :2]), r"bias must be \[H, N, N\]"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], bias=b[0]), r"bias must be \[H, N, N\]"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], bias=b.int()), "bias dtype"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], bias=torch.zeros(2, 3, 3, device="meta")),
     "bias is on meta"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], mask=m.repeat(2, 1, 1)[:3]), "multiple of"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], mask=m[:, :2]), r"mask must be \[nW, N, N\]"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], mask=m[:0]), "no window"),
    (lambda x, b, m: uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], mask=m.clone().requires_grad_()),
     "mask requires grad"),
    (lambda x, b, m: torch.ops.nvit.uneven_attention(x.requires_grad_(), [2, 3], [4, 3], [1.0, 1.0], None,
                                                      m.clone().requires_grad_()), "mask requires grad"),
    (lambda x, b, m: torch.ops.nvit.uneven_attention(x, [2, 3], [4, 3], [1.0, 1.0], b[:1], None), "H = 2 heads"),
], ids=["len", "dim0", "width", "rank", "dtype", "noncontig", "nan-scale",
        "bias-heads", "bias-n", "bias-rank", "bias-dtype", "bias-device", "mask-nw", "mask-n", "mask-empty",
        "mask-grad", "mask-grad-op", "op-bias-heads"])
def test_bad_input(bad, match):
    x = torch.randn(2, 3, 17)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, make_bias(2, 3), make_mask(2, 3))


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

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, shapes", [("none", [(5, 37, 1), (1, 70, 1)]),  # 20 (b, h) pairs, then 4
                                          ("both", [(6, 37, 3), (2, 70, 2)])],  # 24 (b, h) pairs, then 8
                         ids=["none", "both"])
def test_cpp_task_layouts(threads, dtype, kind, shapes):
    """Both task layouts of the C++ forward (whole (b, h) per task when B*H >= 8 * threads, one query
    tile per task otherwise), with query tails and head dims straddling the 16-wide transposes; and the
    backward with several threads sharing a head (with a bias: per-thread grad_bias partials, then their sum)."""
    if not dispatch.can_run("cpp", CPU)[0]:
        pytest.skip("extension not built: " + dispatch.can_run("cpp", CPU)[1])
    qk_dims, v_dims = [17, 1, 33, 16], [16, 31, 2, 48]
    scales = default_scales(qk_dims)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, n, nw in shapes:
            x = make_qkv(b, n, qk_dims, v_dims, dtype, seed=b + n, spread=2.0)
            bias, mask = extras_for(kind, 4, b, n, nw)
            g = torch.randn(b, n, sum(v_dims), generator=torch.Generator().manual_seed(n))
            x64 = x.double().requires_grad_()
            b64 = None if bias is None else bias.double().requires_grad_()
            ref = uneven_attention_reference(x64, qk_dims, v_dims, scales, bias=b64, mask=mask)
            ref.backward(g.double())
            xc = x.clone().requires_grad_()
            bc = None if bias is None else bias.clone().requires_grad_()
            with dispatch.use_backend("cpp"):
                out = uneven_attention(xc, qk_dims, v_dims, scales, bias=bc, mask=mask)
                out.backward(g.to(dtype))
            base = (stock(x, qk_dims, v_dims, scales, bias, mask).double() - ref).abs().max().item()
            err = (out.double() - ref).abs().max().item()
            assert err <= max(2 * base, 4 * torch.finfo(dtype).eps), (b, n, err, base)
            rel = 1e-5 if dtype == torch.float32 else 2e-2
            for got, want in [(xc.grad, x64.grad)] + ([] if bias is None else [(bc.grad, b64.grad)]):
                assert (got.double() - want).abs().max().item() <= rel * max(1.0, want.abs().max().item())
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("kind, bnw", with_and_without([(3, 29, 1)], [(6, 29, 3)], kinds=["both"]))
def test_eager_fast_path_matches_op(kind, bnw):
    """Inference calls skip the custom-op dispatch; they must give exactly what the op gives."""
    qk_dims, v_dims = [5, 12, 3], [7, 2, 20]
    b, n, nw = bnw
    qkv = make_qkv(b, n, qk_dims, v_dims, seed=7)
    bias, mask = extras_for(kind, 3, b, n, nw)
    scales = [0.3, 0.9, 0.5]
    op = torch.ops.nvit.uneven_attention(qkv, qk_dims, v_dims, scales, *(() if kind == "none" else (bias, mask)))
    with torch.inference_mode():
        fast = uneven_attention(qkv, qk_dims, v_dims, scales, bias=bias, mask=mask)
    with torch.no_grad():  # inputs that require grad, in a no-grad region
        fast2 = uneven_attention(qkv.clone().requires_grad_(), qk_dims, v_dims, scales, bias=bias, mask=mask)
        fast3 = fast2 if bias is None else uneven_attention(qkv, qk_dims, v_dims, scales,
                                                            bias=bias.clone().requires_grad_(), mask=mask)
    assert torch.equal(fast, op) and torch.equal(fast2, op) and torch.equal(fast3, op)



@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_extras_low_precision(backend, dtype):
    """bf16/fp16 qkv with an fp32 bias (autocast) and with a bias in qkv's dtype: grads in each one's dtype."""
    qk_dims, v_dims = [8, 3, 33], [16, 40, 2]
    scales = default_scales(qk_dims)
    b, n, nw = 8, 49, 4
    x = make_qkv(b, n, qk_dims, v_dims, dtype, seed=3)
    g = torch.randn(b, n, sum(v_dims), generator=torch.Generator().manual_seed(4))
    mask = make_mask(nw, n)
    for bias_dtype in (torch.float32, dtype):
        bias = make_bias(len(qk_dims), n, bias_dtype)
        x64 = x.double().requires_grad_()
        b64 = bias.double().requires_grad_()
        uneven_attention_reference(x64, qk_dims, v_dims, scales, bias=b64, mask=mask).backward(g.double())
        xl = x.clone().requires_grad_()
        bl = bias.clone().requires_grad_()
        with dispatch.use_backend(backend):
            uneven_attention(xl, qk_dims, v_dims, scales, bias=bl, mask=mask).backward(g.to(dtype))
        assert xl.grad.dtype == dtype and bl.grad.dtype == bias_dtype
        # Budget: inputs rounded to `dtype`, grads rounded on store; a few percent of the largest grad.
        for got, want in ((xl.grad, x64.grad), (bl.grad, b64.grad)):
            err = (got.double() - want).abs().max().item()
            assert err <= 2e-2 * max(1.0, want.abs().max().item()), (bias_dtype, err)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows(backend):
    """-inf mask entries: a row with any finite logit is exact; a row of all -inf gives 0, not NaN."""
    qk_dims, v_dims = [4, 17], [3, 20]
    b, n, nw = 4, 37, 2
    scales = default_scales(qk_dims)
    mask = make_mask(nw, n, neg=float("-inf"))
    mask[1, 5, :] = float("-inf")    # window 1 (and 3): query 5 sees nothing
    mask[0, 7, :] = float("-inf")
    mask[0, 7, 36] = 0.0             # query 7 of window 0 sees only the last key
    x = make_qkv(b, n, qk_dims, v_dims, seed=5)
    bias = make_bias(len(qk_dims), n)
    g = torch.randn(b, n, sum(v_dims), generator=torch.Generator().manual_seed(6))
    x64 = x.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    ref = uneven_attention_reference(x64, qk_dims, v_dims, scales, bias=b64, mask=mask)
    ref.backward(g.double())
    assert torch.isfinite(ref).all() and (ref[1, 5] == 0).all() and (ref[3, 5] == 0).all()
    xb = x.clone().requires_grad_()
    bb = bias.clone().requires_grad_()
    with dispatch.use_backend(backend):
        out = uneven_attention(xb, qk_dims, v_dims, scales, bias=bb, mask=mask)
        out.backward(g)
    assert torch.isfinite(out).all() and (out[1, 5] == 0).all() and (out[3, 5] == 0).all()
    assert (out.double() - ref).abs().max().item() <= 1e-5
    assert torch.isfinite(xb.grad).all() and torch.isfinite(bb.grad).all()
    assert (xb.grad.double() - x64.grad).abs().max().item() <= 1e-5 * max(1.0, x64.grad.abs().max().item())
    assert (bb.grad.double() - b64.grad).abs().max().item() <= 1e-5 * max(1.0, b64.grad.abs().max().item())


def test_flop_counter_extras():
    """nvit.cost's formulas count bias/mask calls like plain ones (adds are not counted, as for SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    import nvit.cost  # noqa: F401  (registers the formulas)

    qk_dims, v_dims = [4, 2], [3, 5]
    n, nw = 9, 2
    x = make_qkv(4, n, qk_dims, v_dims).requires_grad_()
    bias = make_bias(2, n).requires_grad_()
    counts = []
    for extras in ({}, dict(bias=bias, mask=make_mask(nw, n))):
        with FlopCounterMode(display=False) as fc:
            uneven_attention(x, qk_dims, v_dims, [0.5, 0.7], **extras).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_matches_timm_window_attention():
    """Our op inside timm's Swin WindowAttention (equal heads) gives timm's output and bias gradient."""
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    dim, heads, ws = 32, 4, 7
    n, nw, images = ws * ws, 4, 2
    attn = swin.WindowAttention(dim, num_heads=heads, window_size=ws).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)
    x = torch.randn(images * nw, n, dim, dtype=torch.float64)
    attn = attn.double()
    mask = make_mask(nw, n).double()
    want = attn(x, mask=mask)
    (want_gb,) = torch.autograd.grad(want.square().sum(), attn.relative_position_bias_table)

    d = dim // heads
    qkv = attn.qkv(x).view(x.shape[0], n, 3, heads, d).transpose(2, 3).reshape(x.shape[0], n, 3 * dim)  # per head
    bias = attn._get_rel_pos_bias()[0]
    got = attn.proj(uneven_attention(qkv, [d] * heads, [d] * heads, [attn.scale] * heads, bias=bias, mask=mask))
    (got_gb,) = torch.autograd.grad(got.square().sum(), attn.relative_position_bias_table)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_gb, want_gb)
    # And timm's formula with stock SDPA: attn_mask = bias + mask, per head group of equal dims.
    q, k, v = qkv.view(x.shape[0], n, heads, 3, d).permute(3, 0, 2, 1, 4)
    sd = F.scaled_dot_product_attention(q, k, v, attn_mask=additive(bias, mask, x.shape[0], heads, n), scale=attn.scale)
    ours = uneven_attention(qkv, [d] * heads, [d] * heads, [attn.scale] * heads, bias=bias, mask=mask)
    torch.testing.assert_close(ours, sd.transpose(1, 2).reshape(x.shape[0], n, dim))



# ---- CUDA (Triton default, and the CUDA kernels; the CUDA backend's backward is the Triton one) ------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS, ids=["small", "wide"])
@pytest.mark.parametrize("kind, bnw", with_and_without(SHAPES, WINDOW_SHAPES))
def test_cuda_forward_matches_reference(backend, dtype, heads, kind, bnw):
    dev = torch.device("cuda")
    if not dispatch.can_run(backend, dev)[0]:
        pytest.skip(dispatch.can_run(backend, dev)[1])
    qk_dims, v_dims = heads
    b, n, nw = bnw
    qkv = make_qkv(b, n, qk_dims, v_dims, dtype, spread=2.0)
    scales = default_scales(qk_dims)
    bias, mask = extras_for(kind, len(qk_dims), b, n, nw)
    ref = uneven_attention_reference(qkv, qk_dims, v_dims, scales, bias=bias, mask=mask)
    with dispatch.use_backend(backend):
        out = uneven_attention(qkv.to(dev), qk_dims, v_dims, scales, bias=None if bias is None else bias.to(dev),
                               mask=None if mask is None else mask.to(dev))
    err = (out.cpu().double() - ref).abs().max().item()
    # the error budget: stock PyTorch on the GPU without extras, on the CPU with them
    stock_on = dev if kind == "none" else CPU
    base = (stock(qkv.to(stock_on), qk_dims, v_dims, scales, bias, mask).cpu().double() - ref).abs().max().item()
    tol = max(2 * base, 4 * torch.finfo(dtype).eps)
    assert err <= tol, f"{backend} {dtype} {kind}: max err {err:.3e} > tol {tol:.3e} (stock torch err {base:.3e})"


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("kind, case", with_and_without(
    [(2, 197, 1, "no-mask")],
    [(64, 49, 4, "m100"), (64, 49, 4, "minf")],  # 16 images of 4 windows: more windows than grad_bias slots
    kinds=["both"]))
def test_cuda_backward_matches_reference(backend, bucketed, kind, case):
    dev = torch.device("cuda")
    if not dispatch.can_run(backend, dev)[0]:
        pytest.skip(dispatch.can_run(backend, dev)[1])
    from nvit_kernels import triton_attention

    qk_dims, v_dims = [64, 1, 17, 100], [3, 40, 64, 8]
    scales = default_scales(qk_dims)
    b, n, nw, neg = case
    x = make_qkv(b, n, qk_dims, v_dims, torch.float32, seed=6)
    g = torch.randn(b, n, sum(v_dims), generator=torch.Generator().manual_seed(7))
    bias = mask = None
    if kind == "both":
        neg = float("-inf") if neg == "minf" else -100.0
        bias, mask = make_bias(4, n), make_mask(nw, n, neg=neg)
        if neg == float("-inf"):
            mask[1, 3, :] = neg  # a fully masked query
    x64 = x.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    uneven_attention_reference(x64, qk_dims, v_dims, scales, bias=b64, mask=mask).backward(g.double())
    xc = x.to(dev).requires_grad_()
    bc = None if bias is None else bias.to(dev).requires_grad_()
    mc = None if mask is None else mask.to(dev)
    with dispatch.use_backend(backend):
        out = uneven_attention(xc, qk_dims, v_dims, scales, bias=bc, mask=mc)
        out.backward(g.to(dev))
    pairs = [(xc.grad, x64.grad)] + ([] if bias is None else [(bc.grad, b64.grad)])
    for got, want in pairs:
        assert (got.cpu().double() - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())
    gq, gb = triton_attention.backward(g.to(dev), xc.detach(), out.detach(), qk_dims, v_dims, scales,
                                       bucketed=bucketed, bias=None if bc is None else bc.detach(), mask=mc)
    for got, want in [(gq, x64.grad)] + ([] if bias is None else [(gb, b64.grad)]):
        assert (got.cpu().double() - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["default", "triton", "cuda"])
@pytest.mark.parametrize("kind, bnw", with_and_without([(2, 7, 1)], [(4, 7, 2)], kinds=["both"]))
def test_cuda_opcheck(backend, kind, bnw):
    dev = torch.device("cuda")
    if backend != "default" and not dispatch.can_run(backend, dev)[0]:
        pytest.skip(dispatch.can_run(backend, dev)[1])
    qk_dims, v_dims = [3, 1, 5], [2, 4, 1]
    b, n, nw = bnw
    x = make_qkv(b, n, qk_dims, v_dims, torch.float32, device=dev, seed=4).requires_grad_()
    extras = () if kind == "none" else (make_bias(3, n).to(dev).requires_grad_(), make_mask(nw, n).to(dev))
    with contextlib.nullcontext() if backend == "default" else dispatch.use_backend(backend):
        torch.library.opcheck(torch.ops.nvit.uneven_attention.default, (x, qk_dims, v_dims, [0.5, 1.0, 0.3], *extras))

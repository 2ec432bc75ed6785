"""Attention whose heads each have their own QK and V width (pruned NViT blocks).

Head h of a block has ``qk_dims[h]`` query/key channels and ``v_dims[h]`` value channels. The fused
qkv Linear writes, per token, the heads back to back and each head as ``[q_h | k_h | v_h]``; the
output holds the heads' values back to back (``[B, N, sum(v_dims)]``), ready for the proj Linear
(:mod:`nvit_kernels.layout` defines this layout for the op, its kernels and the model).
No stock kernel takes uneven heads: padding every head to the widest wastes FLOPs and a Python loop
over heads drowns in launches, so one kernel call covers all heads of a block.

Two optional additive terms on the logits serve Swin-style window attention (B = windows):
``logits[b, h] = scale_h q_h k_hᵀ + bias[h] + mask[b % nW]``.

- ``bias`` [H, N, N]: a learned per-head term (Swin's relative position bias, already gathered), shared
  by every window; the op returns its gradient, Σ_b dlogits[b, h], in bias's dtype.
- ``mask`` [nW, N, N]: a constant per window (Swin's shifted-window mask, 0 / -100, -inf allowed), window
  b using ``mask[b % nW]`` (timm's layout: an image's windows are consecutive, images major). It gets no
  gradient: a mask that requires grad is refused rather than silently treated as a constant.

Both may be any float dtype; kernels read them in fp32 (fp64 for fp64 qkv). A query whose logits are
all -inf (a fully masked row) gets a zero output and zero gradients instead of NaN.

Public API: :func:`uneven_attention` (the differentiable ``torch.ops.nvit.uneven_attention`` custom
op; backend per :func:`nvit_kernels.dispatch.select`) and :func:`uneven_attention_reference`
(float64 ground truth).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from . import _native, dispatch
from .layout import head_spans, qkv_width

OP = "attention"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by every backend, the fake impl included: it checks what it can see).
# --------------------------------------------------------------------------------------------------
def _check_lists(qk_dims: Sequence[int], v_dims: Sequence[int], scales: Sequence[float]) -> None:
    if len(qk_dims) == 0:
        raise ValueError("nvit: uneven_attention: qk_dims is empty (need at least one head)")
    if not (len(qk_dims) == len(v_dims) == len(scales)):
        raise ValueError(
            f"nvit: uneven_attention: qk_dims, v_dims and scales must have one entry per head; "
            f"got lengths {len(qk_dims)}, {len(v_dims)}, {len(scales)}")
    for name, dims in (("qk_dims", qk_dims), ("v_dims", v_dims)):
        for h, d in enumerate(dims):
            if int(d) != d or d < 1:
                raise ValueError(f"nvit: uneven_attention: {name}[{h}] = {d}; every head dim must be an integer >= 1")
    for h, s in enumerate(scales):
        if not math.isfinite(float(s)):
            raise ValueError(f"nvit: uneven_attention: scales[{h}] = {s} is not finite")


@functools.lru_cache(maxsize=1024)
def _checked_width(qk_dims: tuple, v_dims: tuple, scales: tuple) -> int:
    """qkv's width for valid head lists (validated once per distinct lists: a model has a few)."""
    _check_lists(qk_dims, v_dims, scales)
    return qkv_width(qk_dims, v_dims)


def _check(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int], scales: Sequence[float]) -> None:
    try:
        width = _checked_width(tuple(qk_dims), tuple(v_dims), tuple(scales))
    except TypeError:  # unhashable entries: validate without the cache (it raises if they are bad)
        _check_lists(qk_dims, v_dims, scales)
        width = qkv_width(qk_dims, v_dims)
    if not isinstance(qkv, Tensor):
        raise TypeError(f"nvit: uneven_attention: qkv must be a Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"nvit: uneven_attention: qkv must be [B, N, sum(2*qk+v)], got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"nvit: uneven_attention: qkv dtype {qkv.dtype} unsupported; "
                        "expected float32, float16, bfloat16 or float64")
    if qkv.shape[-1] != width:
        raise ValueError(f"nvit: uneven_attention: qkv last dim is {qkv.shape[-1]} but the head dims need "
                         f"sum(2*qk_dims + v_dims) = {width}")
    if not qkv.is_contiguous():
        raise ValueError("nvit: uneven_attention: qkv must be contiguous (pass the qkv Linear's output, "
                         "or call .contiguous())")


def _check_extras(qkv: Tensor, heads: int, bias: Tensor | None, mask: Tensor | None) -> None:
    """bias [H, N, N] and mask [nW, N, N] (B a multiple of nW): float, on qkv's device. Cheap (no data read)."""
    N = qkv.shape[1]
    for name, t, lead in (("bias", bias, "H"), ("mask", mask, "nW")):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"nvit: uneven_attention: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"nvit: uneven_attention: {name} dtype {t.dtype} unsupported; expected a float dtype")
        if t.device != qkv.device:
            raise ValueError(f"nvit: uneven_attention: {name} is on {t.device} but qkv is on {qkv.device}")
        if t.dim() != 3 or t.shape[1] != N or t.shape[2] != N:
            raise ValueError(f"nvit: uneven_attention: {name} must be [{lead}, N, N] = [{lead}, {N}, {N}], "
                             f"got shape {tuple(t.shape)}")
    if bias is not None and bias.shape[0] != heads:
        raise ValueError(f"nvit: uneven_attention: bias must be [H, N, N] with H = {heads} heads, "
                         f"got shape {tuple(bias.shape)}")
    if mask is not None:
        nw = mask.shape[0]
        if nw < 1:
            raise ValueError("nvit: uneven_attention: mask has no window (shape [0, N, N])")
        if qkv.shape[0] % nw != 0:
            raise ValueError(f"nvit: uneven_attention: the batch ({qkv.shape[0]} windows) must be a multiple of "
                             f"the mask's nW = {nw} (window b uses mask[b % nW])")


def _refuse_mask_grad(mask: Tensor | None, grad_enabled: bool) -> None:
    # The mask is a constant by contract; refusing beats returning a silent zero (or missing) gradient.
    if mask is not None and mask.requires_grad and grad_enabled:
        raise ValueError("nvit: uneven_attention: mask requires grad, but the op treats it as a constant and "
                         "returns no gradient for it; pass mask.detach() (or a buffer)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _head_qkv(qkv: Tensor, span, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of the head at `span` (a :class:`~nvit_kernels.layout.HeadSpan`), in the accumulation dtype."""
    return qkv[..., span.q].to(acc), qkv[..., span.k].to(acc), qkv[..., span.v].to(acc)


# --------------------------------------------------------------------------------------------------
# Reference backend: one matmul chain per head in fp32 (fp64 for fp64 input). Runs anywhere.
# --------------------------------------------------------------------------------------------------
def _additive(qkv: Tensor, bias: Tensor | None, mask: Tensor | None, acc: torch.dtype):
    """(bias [H, N, N], mask expanded to [B, N, N]) in `acc`, either None when absent."""
    b = None if bias is None else bias.to(acc)
    m = None if mask is None else mask.to(acc).repeat(qkv.shape[0] // mask.shape[0], 1, 1)  # row b = mask[b % nW]
    return b, m


def _logits(q: Tensor, k: Tensor, s: float, h: int, bias: Tensor | None, mask: Tensor | None) -> Tensor:
    x = (q @ k.transpose(-1, -2)) * s
    if bias is not None:
        x = x + bias[h]
    if mask is not None:
        x = x + mask
    return x


def _softmax(x: Tensor, extras: bool) -> Tensor:
    """Softmax over the last dim; with bias/mask, a row of all -inf gives zeros (torch.softmax: NaN)."""
    if not extras:
        return torch.softmax(x, dim=-1)
    m = x.amax(-1, keepdim=True).detach()  # a stabiliser: the result does not depend on it
    e = torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = e.sum(-1, keepdim=True)
    return e / torch.where(l > 0, l, torch.ones_like(l))


def _reference_forward(qkv: Tensor, qk_dims, v_dims, scales, bias=None, mask=None) -> Tensor:
    acc = _acc_dtype(qkv.dtype)
    spans = head_spans(qk_dims, v_dims)
    bias_a, mask_a = _additive(qkv, bias, mask, acc)
    extras = bias is not None or mask is not None
    outs = []
    for h, s in enumerate(scales):
        q, k, v = _head_qkv(qkv, spans[h], acc)
        p = _softmax(_logits(q, k, s, h, bias_a, mask_a), extras)
        outs.append((p @ v).to(qkv.dtype))
    return torch.cat(outs, dim=-1)


def _reference_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, qk_dims, v_dims, scales, bias=None,
                        mask=None) -> tuple[Tensor, Tensor | None]:
    """(grad_qkv, grad_bias in the accumulation dtype or None without bias); recomputes the softmax, so
    `out` (the forward's output, which the fused kernels read) goes unused."""
    acc = _acc_dtype(qkv.dtype)
    spans = head_spans(qk_dims, v_dims)
    bias_a, mask_a = _additive(qkv, bias, mask, acc)
    extras = bias is not None or mask is not None
    grads, gbias = [], []
    for h, s in enumerate(scales):
        q, k, v = _head_qkv(qkv, spans[h], acc)
        do = grad_out[..., spans[h].out].to(acc)
        p = _softmax(_logits(q, k, s, h, bias_a, mask_a), extras)
        dv_ = p.transpose(-1, -2) @ do
        dp = do @ v.transpose(-1, -2)
        dlogits = p * (dp - (dp * p).sum(-1, keepdim=True))
        grads += [(dlogits @ k) * s, (dlogits.transpose(-1, -2) @ q) * s, dv_]
        if bias is not None:
            gbias.append(dlogits.sum(0))
    return torch.cat(grads, dim=-1).to(qkv.dtype), (torch.stack(gbias) if bias is not None else None)


# --------------------------------------------------------------------------------------------------
# Entry points: dispatch picks the backend, whose implementation comes from the tables below.
# --------------------------------------------------------------------------------------------------
def _forward_impl(qkv: Tensor, qk_dims, v_dims, scales, bias=None, mask=None) -> Tensor:
    run = _FORWARD.select(qkv.device)
    if qkv.numel() == 0:  # B == 0 or N == 0: nothing to launch
        return qkv.new_zeros((qkv.shape[0], qkv.shape[1], sum(v_dims)))
    return run(qkv, qk_dims, v_dims, scales, bias, mask)


def _backward_impl(grad_out: Tensor, qkv: Tensor, out: Tensor, qk_dims, v_dims, scales, bias=None,
                   mask=None) -> tuple[Tensor, Tensor]:
    """(grad_qkv, grad_bias in bias's dtype; an empty tensor when bias is None)."""
    grad_qkv, grad_bias = _backward_backend(grad_out, qkv, out, qk_dims, v_dims, scales, bias, mask)
    if bias is None:
        return grad_qkv, qkv.new_empty(0)
    return grad_qkv, grad_bias.to(bias.dtype)


def _backward_backend(grad_out, qkv, out, qk_dims, v_dims, scales, bias, mask):
    run = _BACKWARD.select(qkv.device)
    if qkv.numel() == 0:
        return torch.zeros_like(qkv), (None if bias is None else torch.zeros(bias.shape, device=qkv.device))
    return run(grad_out, qkv.contiguous(), out, qk_dims, v_dims, scales, bias, mask)


# --------------------------------------------------------------------------------------------------
# Triton backend (triton_attention imports triton: loaded when it first runs).
# --------------------------------------------------------------------------------------------------
def _triton_forward(qkv, qk_dims, v_dims, scales, bias=None, mask=None):
    from . import triton_attention
    return triton_attention.forward(qkv, qk_dims, v_dims, scales, bias=bias, mask=mask)


def _triton_backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias=None, mask=None):
    from . import triton_attention
    return triton_attention.backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias=bias, mask=mask)


# --------------------------------------------------------------------------------------------------
# Native backends (the compiled extension: C++ for CPU tensors, CUDA forward).
# --------------------------------------------------------------------------------------------------
def _kernel_table(t: Tensor | None, qkv: Tensor) -> Tensor | None:
    """bias/mask as the native kernels read them: contiguous, fp32 (fp64 for fp64 qkv). [H|nW, N, N] is
    small next to the attention itself, so the copy (when one is needed at all) costs little."""
    return None if t is None else t.to(_acc_dtype(qkv.dtype)).contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpp_has_attention(extras: bool = False) -> bool:
    # An extension built before the attention kernels (or before their bias/mask arguments) existed.
    return (_native.available() and hasattr(_native._C, "uneven_attention_forward")
            and (not extras or hasattr(_native._C, "attention_bias_mask")))


def _cpp_forward(qkv, qk_dims, v_dims, scales, bias=None, mask=None):
    extras = bias is not None or mask is not None
    if not _cpp_has_attention(extras):
        why = "the built extension has no attention kernels" + (" taking bias/mask" if extras else "")
        dispatch.warn_fallback(OP, "cpp", why + "; rebuild it", "reference")
        return _reference_forward(qkv, qk_dims, v_dims, scales, bias, mask)
    bias_t, mask_t = _kernel_table(bias, qkv), _kernel_table(mask, qkv)
    out = qkv.new_empty((qkv.shape[0], qkv.shape[1], sum(v_dims)))
    args = (qkv.data_ptr(), out.data_ptr(), qkv.shape[0], qkv.shape[1], _native.dtype_code(qkv), qk_dims, v_dims,
            scales, torch.get_num_threads())
    if extras:
        _native._C.uneven_attention_forward(*args, _ptr(bias_t), _ptr(mask_t), 0 if mask is None else mask.shape[0])
    else:
        _native._C.uneven_attention_forward(*args)
    return out


def _cpp_backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias=None, mask=None):
    extras = bias is not None or mask is not None
    if not _cpp_has_attention(extras):
        why = "the built extension has no attention kernels" + (" taking bias/mask" if extras else "")
        dispatch.warn_fallback(OP, "cpp", why + "; rebuild it", "reference")
        return _reference_backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias, mask)
    grad_out = grad_out.to(qkv.dtype).contiguous()
    out = out.contiguous()
    grad_qkv = torch.empty_like(qkv)
    bias_t, mask_t = _kernel_table(bias, qkv), _kernel_table(mask, qkv)
    grad_bias = None if bias is None else torch.empty(bias.shape, dtype=bias_t.dtype)
    args = (grad_out.data_ptr(), qkv.data_ptr(), out.data_ptr(), grad_qkv.data_ptr(), qkv.shape[0], qkv.shape[1],
            _native.dtype_code(qkv), qk_dims, v_dims, scales, torch.get_num_threads())
    if extras:
        _native._C.uneven_attention_backward(*args, _ptr(bias_t), _ptr(mask_t), 0 if mask is None else mask.shape[0],
                                             _ptr(grad_bias))
    else:
        _native._C.uneven_attention_backward(*args)
    return grad_qkv, grad_bias


def _cuda_forward(qkv, qk_dims, v_dims, scales, bias=None, mask=None):
    C = _native._C
    extras = bias is not None or mask is not None
    if not hasattr(C, "uneven_attention_forward_cuda"):
        raise RuntimeError("nvit: uneven_attention: the extension was built without the CUDA attention kernel; "
                           "rebuild it or use the triton backend")
    if extras and not hasattr(C, "attention_bias_mask"):
        raise RuntimeError("nvit: uneven_attention: the built CUDA attention kernel takes no bias/mask; rebuild it "
                           "or use the triton backend")
    if max(max(qk_dims), max(v_dims)) > C.attention_cuda_max_dim:
        raise ValueError(f"nvit: uneven_attention: the CUDA kernel takes head dims <= {C.attention_cuda_max_dim}, "
                         f"got max {max(max(qk_dims), max(v_dims))}; use the triton backend")
    if qkv.dtype == torch.float64:
        raise TypeError("nvit: uneven_attention: the CUDA kernel takes float32/float16/bfloat16, not float64")
    out = qkv.new_empty((qkv.shape[0], qkv.shape[1], sum(v_dims)))
    args = (qkv.data_ptr(), out.data_ptr(), qkv.shape[0], qkv.shape[1], _native.dtype_code(qkv), qk_dims, v_dims,
            scales, _native.stream_handle(qkv.device))
    if extras:
        bias_t, mask_t = _kernel_table(bias, qkv), _kernel_table(mask, qkv)
        C.uneven_attention_forward_cuda(*args, _ptr(bias_t), _ptr(mask_t), 0 if mask is None else mask.shape[0])
    else:
        C.uneven_attention_forward_cuda(*args)
    return out


def _cuda_backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias=None, mask=None):
    """The CUDA kernels cover the forward only: the backward of a CUDA-backend forward runs the fused
    Triton backward when Triton can run, else the reference (per-head matmuls). Explicit, not silent."""
    if dispatch.can_run("triton", qkv.device)[0]:
        return _triton_backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias, mask)
    dispatch.warn_fallback(OP + " backward", "cuda", "no CUDA backward kernel and Triton is unavailable",
                           "reference")
    return _reference_backward(grad_out, qkv, out, qk_dims, v_dims, scales, bias, mask)


# One implementation per backend: forward (qkv, qk_dims, v_dims, scales, bias, mask) -> out, backward
# (grad_out, qkv, out, qk_dims, v_dims, scales, bias, mask) -> (grad_qkv, grad_bias or None).
_FORWARD = dispatch.Backends(OP, reference=_reference_forward, cpp=_cpp_forward, triton=_triton_forward,
                             cuda=_cuda_forward)
_BACKWARD = dispatch.Backends(OP, reference=_reference_backward, cpp=_cpp_backward, triton=_triton_backward,
                              cuda=_cuda_backward)


# --------------------------------------------------------------------------------------------------
# Custom ops. The output shape follows from the int lists, so the fake impls need no data.
# --------------------------------------------------------------------------------------------------
# Explicit schemas: torch < 2.5 cannot infer them from postponed (string) annotations.
@torch.library.custom_op("nvit::uneven_attention", mutates_args=(),
                         schema="(Tensor qkv, int[] qk_dims, int[] v_dims, float[] scales, Tensor? bias=None, "
                                "Tensor? mask=None) -> Tensor")
def _uneven_attention_op(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int],
                         scales: Sequence[float], bias: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    _check(qkv, qk_dims, v_dims, scales)
    _check_extras(qkv, len(qk_dims), bias, mask)
    return _forward_impl(qkv, list(qk_dims), list(v_dims), [float(s) for s in scales], bias, mask)


@_uneven_attention_op.register_fake
def _(qkv, qk_dims, v_dims, scales, bias=None, mask=None):
    _check(qkv, qk_dims, v_dims, scales)
    _check_extras(qkv, len(qk_dims), bias, mask)
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], sum(int(v) for v in v_dims)))


# grad_bias is always returned (a schema cannot make an output optional): empty [0] without bias.
@torch.library.custom_op("nvit::uneven_attention_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor qkv, Tensor out, int[] qk_dims, int[] v_dims, "
                                "float[] scales, Tensor? bias=None, Tensor? mask=None) -> (Tensor, Tensor)")
def _uneven_attention_backward_op(grad_out: Tensor, qkv: Tensor, out: Tensor, qk_dims: Sequence[int],
                                  v_dims: Sequence[int], scales: Sequence[float], bias: Tensor | None = None,
                                  mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(grad w.r.t. qkv (qkv's layout), grad w.r.t. bias (bias's dtype; empty without bias)).
    `out` is the forward's output (saves a softmax pass)."""
    grad_out = grad_out.contiguous()
    return _backward_impl(grad_out, qkv, out, list(qk_dims), list(v_dims), [float(s) for s in scales], bias, mask)


@_uneven_attention_backward_op.register_fake
def _(grad_out, qkv, out, qk_dims, v_dims, scales, bias=None, mask=None):
    _check_extras(qkv, len(qk_dims), bias, mask)
    return torch.empty_like(qkv), (qkv.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    qkv, qk_dims, v_dims, scales, bias, mask = inputs
    # A direct torch.ops call (the public function checks before any work). Autograd runs this with grad
    # mode off, and only when grad mode was on at the call.
    _refuse_mask_grad(mask, grad_enabled=True)
    ctx.save_for_backward(qkv, output, bias, mask)
    ctx.dims = (list(qk_dims), list(v_dims), [float(s) for s in scales])


def _backward(ctx, grad_out):
    qkv, out, bias, mask = ctx.saved_tensors
    qk_dims, v_dims, scales = ctx.dims
    grad_qkv, grad_bias = torch.ops.nvit.uneven_attention_backward(grad_out, qkv, out, qk_dims, v_dims, scales,
                                                                   bias, mask)
    return grad_qkv, None, None, None, (None if bias is None else grad_bias), None


_uneven_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _private_probes():
    """torch internals the eager fast path reads to know nothing is watching, or None where this torch
    lacks one of them (then every call goes through the op: correct, only ~30 µs slower a call)."""
    try:
        return (torch._C._len_torch_dispatch_stack, torch._C._is_torch_function_mode_enabled,
                torch._C._functorch.is_functorch_wrapped_tensor, torch.autograd._profiler_enabled)
    except AttributeError:
        return None


_PROBES = _private_probes()


def _plain_eager(qkv, bias=None, mask=None) -> bool:
    """Whether calling the op's implementation directly is indistinguishable from the op: plain
    tensors needing no autograd, and nothing (compiler, tracer, profiler, dispatch/function mode such
    as FlopCounterMode, functorch transform) that must see ``torch.ops.nvit.uneven_attention``."""
    if _PROBES is None:
        return False
    dispatch_depth, function_mode, functorch_wrapped, profiling = _PROBES
    grad = torch.is_grad_enabled()
    for t in (qkv, bias, mask):
        if t is None:
            continue
        if type(t) is not Tensor or (t.requires_grad and grad) or functorch_wrapped(t):
            return False
    return (not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not profiling()  # so torch.profiler lists the op
            and dispatch_depth() == 0
            and not function_mode())


def uneven_attention(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int], scales: Sequence[float], *,
                     bias: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """softmax(scale_h q_h k_hᵀ + bias[h] + mask[b % nW]) v_h for every head h, all heads in one call;
    differentiable (w.r.t. qkv and bias).

    qkv: contiguous [B, N, Σ_h (2 qk_dims[h] + v_dims[h])], per head [q_h | k_h | v_h], heads in order
    (float32/float16/bfloat16, float64 on the CPU and reference paths). Returns [B, N, Σ_h v_dims[h]]
    in qkv's dtype, heads back to back. Non-causal; softmax and accumulation in fp32.

    bias: optional [H, N, N] additive term per head, added after the scale and shared by all B (Swin's
    relative position bias); any float dtype, its gradient (summed over the batch) comes back in its dtype.
    mask: optional [nW, N, N] additive constant, batch element b using mask[b % nW] (Swin's shifted-window
    mask, timm's layout: windows of an image consecutive); B must be a multiple of nW. It gets no gradient,
    and a mask that requires grad raises. -inf entries are allowed: a query whose logits are all -inf gets
    a zero output (and zero gradients) rather than NaN.

    Plain eager inference skips the custom-op dispatch (~30 µs a call, as much as the whole kernel
    of a small block at batch 1) and runs the same implementation; autograd, torch.compile, tracing
    and dispatch modes go through ``torch.ops.nvit.uneven_attention``.
    """
    qk = [int(d) for d in qk_dims]
    vd = [int(d) for d in v_dims]
    sc = [float(s) for s in scales]
    _refuse_mask_grad(mask, torch.is_grad_enabled())
    if _plain_eager(qkv, bias, mask):
        _check(qkv, qk, vd, sc)
        _check_extras(qkv, len(qk), bias, mask)
        return _forward_impl(qkv, qk, vd, sc, bias, mask)
    return torch.ops.nvit.uneven_attention(qkv, qk, vd, sc, bias, mask)


def uneven_attention_reference(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int],
                               scales: Sequence[float], *, bias: Tensor | None = None,
                               mask: Tensor | None = None) -> Tensor:
    """Ground truth: a float64 per-head loop of plain PyTorch ops (autograd-differentiable, bias and
    mask included: the bias gradient is autograd's).

    Returns float64 [B, N, Σ v_dims] (compare against it; cast if you need qkv's dtype).
    """
    _check(qkv, qk_dims, v_dims, scales)
    _check_extras(qkv, len(qk_dims), bias, mask)
    x = qkv.to(torch.float64)
    bias64, mask64 = _additive(qkv, bias, mask, torch.float64)
    extras = bias is not None or mask is not None
    spans = head_spans(qk_dims, v_dims)
    outs = []
    for h, s in enumerate(scales):
        q, k, v = _head_qkv(x, spans[h], torch.float64)
        outs.append(_softmax(_logits(q, k, float(s), h, bias64, mask64), extras) @ v)
    return torch.cat(outs, dim=-1)

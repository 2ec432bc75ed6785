"""Attention whose heads each have their own QK and V width (pruned NViT blocks).

Head h of a block has ``qk_dims[h]`` query/key channels and ``v_dims[h]`` value channels. The fused
qkv Linear writes, per token, the heads back to back and each head as ``[q_h | k_h | v_h]``; the
output holds the heads' values back to back (``[B, N, sum(v_dims)]``), ready for the proj Linear.
No stock kernel takes uneven heads: padding every head to the widest wastes FLOPs and a Python loop
over heads drowns in launches, so one kernel call covers all heads of a block.

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
    """sum(2*qk + v) of valid head lists (validated once per distinct lists: a model has a few)."""
    _check_lists(qk_dims, v_dims, scales)
    return sum(2 * int(q) + int(v) for q, v in zip(qk_dims, v_dims))


def _check(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int], scales: Sequence[float]) -> None:
    try:
        width = _checked_width(tuple(qk_dims), tuple(v_dims), tuple(scales))
    except TypeError:  # unhashable entries: validate without the cache (it raises if they are bad)
        _check_lists(qk_dims, v_dims, scales)
        width = sum(2 * int(q) + int(v) for q, v in zip(qk_dims, v_dims))
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


def _head_offsets(qk_dims: Sequence[int], v_dims: Sequence[int]) -> tuple[list[int], list[int]]:
    """Start column of each head in qkv, and of its values in the output."""
    in_off, out_off, a, b = [], [], 0, 0
    for q, v in zip(qk_dims, v_dims):
        in_off.append(a)
        out_off.append(b)
        a += 2 * q + v
        b += v
    return in_off, out_off


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _head_qkv(qkv: Tensor, start: int, dq: int, dv: int, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of the head whose columns start at `start`, in the accumulation dtype."""
    return (qkv[..., start:start + dq].to(acc), qkv[..., start + dq:start + 2 * dq].to(acc),
            qkv[..., start + 2 * dq:start + 2 * dq + dv].to(acc))


# --------------------------------------------------------------------------------------------------
# Reference backend: one matmul chain per head in fp32 (fp64 for fp64 input). Runs anywhere.
# --------------------------------------------------------------------------------------------------
def _reference_forward(qkv: Tensor, qk_dims, v_dims, scales) -> Tensor:
    acc = _acc_dtype(qkv.dtype)
    in_off, _ = _head_offsets(qk_dims, v_dims)
    outs = []
    for h, (dq, dv, s) in enumerate(zip(qk_dims, v_dims, scales)):
        q, k, v = _head_qkv(qkv, in_off[h], dq, dv, acc)
        p = torch.softmax((q @ k.transpose(-1, -2)) * s, dim=-1)
        outs.append((p @ v).to(qkv.dtype))
    return torch.cat(outs, dim=-1)


def _reference_backward(grad_out: Tensor, qkv: Tensor, qk_dims, v_dims, scales) -> Tensor:
    acc = _acc_dtype(qkv.dtype)
    in_off, out_off = _head_offsets(qk_dims, v_dims)
    grads = []
    for h, (dq, dv, s) in enumerate(zip(qk_dims, v_dims, scales)):
        q, k, v = _head_qkv(qkv, in_off[h], dq, dv, acc)
        do = grad_out[..., out_off[h]:out_off[h] + dv].to(acc)
        p = torch.softmax((q @ k.transpose(-1, -2)) * s, dim=-1)
        dv_ = p.transpose(-1, -2) @ do
        dp = do @ v.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * s
        grads += [ds @ k, ds.transpose(-1, -2) @ q, dv_]
    return torch.cat(grads, dim=-1).to(qkv.dtype)


# --------------------------------------------------------------------------------------------------
# Backend dispatch. Each entry point names the backend it runs; none falls back silently.
# --------------------------------------------------------------------------------------------------
def _forward_impl(qkv: Tensor, qk_dims, v_dims, scales) -> Tensor:
    backend = dispatch.select(OP, qkv.device)
    if qkv.numel() == 0:  # B == 0 or N == 0: nothing to launch
        return qkv.new_zeros((qkv.shape[0], qkv.shape[1], sum(v_dims)))
    if backend == "reference":
        return _reference_forward(qkv, qk_dims, v_dims, scales)
    if backend == "cpp":
        return _cpp_forward(qkv, qk_dims, v_dims, scales)
    if backend == "triton":
        from . import triton_attention
        return triton_attention.forward(qkv, qk_dims, v_dims, scales)
    if backend == "cuda":
        return _cuda_forward(qkv, qk_dims, v_dims, scales)
    raise AssertionError(backend)


def _backward_impl(grad_out: Tensor, qkv: Tensor, out: Tensor, qk_dims, v_dims, scales) -> Tensor:
    backend = dispatch.select(OP, qkv.device)
    if qkv.numel() == 0:
        return torch.zeros_like(qkv)
    qkv = qkv.contiguous()
    if backend == "cpp":
        return _cpp_backward(grad_out, qkv, out, qk_dims, v_dims, scales)
    if backend == "triton":
        from . import triton_attention
        return triton_attention.backward(grad_out, qkv, out, qk_dims, v_dims, scales)
    if backend == "cuda":
        # The CUDA kernels cover the forward only; the backward of a CUDA-backend forward runs the fused
        # Triton backward when Triton can run, else the reference (per-head matmuls). Explicit, not silent.
        if dispatch.can_run("triton", qkv.device)[0]:
            from . import triton_attention
            return triton_attention.backward(grad_out, qkv, out, qk_dims, v_dims, scales)
        dispatch._warn_once(OP + " backward", "cuda", "no CUDA backward kernel and Triton is unavailable",
                            "reference")
        return _reference_backward(grad_out, qkv, qk_dims, v_dims, scales)
    return _reference_backward(grad_out, qkv, qk_dims, v_dims, scales)


def _cpp_has_attention() -> bool:
    return _native.available() and hasattr(_native._C, "uneven_attention_forward")


def _cpp_forward(qkv, qk_dims, v_dims, scales):
    if not _cpp_has_attention():  # an extension built before the attention kernels existed
        dispatch._warn_once(OP, "cpp", "the built extension has no attention kernels; rebuild it", "reference")
        return _reference_forward(qkv, qk_dims, v_dims, scales)
    out = qkv.new_empty((qkv.shape[0], qkv.shape[1], sum(v_dims)))
    _native._C.uneven_attention_forward(qkv.data_ptr(), out.data_ptr(), qkv.shape[0], qkv.shape[1],
                                        _native.dtype_code(qkv), qk_dims, v_dims, scales, torch.get_num_threads())
    return out


def _cpp_backward(grad_out, qkv, out, qk_dims, v_dims, scales):
    if not _cpp_has_attention():
        dispatch._warn_once(OP, "cpp", "the built extension has no attention kernels; rebuild it", "reference")
        return _reference_backward(grad_out, qkv, qk_dims, v_dims, scales)
    grad_out = grad_out.to(qkv.dtype).contiguous()
    out = out.contiguous()
    grad_qkv = torch.empty_like(qkv)
    _native._C.uneven_attention_backward(grad_out.data_ptr(), qkv.data_ptr(), out.data_ptr(), grad_qkv.data_ptr(),
                                         qkv.shape[0], qkv.shape[1], _native.dtype_code(qkv), qk_dims, v_dims,
                                         scales, torch.get_num_threads())
    return grad_qkv


def _cuda_forward(qkv, qk_dims, v_dims, scales):
    C = _native._C
    if not hasattr(C, "uneven_attention_forward_cuda"):
        raise RuntimeError("nvit: uneven_attention: the extension was built without the CUDA attention kernel; "
                           "rebuild it or use the triton backend")
    if max(max(qk_dims), max(v_dims)) > C.attention_cuda_max_dim:
        raise ValueError(f"nvit: uneven_attention: the CUDA kernel takes head dims <= {C.attention_cuda_max_dim}, "
                         f"got max {max(max(qk_dims), max(v_dims))}; use the triton backend")
    if qkv.dtype == torch.float64:
        raise TypeError("nvit: uneven_attention: the CUDA kernel takes float32/float16/bfloat16, not float64")
    out = qkv.new_empty((qkv.shape[0], qkv.shape[1], sum(v_dims)))
    C.uneven_attention_forward_cuda(qkv.data_ptr(), out.data_ptr(), qkv.shape[0], qkv.shape[1],
                                    _native.dtype_code(qkv), qk_dims, v_dims, scales,
                                    _native.stream_handle(qkv.device))
    return out


# --------------------------------------------------------------------------------------------------
# Custom ops. The output shape follows from the int lists, so the fake impls need no data.
# --------------------------------------------------------------------------------------------------
# Explicit schemas: torch < 2.5 cannot infer them from postponed (string) annotations.
@torch.library.custom_op("nvit::uneven_attention", mutates_args=(),
                         schema="(Tensor qkv, int[] qk_dims, int[] v_dims, float[] scales) -> Tensor")
def _uneven_attention_op(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int],
                         scales: Sequence[float]) -> Tensor:
    _check(qkv, qk_dims, v_dims, scales)
    return _forward_impl(qkv, list(qk_dims), list(v_dims), [float(s) for s in scales])


@_uneven_attention_op.register_fake
def _(qkv, qk_dims, v_dims, scales):
    _check(qkv, qk_dims, v_dims, scales)
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], sum(int(v) for v in v_dims)))


@torch.library.custom_op("nvit::uneven_attention_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor qkv, Tensor out, int[] qk_dims, int[] v_dims, "
                                "float[] scales) -> Tensor")
def _uneven_attention_backward_op(grad_out: Tensor, qkv: Tensor, out: Tensor, qk_dims: Sequence[int],
                                  v_dims: Sequence[int], scales: Sequence[float]) -> Tensor:
    """Gradient w.r.t. qkv (same layout as qkv). `out` is the forward's output (saves a softmax pass)."""
    grad_out = grad_out.contiguous()
    return _backward_impl(grad_out, qkv, out, list(qk_dims), list(v_dims), [float(s) for s in scales])


@_uneven_attention_backward_op.register_fake
def _(grad_out, qkv, out, qk_dims, v_dims, scales):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, qk_dims, v_dims, scales = inputs
    ctx.save_for_backward(qkv, output)
    ctx.dims = (list(qk_dims), list(v_dims), [float(s) for s in scales])


def _backward(ctx, grad_out):
    qkv, out = ctx.saved_tensors
    qk_dims, v_dims, scales = ctx.dims
    return torch.ops.nvit.uneven_attention_backward(grad_out, qkv, out, qk_dims, v_dims, scales), None, None, None


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


def _plain_eager(qkv) -> bool:
    """Whether calling the op's implementation directly is indistinguishable from the op: a plain
    tensor needing no autograd, and nothing (compiler, tracer, profiler, dispatch/function mode such
    as FlopCounterMode, functorch transform) that must see ``torch.ops.nvit.uneven_attention``."""
    if _PROBES is None:
        return False
    dispatch_depth, function_mode, functorch_wrapped, profiling = _PROBES
    return (type(qkv) is Tensor
            and not (qkv.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not profiling()  # so torch.profiler lists the op
            and dispatch_depth() == 0
            and not function_mode()
            and not functorch_wrapped(qkv))


def uneven_attention(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int],
                     scales: Sequence[float]) -> Tensor:
    """softmax(scale_h q_h k_hᵀ) v_h for every head h, all heads in one call; differentiable.

    qkv: contiguous [B, N, Σ_h (2 qk_dims[h] + v_dims[h])], per head [q_h | k_h | v_h], heads in order
    (float32/float16/bfloat16, float64 on the CPU and reference paths). Returns [B, N, Σ_h v_dims[h]]
    in qkv's dtype, heads back to back. Non-causal, no mask; softmax and accumulation in fp32.

    Plain eager inference skips the custom-op dispatch (~30 µs a call, as much as the whole kernel
    of a small block at batch 1) and runs the same implementation; autograd, torch.compile, tracing
    and dispatch modes go through ``torch.ops.nvit.uneven_attention``.
    """
    qk = [int(d) for d in qk_dims]
    vd = [int(d) for d in v_dims]
    sc = [float(s) for s in scales]
    if _plain_eager(qkv):
        _check(qkv, qk, vd, sc)
        return _forward_impl(qkv, qk, vd, sc)
    return torch.ops.nvit.uneven_attention(qkv, qk, vd, sc)


def uneven_attention_reference(qkv: Tensor, qk_dims: Sequence[int], v_dims: Sequence[int],
                               scales: Sequence[float]) -> Tensor:
    """Ground truth: a float64 per-head loop of plain PyTorch ops (autograd-differentiable).

    Returns float64 [B, N, Σ v_dims] (compare against it; cast if you need qkv's dtype).
    """
    _check(qkv, qk_dims, v_dims, scales)
    x = qkv.to(torch.float64)
    in_off, _ = _head_offsets(qk_dims, v_dims)
    outs = []
    for h, (dq, dv, s) in enumerate(zip(qk_dims, v_dims, scales)):
        q, k, v = _head_qkv(x, in_off[h], dq, dv, torch.float64)
        outs.append(torch.softmax((q @ k.transpose(-1, -2)) * float(s), dim=-1) @ v)
    return torch.cat(outs, dim=-1)

"""Which backend runs an op: the fastest one available for the tensor's device.

CUDA tensors: Triton or the CUDA kernels (``NVIT_CUDA_BACKEND=triton|cuda`` or
:func:`set_cuda_backend`; Triton by default). CPU tensors: the C++ kernels. When the preferred
backend is unavailable the next one runs, and a warning says so once per (op, backend) pair.
Tests and benchmarks force a backend with :func:`use_backend`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

from . import _native

BACKENDS = ("triton", "cuda", "cpp", "reference")
_state = threading.local()
_cuda_backend = os.environ.get("NVIT_CUDA_BACKEND", "triton")
_warned: set[tuple[str, str]] = set()


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_native_usable() -> bool:
    return _native.cuda_compiled() and _native.cuda_device_count()[0] > 0


def set_cuda_backend(name: str) -> None:
    """Pick the default backend for CUDA tensors: "triton" or "cuda"."""
    global _cuda_backend
    if name not in ("triton", "cuda"):
        raise ValueError(f"nvit: CUDA backend must be 'triton' or 'cuda', got {name!r}")
    _cuda_backend = name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force one backend inside the block (it raises if that backend cannot run the tensors)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"nvit: unknown backend {name!r}; choose from {BACKENDS}")
    prev = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = prev


def can_run(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run on tensors of `device`, and why not."""
    if backend == "reference":
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, "the C++ kernels take CPU tensors"
        return (_native.available(), f"extension not built ({_native.LOAD_ERROR})")
    if backend == "cuda":
        if device.type != "cuda":
            return False, "the CUDA kernels take CUDA tensors"
        if not _native.cuda_compiled():
            return False, "extension built without CUDA" if _native.available() else "extension not built"
        n, why = _native.cuda_device_count()
        return (n > 0, f"the extension's CUDA runtime sees no device ({why})")
    if backend == "triton":
        if not triton_importable():
            return False, "triton is not installed"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpreter():
            return True, ""
        return False, "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    raise ValueError(f"nvit: unknown backend {backend!r}")


def _warn_once(op: str, wanted: str, why: str, chosen: str) -> None:
    if (op, chosen) in _warned:
        return
    _warned.add((op, chosen))
    warnings.warn(f"nvit: {op}: {wanted} backend unavailable ({why}); running the {chosen} backend",
                  RuntimeWarning, stacklevel=3)


def select(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device`."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        ok, why = can_run(forced, device)
        if not ok:
            raise RuntimeError(f"nvit: {op}: backend {forced!r} cannot run here: {why}")
        return forced
    if device.type == "cuda":
        order = [_cuda_backend, "cuda" if _cuda_backend == "triton" else "triton", "reference"]
    else:
        order = ["cpp", "reference"]
    first_why = ""
    for i, b in enumerate(order):
        ok, why = can_run(b, device)
        if ok:
            if i > 0:
                _warn_once(op, order[0], first_why, b)
            return b
        if i == 0:
            first_why = why
    return "reference"  # unreachable: the reference always runs

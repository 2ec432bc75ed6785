"""Which backend runs an op: the fastest one available for the tensor's device.

CUDA tensors: Triton or the CUDA kernels (``NVIT_CUDA_BACKEND=triton|cuda`` or
:func:`set_cuda_backend`; Triton by default). CPU tensors: the C++ kernels. When the preferred
backend is unavailable the next one runs, and a warning says so once per (op, backend) pair --
unless the preferred backend is the compiled extension and that extension exists but cannot be
loaded (see ``_native``): then selecting raises, unless ``NVIT_ALLOW_REFERENCE=1``.
Tests and benchmarks force a backend with :func:`use_backend`; :func:`used` tells which backends
the automatic choice ran the ops on (what a run reports).

Each op holds a :class:`Backends` table, one implementation per backend of :data:`BACKENDS`
(``table.select(device)`` returns the chosen one), so adding a backend is one entry per op's table and
the ops never re-dispatch by name. An implementation that cannot do its work after all (an extension
built without that kernel) runs another and says so with :func:`warn_fallback`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re
import threading
import warnings

import torch

from . import _native

BACKENDS = ("triton", "cuda", "cpp", "reference")
_state = threading.local()
_cuda_backend = os.environ.get("NVIT_CUDA_BACKEND", "triton")
_warned: set[tuple[str, str]] = set()
_used: dict[str, dict[str, set[str]]] = {}  # op -> device type -> backends selected


# The oldest Triton the Triton kernels are verified with: Triton 3.0/3.1 (paired with torch 2.4/2.5)
# compute wrong results in their CPU interpreter even for a trivial kernel, so nothing vouches for them.
TRITON_MIN = (3, 2)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(whether the installed Triton can run nvit's Triton kernels, why not)."""
    if not triton_importable():
        return False, "triton is not installed"
    v = importlib.metadata.version("triton")
    if tuple(int(x) for x in re.findall(r"\d+", v)[:2]) < TRITON_MIN:
        return False, f"triton {v} is older than {'.'.join(map(str, TRITON_MIN))}, the oldest nvit's kernels are tested with"
    return True, ""


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_native_usable() -> bool:
    return _native.cuda_compiled() and _native.cuda_device_count()[0] > 0


def cuda_backend() -> str:
    """The default backend for CUDA tensors ("triton" or "cuda"; see :func:`set_cuda_backend`)."""
    return _cuda_backend


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
        return (_native.available(), f"extension not loaded: {_native.LOAD_ERROR}")
    if backend == "cuda":
        if device.type != "cuda":
            return False, "the CUDA kernels take CUDA tensors"
        if not _native.cuda_compiled():
            return False, ("extension built without CUDA" if _native.available()
                           else f"extension not loaded: {_native.LOAD_ERROR}")
        n, why = _native.cuda_device_count()
        return (n > 0, f"the extension's CUDA runtime sees no device ({why})")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpreter():
            return True, ""
        return False, "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    raise ValueError(f"nvit: unknown backend {backend!r}")


def warn_fallback(op: str, wanted: str, why: str, chosen: str) -> None:
    """Say (a RuntimeWarning, once per (op, chosen) pair) that `op` runs the `chosen` backend because
    the `wanted` one cannot run it, and why."""
    if (op, chosen) in _warned:
        return
    _warned.add((op, chosen))
    warnings.warn(f"nvit: {op}: {wanted} backend unavailable ({why}); running the {chosen} backend",
                  RuntimeWarning, stacklevel=3)


def preference(device: torch.device) -> list[str]:
    """Backends for tensors on `device`, fastest first (the reference always runs)."""
    if device.type == "cuda":
        return [_cuda_backend, "cuda" if _cuda_backend == "triton" else "triton", "reference"]
    return ["cpp", "reference"]


def _choose(op: str, device: torch.device) -> tuple[str, str]:
    """(backend, why the preferred one cannot run -- '' when it runs or was forced)."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        ok, why = can_run(forced, device)
        if not ok:
            raise RuntimeError(f"nvit: {op}: backend {forced!r} cannot run here: {why}")
        return forced, ""
    order = preference(device)
    first_why = ""
    for i, b in enumerate(order):
        ok, why = can_run(b, device)
        if ok:
            if i > 0 and order[0] in ("cpp", "cuda"):
                _native.require_loaded()  # a built extension that cannot load is an error, not a notice
            return b, first_why
        if i == 0:
            first_why = why
    return "reference", first_why  # unreachable: the reference always runs


def resolve(op: str, device: torch.device) -> str:
    """The backend that would run `op` for tensors on `device` (raises like :func:`select`, silent)."""
    return _choose(op, device)[0]


def select(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device` now: a fallback is announced once, and the
    choice is recorded for :func:`used`."""
    b, why = _choose(op, device)
    if why:
        warn_fallback(op, preference(device)[0], why, b)
    if getattr(_state, "forced", None) is None:  # a backend forced by use_backend() is a test's choice
        _used.setdefault(op, {}).setdefault(device.type, set()).add(b)
    return b


def used() -> dict[str, dict[str, list[str]]]:
    """{op: {device type: [backends]}} the automatic choice selected in this process so far."""
    return {op: {d: sorted(bs) for d, bs in per_dev.items()} for op, per_dev in _used.items()}


class Backends:
    """One op's implementation per backend: ``Backends("attention", reference=f, cpp=g, triton=h,
    cuda=i)``. Every backend of :data:`BACKENDS` needs an entry (the implementations share one
    signature); :meth:`select` returns the one :func:`select` chooses for the device."""

    def __init__(self, op: str, **impls):
        missing, unknown = set(BACKENDS) - impls.keys(), impls.keys() - set(BACKENDS)
        if missing or unknown:
            raise ValueError(f"nvit: {op}: the backend table needs exactly {BACKENDS}; "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        self.op = op
        self.impls = dict(impls)

    def select(self, device: torch.device):
        """The implementation of the backend that runs the op for tensors on `device` now (see :func:`select`)."""
        return self.impls[select(self.op, device)]

    def __repr__(self) -> str:
        return f"Backends({self.op!r}, {', '.join(self.impls)})"

"""Loads the compiled extension (nvit_kernels._C) and converts torch facts to what it takes.

The extension has no torch dependency: it receives data pointers, sizes, dtype codes and the CUDA
stream handle. This module is the only place that knows that contract.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as e:  # not built (source checkout) or built for another Python
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def available() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled)


def cuda_device_count() -> tuple[int, str]:
    """(usable devices as our static CUDA runtime sees them, reason when 0)."""
    if _C is None:
        return 0, "extension not built"
    return tuple(_C.cuda_device_count())


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"nvit: unsupported dtype {t.dtype}; expected float32, float16 or bfloat16") from None


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on `device`, as an integer."""
    return torch.cuda.current_stream(device).cuda_stream

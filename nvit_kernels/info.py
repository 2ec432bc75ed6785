"""`python -m nvit_kernels.info`: which backends were built and which can run here, as JSON."""
from __future__ import annotations

import json
import sys

import torch

from . import _native, dispatch


def info() -> dict:
    n_dev, why = _native.cuda_device_count()
    triton_version = None
    if dispatch.triton_importable():
        try:
            import triton

            triton_version = triton.__version__
        except Exception as e:  # importable but broken: report, do not hide
            triton_version = f"import failed: {e}"
    archs = _native._C.cuda_archs if _native.cuda_compiled() else ""
    return {
        "cpu": _native.available(),
        "cpu_threads": _native._C.omp_max_threads() if _native.available() else None,
        "cuda_compiled": _native.cuda_compiled(),
        "cuda_archs": [a for a in archs.split(",") if a],
        "cuda_runtime_version": _native._C.cuda_runtime_version if _native.available() else None,
        "cuda_device": n_dev > 0,
        "cuda_device_count": n_dev,
        "cuda_device_reason": "" if n_dev > 0 else why,
        "triton_importable": triton_version is not None,
        "triton_usable": dispatch.triton_status()[0],  # new enough for nvit's Triton kernels
        "triton_version": triton_version,
        "triton_interpreter": dispatch.triton_interpreter(),
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "extension": getattr(_native._C, "__file__", None),
        "extension_state": _native.STATE,  # loaded | absent (torch-only install) | broken (see error)
        "extension_error": _native.LOAD_ERROR,
        "extension_source_digest": getattr(_native._C, "source_digest", None),
        "fallback_allowed": _native.fallback_allowed(),
        "cuda_backend_default": dispatch.cuda_backend(),
    }


OPS = ("saliency", "attention")


def backends(device: torch.device) -> dict:
    """What runs nvit's ops on `device`: the backends used so far in this process (or, for an op not
    yet called, the one that would run) and the extension's state. Raises RuntimeError, naming the
    cause, when a compiled extension exists but cannot load (unless NVIT_ALLOW_REFERENCE=1)."""
    used = dispatch.used()
    out = {}
    for op in OPS:
        seen = used.get(op, {}).get(device.type)
        out[op] = "+".join(seen) if seen else dispatch.resolve(op, device)
    out["extension"] = getattr(_native._C, "__file__", None)
    out["extension_state"] = _native.STATE
    if _native.LOAD_ERROR:
        out["extension_error"] = _native.LOAD_ERROR
    return out


def main() -> int:
    json.dump(info(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

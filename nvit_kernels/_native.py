"""Loads the compiled extension (nvit_kernels._C) and converts torch facts to what it takes.

The extension has no torch dependency: it receives data pointers, sizes, dtype codes and the CUDA
stream handle. This module is the only place that knows that contract, and the only one that
decides whether the extension loaded, and if not, why:

- ``STATE == "loaded"``: the module imported and, in a checkout, was built from these sources;
- ``STATE == "absent"``: no extension was built anywhere on the path (a torch-only deployment):
  the slower backends run after a one-time notice;
- ``STATE == "broken"``: an extension exists but cannot serve this process (built for another
  Python, built from other sources, fails to load, or shadowed by a source tree without one).
  That silently costs the whole speedup, so :func:`require_loaded` raises ``LOAD_ERROR`` unless
  ``NVIT_ALLOW_REFERENCE=1`` asks for the fallback.

The extension links no torch library, so it cannot be "built for another torch".
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

import torch

from ._sources import source_digest, source_root

PACKAGE_DIR = Path(__file__).resolve().parent
ALLOW_REFERENCE_ENV = "NVIT_ALLOW_REFERENCE"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _extension_files(directory: Path) -> list[Path]:
    """Compiled `_C` modules in `directory`, for any Python (``_C.cpython-312-….so``, ``_C.pyd``)."""
    return sorted(p for p in directory.glob("_C.*") if p.suffix in (".so", ".pyd", ".dylib"))


def _shadowed_installs() -> list[Path]:
    """Other `nvit_kernels` packages on sys.path that hold a compiled extension (hidden behind us)."""
    found = []
    for entry in sys.path:
        d = Path(entry or ".").resolve() / "nvit_kernels"
        if d != PACKAGE_DIR and d.is_dir() and _extension_files(d):
            found.append(d)
    return found


def _diagnose_missing(import_error: ImportError) -> tuple[str, str]:
    """(state, reason) when ``from . import _C`` failed."""
    here = _extension_files(PACKAGE_DIR)
    ours = [p for p in here if any(p.name == "_C" + s for s in importlib.machinery.EXTENSION_SUFFIXES)]
    if ours:
        return "broken", f"{ours[0]} exists but cannot be loaded ({type(import_error).__name__}: {import_error})"
    if here:
        return "broken", (f"{PACKAGE_DIR} holds an extension built for another Python "
                          f"({', '.join(p.name for p in here)}); this is {sys.implementation.cache_tag}, "
                          f"which needs _C{importlib.machinery.EXTENSION_SUFFIXES[0]}: rebuild with `pip install .`")
    shadowed = _shadowed_installs()
    if shadowed:
        return "broken", (f"the nvit_kernels package imported from {PACKAGE_DIR} has no compiled extension and "
                          f"shadows another one in {shadowed[0]} that has it (running from a source checkout puts it "
                          f"first on sys.path): run `pip install .` in this checkout, which places the extension "
                          f"here too, or run from outside the checkout")
    return "absent", "no compiled extension was built (torch-only installation)"


def _load():
    try:
        from . import _C as ext  # type: ignore[attr-defined]
    except ImportError as e:  # not built, built for another Python, or shadowed
        state, why = _diagnose_missing(e)
        return None, state, why
    root = source_root(PACKAGE_DIR)
    if root is not None:  # a checkout: the binary must come from exactly these sources
        built, current = getattr(ext, "source_digest", ""), source_digest(root)
        if built != current:
            what = f"sources with digest {built}" if built else "unrecorded sources"
            return None, "broken", (f"{ext.__file__} was built from {what}, but the sources in {root} have digest "
                                    f"{current} (they changed since the build): rebuild with `pip install .`")
    return ext, "loaded", ""


_C, STATE, _WHY = _load()
LOAD_ERROR: str | None = _WHY or None


def available() -> bool:
    return _C is not None


def fallback_allowed() -> bool:
    return os.environ.get(ALLOW_REFERENCE_ENV, "0") not in ("", "0")


def require_loaded() -> None:
    """Raise when a compiled extension exists but cannot be used, unless the fallback was asked for."""
    if STATE == "broken" and not fallback_allowed():
        raise RuntimeError(f"nvit: the compiled kernels cannot be used: {LOAD_ERROR}. "
                           f"Set {ALLOW_REFERENCE_ENV}=1 to run the (much slower) fallback backends anyway.")


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled)


def cuda_device_count() -> tuple[int, str]:
    """(usable devices as our static CUDA runtime sees them, reason when 0)."""
    if _C is None:
        return 0, f"extension not loaded ({LOAD_ERROR})"
    return tuple(_C.cuda_device_count())


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"nvit: unsupported dtype {t.dtype}; expected float32, float16 or bfloat16") from None


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on `device`, as an integer."""
    return torch.cuda.current_stream(device).cuda_stream

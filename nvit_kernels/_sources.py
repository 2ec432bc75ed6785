"""Identity of the native sources: a digest of everything the compiled extension is built from.

The build compiles this digest into ``nvit_kernels._C`` (``_C.source_digest``); when the package is
imported from a checkout (``csrc/`` beside it), the loader recomputes it and refuses a binary built
from other sources. This module imports nothing but the standard library, because ``setup.py`` loads
it by path before torch or the package can be imported: one definition serves both sides.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

# What the binary is made of: kernel sources and the build script that compiles them.
SOURCE_DIRS = ("csrc",)
SOURCE_FILES = ("CMakeLists.txt",)


def source_root(package_dir: Path) -> Path | None:
    """The checkout that holds the package's native sources, or None (an installed package)."""
    root = package_dir.resolve().parent
    if all((root / d).is_dir() for d in SOURCE_DIRS) and all((root / f).is_file() for f in SOURCE_FILES):
        return root
    return None


def source_digest(root: Path) -> str:
    """sha256 over the native sources under `root` (names and contents, in a fixed order), 16 hex."""
    files = [root / f for f in SOURCE_FILES]
    for d in SOURCE_DIRS:
        files += [p for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]

"""Datasets: the embedded Fashion-MNIST subset shipped in nvit/data, and users' own image folders via timm
(their transforms come from nvit.inputs).

The embedded subset is small (a few MB) and held in memory as tensors, so loading it is instant and needs no workers.
Regenerate it with `python scripts/make_fashion_subset.py` (see nvit/data/README.md).
"""
from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DATA_DIR = Path(__file__).resolve().parent / "data"
EMBEDDED_PATH = DATA_DIR / "fashion_mnist_subset.npz"
SPLITS = ("train", "test")
# Pixel mean/std of the embedded train split (scaled to [0, 1]); printed by scripts/make_fashion_subset.py.
EMBEDDED_MEAN = 0.2857
EMBEDDED_STD = 0.3521
NUM_CLASSES = 10
_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


@functools.lru_cache(maxsize=4)
def _load_npz(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"embedded dataset {p} not found; regenerate it with `python scripts/make_fashion_subset.py`")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"embedded dataset {p} is corrupt or not an .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise ValueError(f"embedded dataset {p} lacks arrays {missing} (has {sorted(arrays)})")
    for split in SPLITS:
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise ValueError(f"embedded dataset {p}: {split} arrays have unexpected shapes/dtypes "
                             f"{x.shape} {x.dtype} / {y.shape} {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise ValueError(f"embedded dataset {p}: {split} labels outside [0, {NUM_CLASSES})")
    return arrays


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def embedded_class_names(path: str | Path = EMBEDDED_PATH) -> tuple[str, ...]:
    return tuple(str(c) for c in _load_npz(str(path))["class_names"])


def normalize_uint8(images: torch.Tensor, mean: float = EMBEDDED_MEAN, std: float = EMBEDDED_STD) -> torch.Tensor:
    """uint8 [..., 28, 28] -> float32 normalised with `mean`/`std` (default: the embedded data's)."""
    return (images.float() / 255.0 - mean) / std


def load_embedded(split: str, path: str | Path = EMBEDDED_PATH, limit: int | None = None, *,
                  mean: float = EMBEDDED_MEAN, std: float = EMBEDDED_STD) -> TensorDataset:
    """The embedded Fashion-MNIST subset: images float32 [1, 28, 28] (normalised with `mean`/`std`, by
    default the embedded data's own statistics), labels int64.

    `limit` keeps the first `limit` samples (the file is already shuffled, so a prefix stays roughly balanced).
    """
    _check_split(split)
    arrays = _load_npz(str(path))
    x = torch.from_numpy(arrays[f"{split}_images"])
    y = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    return TensorDataset(normalize_uint8(x, mean, std).unsqueeze(1).contiguous(), y)


def _find_split_dir(root: Path, split: str) -> Path:
    aliases = {"val": ("val", "validation"), "validation": ("validation", "val"),
               "test": ("test",), "train": ("train",)}.get(split, (split,))
    for name in aliases:
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise FileNotFoundError(f"no '{split}' folder under {root} (expected {root}/{aliases[0]}/<class>/<image>; "
                            f"found folders {present})")


def image_folder(root: str | Path, split: str, transform, input_img_mode: str) -> Dataset:
    """root/<split>/<class>/<image> read by timm's folder reader with `transform` (a clear error if empty)."""
    from timm.data import create_dataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
    split_dir = _find_split_dir(root, split)
    empty = ValueError(f"image folder {split_dir} holds no images (expected <class>/<image> files)")
    try:
        ds = create_dataset("", root=str(split_dir), search_split=False, input_img_mode=input_img_mode,
                            transform=transform)
    except RuntimeError as e:  # timm's folder reader raises RuntimeError("Found 0 images ...")
        if "Found 0 images" in str(e):
            raise empty from e
        raise
    if len(ds) == 0:
        raise empty
    return ds

"""Data loading: the embedded Fashion-MNIST subset shipped in nvit/data, and users' own image folders via timm.

The embedded subset is small (a few MB) and held in memory as tensors, so loading it is instant and needs no workers.
Regenerate it with `python scripts/make_fashion_subset.py` (see nvit/data/README.md).
"""
from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

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


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 28, 28] -> float32 normalised with the embedded mean/std."""
    return (images.float() / 255.0 - EMBEDDED_MEAN) / EMBEDDED_STD


def load_embedded(split: str, path: str | Path = EMBEDDED_PATH, limit: int | None = None) -> TensorDataset:
    """The embedded Fashion-MNIST subset: images float32 [1, 28, 28] (normalised), labels int64.

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
    return TensorDataset(normalize_uint8(x).unsqueeze(1).contiguous(), y)


def _find_split_dir(root: Path, split: str) -> Path:
    aliases = {"val": ("val", "validation"), "validation": ("validation", "val"),
               "test": ("test",), "train": ("train",)}.get(split, (split,))
    for name in aliases:
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise FileNotFoundError(f"no '{split}' folder under {root} (expected {root}/{aliases[0]}/<class>/<image>; "
                            f"found folders {present})")


def load_image_folder(root: str | Path, split: str, img_size: int, in_chans: int,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      is_training: bool | None = None, crop_pct: float = 1.0, **transform_kwargs) -> Dataset:
    """A user's image folder (root/<split>/<class>/*.png|jpg) through timm's dataset and transform pipeline.

    in_chans 1 reads images as grayscale ("L"), 3 as RGB. mean/std default to the embedded statistics for one
    channel and to ImageNet's for three. is_training defaults to split == "train" (random-resized-crop + flip);
    extra keyword arguments go to timm.data.create_transform.
    """
    from timm.data import create_dataset, create_transform, resolve_data_config

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    split_dir = _find_split_dir(root, split)
    if mean is None or std is None:
        defaults = ((EMBEDDED_MEAN,), (EMBEDDED_STD,)) if in_chans == 1 else (None, None)
        mean = mean if mean is not None else defaults[0]
        std = std if std is not None else defaults[1]
    cfg_args = {"input_size": (in_chans, img_size, img_size), "crop_pct": crop_pct}
    if mean is not None:
        mean, std = tuple(mean), tuple(std)
        if len(mean) not in (1, in_chans) or len(std) not in (1, in_chans):
            raise ValueError(f"mean/std need 1 or {in_chans} values, got {mean} / {std}")
        cfg_args["mean"], cfg_args["std"] = mean, std  # timm repeats a single value over the channels
    cfg = resolve_data_config(cfg_args)
    if is_training is None:
        is_training = split == "train"
    transform = create_transform(**cfg, is_training=is_training, **transform_kwargs)
    empty = ValueError(f"image folder {split_dir} holds no images (expected <class>/<image> files)")
    try:
        ds = create_dataset("", root=str(split_dir), search_split=False,
                            input_img_mode="L" if in_chans == 1 else "RGB", transform=transform)
    except RuntimeError as e:  # timm's folder reader raises RuntimeError("Found 0 images ...")
        if "Found 0 images" in str(e):
            raise empty from e
        raise
    if len(ds) == 0:
        raise empty
    return ds


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """DataLoader whose order depends only on `seed` (its own generator, not the global RNG)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                      drop_last=drop_last, worker_init_fn=_seed_worker if num_workers else None,
                      persistent_workers=False)


def _seed_worker(worker_id: int) -> None:
    # Workers get torch seeds derived from the loader generator; keep numpy/random in step with them.
    import random
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)

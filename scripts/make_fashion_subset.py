#!/usr/bin/env python
"""Writes nvit/data/fashion_mnist_subset.npz: a seeded, class-balanced subset of Fashion-MNIST.

Source: Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`), i.e. the original
idx-ubyte gz files (60k train, 10k test, 28x28 uint8). The train subset is drawn from the original train split
and the test subset from the original test split, so they never overlap. Same arguments -> byte-identical arrays.

    python scripts/make_fashion_subset.py [--train-per-class 700 --test-per-class 150 --seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_SRC = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "nvit" / "data" / "fashion_mnist_subset.npz"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """Reads an idx-ubyte(.gz) file (magic 0x0000 08 <ndim>, big-endian dims, uint8 payload)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install the Debian package 'dataset-fashion-mnist' or pass --src")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: payload has {payload.size} bytes, header says {dims}")
    return payload.reshape(dims)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """per_class random indices of every class, then shuffled together (so no class-sorted order is shipped)."""
    picks = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(f"class {c} has only {idx.size} images, {per_class} requested")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder with the Fashion-MNIST idx-ubyte.gz files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--train-per-class", type=int, default=700)
    ap.add_argument("--test-per-class", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(args.src / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.src / f"{prefix}-labels-idx1-ubyte.gz")
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ValueError(f"{split}: unexpected shapes {images.shape} / {labels.shape}")
        idx = balanced_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[idx], dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_source_index"] = idx.astype(np.int32)  # provenance: row in the original split
    arrays["class_names"] = np.array(CLASS_NAMES)
    arrays["seed"] = np.array(args.seed, dtype=np.int64)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: write a temp file in the same folder, then rename over the target.
    fd, tmp = tempfile.mkstemp(prefix=args.out.name + ".", suffix=".tmp", dir=args.out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; this is package data, meant to be read by all
        os.replace(tmp, args.out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    train = arrays["train_images"].astype(np.float64) / 255.0
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"train {arrays['train_images'].shape}, test {arrays['test_images'].shape}; "
          f"train mean {train.mean():.6f} std {train.std():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded Fashion-MNIST subset, timm image folders and the subset-making script."""
import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nvit import datasets as D

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_SRC = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("split,n", [("train", 7000), ("test", 1500)])
def test_embedded_shapes_dtypes_balance(split, n):
    ds = D.load_embedded(split)
    x, y = ds.tensors
    assert len(ds) == n and x.shape == (n, 1, 28, 28) and y.shape == (n,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    img, label = ds[3]
    assert img.shape == (1, 28, 28) and label.dtype == torch.int64
    counts = torch.bincount(y, minlength=10)
    assert counts.tolist() == [n // 10] * 10
    assert torch.isfinite(x).all()


def test_embedded_normalisation_matches_constants():
    x = D.load_embedded("train").tensors[0]
    # The module's mean/std constants are the train split's statistics (rounded to 4 digits).
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    raw = np.load(D.EMBEDDED_PATH)["train_images"]
    assert torch.equal(D.normalize_uint8(torch.from_numpy(raw[:5])).unsqueeze(1), x[:5])


def test_embedded_metadata_and_limit():
    assert D.embedded_class_names() == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    with np.load(D.EMBEDDED_PATH) as f:
        for split in ("train", "test"):  # no image drawn twice from the original split
            idx = f[f"{split}_source_index"]
            assert len(np.unique(idx)) == len(idx)
    small = D.load_embedded("test", limit=37)
    assert len(small) == 37 and torch.equal(small.tensors[0], D.load_embedded("test").tensors[0][:37])
    with pytest.raises(ValueError, match="limit"):
        D.load_embedded("test", limit=0)
    assert D.EMBEDDED_PATH.stat().st_size <= 4.2e6


@pytest.mark.parametrize("split", ["val", "Train", "", "validation"])
def test_unknown_split(split):
    with pytest.raises(ValueError, match="unknown split"):
        D.load_embedded(split)


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_fashion_subset"):
        D.load_embedded("train", path=tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(ValueError, match="corrupt"):
        D.load_embedded("train", path=bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="lacks arrays"):
        D.load_embedded("train", path=partial)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([0, 12], np.uint8),
             test_images=np.zeros((1, 28, 28), np.uint8), test_labels=np.zeros(1, np.uint8),
             class_names=np.array(["a"]))
    with pytest.raises(ValueError, match="labels outside"):
        D.load_embedded("train", path=wrong)


def _write_pngs(root: Path, split: str, classes=("cat", "dog"), per_class=3, size=(20, 16)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")


def _eval_tf(c, size):
    from timm.data import create_transform

    return create_transform(input_size=(c, size, size), is_training=False, mean=(0.5,) * c, std=(0.25,) * c)


def test_image_folder_grayscale_and_rgb(tmp_path):
    _write_pngs(tmp_path, "train")
    _write_pngs(tmp_path, "validation", per_class=2)
    ds = D.image_folder(tmp_path, "train", _eval_tf(1, 28), "L")
    assert len(ds) == 6
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert sorted(int(ds[i][1]) for i in range(len(ds))) == [0, 0, 0, 1, 1, 1]
    val = D.image_folder(tmp_path, "val", _eval_tf(3, 24), "RGB")  # "val" finds "validation"
    assert len(val) == 4
    v0 = val[0][0]
    assert v0.shape == (3, 24, 24)
    assert torch.equal(v0, val[0][0])  # eval transform is deterministic
    assert [int(val[i][1]) for i in range(4)] == [0, 0, 1, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.image_folder(tmp_path / "missing", "train", _eval_tf(1, 28), "L")
    _write_pngs(tmp_path, "train", per_class=1)
    with pytest.raises(FileNotFoundError, match="no 'val' folder"):
        D.image_folder(tmp_path, "val", _eval_tf(1, 28), "L")
    (tmp_path / "test" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        D.image_folder(tmp_path, "test", _eval_tf(1, 28), "L")


def _script():
    spec = importlib.util.spec_from_file_location("make_fashion_subset", ROOT / "scripts" / "make_fashion_subset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_idx(path: Path, arr: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_make_subset_script_is_balanced_and_seeded(tmp_path):
    mod = _script()
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 60), ("t10k", 40)):
        labels = np.tile(np.arange(10), n // 10)
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[:, 0, 0] = np.arange(n)  # tag each image with its source row
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.npz"
        assert mod.main(["--src", str(tmp_path), "--out", str(out), "--train-per-class", "4",
                         "--test-per-class", "2", "--seed", str(seed)]) == 0
        outs.append(dict(np.load(out)))
    a, b, c = outs
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train_source_index"], c["train_source_index"])
    assert np.bincount(a["train_labels"]).tolist() == [4] * 10
    assert np.bincount(a["test_labels"]).tolist() == [2] * 10
    assert np.array_equal(a["train_images"][:, 0, 0], a["train_source_index"])  # labels/images stay paired
    assert np.array_equal(a["train_labels"], a["train_source_index"] % 10)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file
    ds = D.load_embedded("test", path=tmp_path / "a.npz")
    assert len(ds) == 20
    with pytest.raises(ValueError, match="requested"):
        mod.main(["--src", str(tmp_path), "--out", str(tmp_path / "d.npz"), "--train-per-class", "7"])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        mod.main(["--src", str(tmp_path / "none"), "--out", str(tmp_path / "e.npz")])


@pytest.mark.skipif(not DEBIAN_SRC.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_shipped_subset_regenerates_from_source(tmp_path):
    out = tmp_path / "regen.npz"
    _script().main(["--out", str(out)])  # defaults = the shipped file's arguments
    with np.load(out) as new, np.load(D.EMBEDDED_PATH) as shipped:
        assert sorted(new.files) == sorted(shipped.files)
        for k in new.files:
            assert np.array_equal(new[k], shipped[k]), k

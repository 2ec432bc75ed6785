"""The data path: the same batches whatever the workers, the ranks and the restart point."""
import numpy as np
import pytest
import torch

from nvit.loader import GlobalBatchSampler, pad_crop_flip, shard_range, train_loader


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    """An RGB image folder through timm's *random* train transform (random-resized-crop + flip)."""
    from PIL import Image
    from timm.data import create_transform

    from nvit.datasets import image_folder

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(d / f"{i}.png")
    tf = create_transform(input_size=(3, 16, 16), is_training=True, hflip=0.5)
    return image_folder(root, "train", tf, "RGB")


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_same_batches_with_0_and_2_workers(folder_dataset):
    kw = dict(global_batch=6, seed=3, phase="prune")
    a = _take(train_loader(folder_dataset, **kw, workers=0), 5)
    b = _take(train_loader(folder_dataset, **kw, workers=2), 5)
    assert _same(a, b)
    c = _take(train_loader(folder_dataset, global_batch=6, seed=4, phase="prune"), 5)
    assert not _same(a, c)  # the seed matters
    d = _take(train_loader(folder_dataset, global_batch=6, seed=3, phase="finetune"), 5)
    assert not _same(a, d)  # and so does the phase


def test_two_ranks_load_the_global_batch_of_one(folder_dataset):
    one = _take(train_loader(folder_dataset, global_batch=6, seed=0, phase="prune"), 6)
    r0 = _take(train_loader(folder_dataset, global_batch=6, seed=0, phase="prune", rank=0, world=2), 6)
    r1 = _take(train_loader(folder_dataset, global_batch=6, seed=0, phase="prune", rank=1, world=2, workers=2), 6)
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_resume_at_any_iteration(folder_dataset):
    full = _take(train_loader(folder_dataset, global_batch=6, seed=1, phase="prune"), 9)  # crosses 2 epochs
    later = _take(train_loader(folder_dataset, global_batch=6, seed=1, phase="prune", start=5), 4)
    assert _same(full[5:], later)


def test_sampler_epochs_and_errors():
    s = GlobalBatchSampler(10, 4, seed=0, phase="prune", iterations=5)
    assert s.per_epoch == 2 and len(s) == 5
    first_epoch = torch.cat([s.global_indices(0), s.global_indices(1)])
    assert len(set(first_epoch.tolist())) == 8  # no repeats within an epoch
    with pytest.raises(ValueError, match="multiple of the world size"):
        GlobalBatchSampler(10, 5, seed=0, phase="prune", world=2)
    with pytest.raises(ValueError, match="empty"):
        GlobalBatchSampler(0, 4, seed=0, phase="prune")


def test_shards_cover_everything_once():
    for n in (0, 1, 7, 10):
        for w in (1, 2, 3):
            got = [i for r in range(w) for i in shard_range(n, r, w)]
            assert got == list(range(n))


def test_pad_crop_flip_is_seeded_by_the_global_rng():
    f = pad_crop_flip(2, True, fill=0.0)
    x = torch.randn(1, 8, 8)
    torch.manual_seed(5)
    a = f(x)
    torch.manual_seed(5)
    assert torch.equal(f(x), a) and a.shape == x.shape

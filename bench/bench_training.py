"""The training side: what nvit's scoring and masking add to a training step, and the data path.

prune_step   images/s of one pruning-phase iteration (forward + backward + fused saliency + optimizer step +
             masking) against a plain timm training step of the same model and batch (forward + backward +
             optimizer step), interleaved rounds, min of each. extra_info: prune_overhead = nvit / plain − 1
             (target ≤ 0.03), images_per_s of both.
prune_time   wall time of one Pruner.prune_step on DeiT-B's units (ranking, guards, mask update and
             zeroing; target ≤ 50 ms on the CPU machine), both granularities. extra_info: prune_step_ms.
data_path    images/s of nvit's training DataLoader over a JPEG image folder with timm's random-resized-crop
             transform at 224 px, with 0 and 2 worker processes (extra_info: images_per_s,
             speedup_vs_0_workers).
CPU here (fp32, torch's threads); on a GPU the same file runs bf16 when one is present (DeiT-B at batch 128
then too).
Quick mode (quickmode.py): batches 8 / 2, every model cut to 2 blocks, a 16-image folder, one round each.
"""
from __future__ import annotations

import os
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from nvit import engine
from nvit.loader import train_loader
from nvit.pruner import Pruner, Target
from quickmode import pick

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AMP = "bf16" if DEVICE.type == "cuda" else "none"


def _small():  # the embedded task's shape (quick: 2 of its 6 blocks)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=pick(6, 2),
                             num_heads=4)


DEIT_KW = pick({}, {"depth": 2})
CASES = {f"small_b{pick(64, 8)}": (_small, pick(64, 8), (1, 28, 28)),
         f"deit_s_b{pick(8, 2)}": (lambda: timm.create_model("deit_small_patch16_224", **DEIT_KW), pick(8, 2),
                                   (3, 224, 224)),
         f"deit_b_b{pick(128, 2)}": (lambda: timm.create_model("deit_base_patch16_224", **DEIT_KW), pick(128, 2),
                                     (3, 224, 224))}
ON_CUDA = {"deit_b_b128", "deit_b_b2"}  # DeiT-B training steps: benchmarked on a GPU only


def _min_interleaved(fns, rounds):
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.skipif(c in ON_CUDA and DEVICE.type != "cuda",
                                                                         reason="needs a CUDA device"))
                                  for c in CASES])
def test_prune_step_overhead(benchmark, case):
    make, B, shape = CASES[case]
    torch.manual_seed(0)
    prec = engine.Precision(AMP, DEVICE)
    x = torch.randn(B, *shape, device=DEVICE)
    y = torch.randint(0, 10, (B,), device=DEVICE)

    def trainer(with_nvit: bool):
        m = make().to(DEVICE).train()
        pruner = Pruner(m, Target("flops", 0.5)) if with_nvit else None
        opt = engine.make_optimizer(m, 1e-4, 0.05)

        def step():
            with prec.autocast():
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=False)
            prec.backward(loss)
            if pruner is not None and prec.unscale(opt):
                pruner.accumulate()
            prec.step(opt)
            if pruner is not None:
                pruner.apply_masks()
        return step

    plain, ours = trainer(False), trainer(True)
    plain(), ours()  # warm up (allocations, first custom-op call)
    rounds = pick(12 if case.startswith("small") else 4, 1)
    t_plain, t_ours = _min_interleaved([plain, ours], rounds)
    benchmark.extra_info.update(model=case, batch=B, device=str(DEVICE), amp=AMP, threads=torch.get_num_threads(),
                                loadavg=round(os.getloadavg()[0], 2), ms_plain_timm_step=t_plain * 1e3,
                                ms_nvit_prune_step=t_ours * 1e3, images_per_s_plain=B / t_plain,
                                images_per_s_nvit=B / t_ours, prune_overhead=round(t_ours / t_plain - 1, 4))
    benchmark.pedantic(ours, rounds=1, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("gran", ["aligned", "per-head"])
def test_prune_step_time(benchmark, gran):
    torch.manual_seed(0)
    pruner = Pruner(timm.create_model("deit_base_patch16_224", **DEIT_KW), Target("flops", 0.2), granularity=gran,
                    group_size={"mlp": 16, "embed": 8, "qk": 2, "v": 2})
    g = torch.Generator().manual_seed(0)

    def step():
        pruner.scores.copy_(torch.rand(pruner.scores.shape, generator=g))
        pruner.n_batches = 1
        pruner.prune_step(64)

    step()  # first call: allocations
    times = []
    for _ in range(pick(5, 1)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    benchmark.extra_info.update(granularity=gran, units=pruner.units.num_units, prune_step_ms=round(min(times) * 1e3, 2),
                                loadavg=round(os.getloadavg()[0], 2))
    benchmark.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(pick(48, 4)):
            Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8")).save(d / f"{i}.jpg", quality=90)
    return root


_DATA_RATE: dict[int, float] = {}


@pytest.mark.parametrize("workers", [0, 2])
def test_data_path(benchmark, jpeg_folder, workers):
    from timm.data import create_transform

    from nvit.datasets import image_folder

    tf = create_transform(input_size=(3, 224, 224), is_training=True)
    ds = image_folder(jpeg_folder, "train", tf, "RGB")
    B, n_batches = pick((32, 18), (8, 2))  # enough batches that worker start-up (part of an epoch too) is not all of it

    def epoch():
        for i, _ in enumerate(train_loader(ds, global_batch=B, seed=0, phase="prune", workers=workers,
                                           iterations=n_batches)):
            pass

    epoch()  # warm the page cache
    t = min(_min_interleaved([epoch], pick(2, 1)))
    _DATA_RATE[workers] = B * n_batches / t
    benchmark.extra_info.update(workers=workers, batch=B, images_per_s=round(_DATA_RATE[workers], 1),
                                loadavg=round(os.getloadavg()[0], 2), cores=os.cpu_count())
    if workers and 0 in _DATA_RATE:
        benchmark.extra_info["speedup_vs_0_workers"] = round(_DATA_RATE[workers] / _DATA_RATE[0], 3)
    benchmark.pedantic(epoch, rounds=1, iterations=1, warmup_rounds=0)

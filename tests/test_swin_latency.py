"""Latency tables of NViT-Swin blocks: one per stage, timing the stage's window block (its map, window,
tokens per window, number of windows, shift); the Pruner prunes a Swin to a latency target with them."""
import torch

from nvit import Pruner, Target
from nvit.latency import SwinLatencyTables
from nvit.structures import Adapter
from test_swin import ODD, SMALL, _image, tiny_swin
from _pruning import prune_until_done

FAST = dict(points=2, embed_points=1, warmup=0, repeats=1, use_cache=False, progress=False)


def test_one_table_per_stage_timing_its_windows():
    a = Adapter(tiny_swin(ODD))
    cfg = a.nvit_config(a.full_masks())
    lat = SwinLatencyTables.measure(cfg, batch_size=2, **FAST)
    assert len(lat.tables) == 3 and lat.covers(cfg)
    for s, t in enumerate(lat.tables):
        shifted = next(cfg.geometry(i) for i, b in enumerate(cfg.blocks) if b.stage == s and i % 2 == 1)
        assert t.meta["extra"]["swin_window"] == [list(g) for g in shifted] and t.meta["tokens"] == (ODD["img_size"] // ODD["patch_size"]) ** 2 // 4 ** s \
            or s == 2  # (stage 2's 3×3 map: its window shrank to the map and does not shift)
        assert t.grid.embed == [cfg.embed_dims[s]]
    assert lat.model_latency(cfg) > 0


def test_pruner_meets_a_latency_target_on_swin():
    model = tiny_swin(SMALL, embed_dim=32)  # blocks large enough that their dims, not overheads, set the time
    a = Adapter(model)
    lat = SwinLatencyTables.measure(a.nvit_config(a.full_masks()), batch_size=8, points=3, embed_points=2, warmup=1,
                                    repeats=5, statistic="min", use_cache=False, progress=False).monotonized()
    pruner = Pruner(model, Target("latency", 0.8), latency_table=lat, granularity="per-head")
    x, y = _image(SMALL, 4), torch.tensor([0, 1, 2, 3])
    prune_until_done(pruner, model, x, y, 20)
    nv = pruner.convert()
    with torch.no_grad():
        assert (model(x) - nv(x)).abs().max().item() <= 1e-5 * model(x).abs().max().item()
    assert lat.model_latency(nv.config) <= 0.8 * pruner.dense_cost["latency"]

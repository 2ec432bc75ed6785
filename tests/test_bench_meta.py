"""An Adapter on a model built under ``with torch.device("meta")`` (shapes only, nothing allocated), as
bench/bench_saliency.py builds DeiT-S/B's saliency maps: the spec's bookkeeping (slice indices, unit ids,
masks) stays on the CPU with real values, identical to a CPU-built model's. Before the fix the slice
indices were meta tensors and Slice's boolean indexing raised (no nonzero() on meta)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from nvit.structures import Adapter
from nvit_kernels.saliency import SaliencyPlan


def _vit():
    return VisionTransformer(img_size=16, patch_size=4, num_classes=5, embed_dim=24, depth=2, num_heads=3,
                             mlp_ratio=2.0)


def _swin():
    return timm.models.swin_transformer.SwinTransformer(img_size=56, patch_size=4, embed_dim=16, depths=(2, 2),
                                                        num_heads=(2, 4), window_size=7, num_classes=5,
                                                        mlp_ratio=2.0)


def _eva():
    return timm.models.eva.Eva(img_size=28, patch_size=14, num_classes=5, embed_dim=24, depth=2, num_heads=3,
                               global_pool="avg", use_fc_norm=True, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                               use_rot_pos_emb=True, ref_feat_shape=(2, 2), qkv_bias=True)


def _view(adapter: Adapter, granularity: str):
    """Everything the spec derives without touching parameter values."""
    named, ui = adapter.saliency_maps(granularity, branches=True)
    maps = [(p.shape, m.rows, m.cols, m.row_maps, m.col_maps) for p, m in named]
    masks = adapter.full_masks()
    slices = {n: [(s.kind, s.block, s.index, s.head, s.table_at) for s in ss] for n, ss in adapter.slices.items()}
    return maps, ui, masks, slices, adapter.nvit_config(masks)


def _cpu_tensors(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.device.type == "cpu"
    if isinstance(x, (list, tuple)):
        return all(_cpu_tensors(v) for v in x)
    if isinstance(x, dict):
        return all(_cpu_tensors(v) for v in x.values())
    return True


def _on_meta(make):
    """`make()` under the meta device, or a skip where timm itself cannot build it there (timm 1.0.16's
    ViT constructor calls .item() on its drop-path schedule; nothing of nvit's runs before that)."""
    try:
        return make()
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        pytest.skip(f"timm {timm.__version__} cannot build this model on the meta device ({e})")


@pytest.mark.parametrize("make", [_vit, _swin, _eva], ids=["vit", "swin", "eva"])
@pytest.mark.parametrize("granularity", ["aligned", "per-head"])
def test_adapter_on_meta_model_matches_cpu(make, granularity):
    ref = _view(Adapter(make()), granularity)
    with torch.device("meta"):
        model = _on_meta(make)
        assert next(model.parameters()).is_meta
        got = _view(Adapter(model), granularity)
    (maps, ui, masks, slices, cfg), (r_maps, r_ui, r_masks, r_slices, r_cfg) = got, ref
    assert _cpu_tensors([m[3:] for m in maps]) and _cpu_tensors(slices) and _cpu_tensors(masks.state_dict())
    assert _cpu_tensors([ui.kind, ui.block, ui.head, ui.index])
    assert len(maps) == len(r_maps)
    for (shape, rows, cols, rm, cm), (r_shape, r_rows, r_cols, r_rm, r_cm) in zip(maps, r_maps):
        assert (shape, rows, cols) == (r_shape, r_rows, r_cols)
        assert len(rm) == len(r_rm) and all(torch.equal(a, b) for a, b in zip(rm, r_rm))
        assert len(cm) == len(r_cm) and all(torch.equal(a, b) for a, b in zip(cm, r_cm))
    for f in ("kind", "block", "head", "index"):
        assert torch.equal(getattr(ui, f), getattr(r_ui, f))
    assert slices.keys() == r_slices.keys()
    for n in slices:
        for s, r in zip(slices[n], r_slices[n], strict=True):
            assert s[:2] == r[:2] and all(torch.equal(a, b) for a, b in zip((*s[2:4], *s[4]), (*r[2:4], *r[4])))
    assert masks.equal(r_masks)
    assert cfg == r_cfg


def test_bench_saliency_fixture_on_meta():
    """bench_saliency's fixture: DeiT-S built on meta, its maps turned into a saliency plan on the CPU."""
    with torch.device("meta"):
        model = _on_meta(lambda: timm.create_model("deit_small_patch16_224"))
        named, ui = Adapter(model).saliency_maps("aligned")
    maps = [m for _, m in named]
    plan = SaliencyPlan.build(maps, ui.num_units, device=torch.device("cpu"))
    assert ui.num_units > 0 and plan is not None
    # one unit per embedding channel, 12 blocks x (6 heads + 64 QK + 64 V + 1536 MLP), aligned
    assert ui.num_units == 384 + 12 * (6 + 64 + 64 + 1536)

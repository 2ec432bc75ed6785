"""Headless backbones and timm's feature API: a converted model hands out what the masked model hands out
-- values and shapes, at the source's embedding width with zeros in the pruned channels -- from forward
(a headless model's pooled features), forward_features, forward_head(pre_logits=True) and
forward_intermediates (also after prune_intermediate_layers), for ViT variants (DINOv2-like registers,
CLIP pre-norm, distilled, avg pooling), EVA-02 and Swin; after nvit.save / nvit.load too; the scatter
exports to ONNX; configs written before the output mapping load and behave as before."""
import copy
import inspect
import json

import pytest
import timm
import torch

import nvit
from nvit import export as E
from nvit.model import NViT, NViTConfig
from nvit.model_swin import NViTSwin
from nvit.structures import Adapter
from _vit_factory import random_masks, tiny_vit
from test_swin import ODD, _image, tiny_swin

onnx_ready = pytest.mark.skipif(any(__import__("importlib").util.find_spec(p) is None for p in E.ONNX_PACKAGES),
                                reason='ONNX export needs pip install ".[export]"')

HEADLESS_VIT = ["plain", "dinov2_reg", "clip_prenorm", "distilled", "reg_avg_fcnorm", "no_final_norm"]


def _masked_and_converted(model, gran="per-head", seed=0, p=0.35):
    """(masked model, converted model, masks); the embedding loses channels (checked)."""
    a = Adapter(model)
    M = random_masks(a, gran, seed, p=p)
    a.install_norms(M)
    a.apply_masks(M)
    assert not all(bool(e.all()) for e in M.embeds)
    return model, a.convert(M), M


def _same(ref, out, tol=1e-5):
    """Equal values and shapes, recursively through tuples, lists and dicts."""
    if isinstance(ref, dict):
        assert ref.keys() == out.keys()
        for k in ref:
            _same(ref[k], out[k], tol)
    elif isinstance(ref, (tuple, list)):
        assert type(ref) is type(out) and len(ref) == len(out)
        for r, o in zip(ref, out):
            _same(r, o, tol)
    else:
        assert ref.shape == out.shape, (ref.shape, out.shape)
        assert (ref - out).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def _check_outputs(masked, nv, x, pruned_channels=None):
    with torch.no_grad():
        for fn in ("forward", "forward_features"):
            _same(getattr(masked, fn)(x), getattr(nv, fn)(x))
        feats = masked.forward_features(x)
        _same(masked.forward_head(feats, pre_logits=True), nv.forward_head(nv.forward_features(x), pre_logits=True))
        _same(masked.forward_head(feats), nv.forward_head(nv.forward_features(x)))  # dense features in
        out = nv(x)
        if pruned_channels is not None and nv.config.num_classes == 0:
            assert out[..., pruned_channels].abs().max() == 0  # what the masked model has there
    return out


def _round_trip(nv, tmp_path, x, name="m"):
    nvit.save(nv, tmp_path / name)
    back = nvit.load(tmp_path / name)
    with torch.no_grad():
        for fn in ("forward", "forward_features"):
            assert torch.equal(getattr(back, fn)(x), getattr(nv, fn)(x))
    assert json.loads((tmp_path / name / "config.json").read_text())["num_features"] == nv.config.out_dim
    return back


@pytest.mark.parametrize("variant", HEADLESS_VIT)
def test_headless_vit_returns_the_masked_models_features_at_its_width(variant, tmp_path):
    model = tiny_vit(variant, num_classes=0, depth=3)
    masked, nv, M = _masked_and_converted(model)
    x = torch.randn(2, 3, 16, 16)
    out = _check_outputs(masked, nv, x, pruned_channels=~M.embed)
    assert out.shape == (2, 24) and nv.config.embed_dim < 24 == nv.config.out_dim == nv.num_features
    assert nv.config.embed_index == M.embed.nonzero().flatten().tolist()
    _round_trip(nv, tmp_path, x)


@pytest.mark.parametrize("variant", ["plain", "distilled", "reg_avg_fcnorm"])
def test_classifier_model_keeps_its_features_width_and_logits(variant):
    masked, nv, _ = _masked_and_converted(tiny_vit(variant, num_classes=5))
    x = torch.randn(2, 3, 16, 16)
    assert _check_outputs(masked, nv, x).shape == (2, 5)
    assert nv.forward_features(x).shape[-1] == 24 and nv.head.in_features == nv.config.embed_dim < 24


def test_re_pruned_nvit_maps_its_channels_back_to_the_first_source(tmp_path):
    model = tiny_vit("dinov2_reg", num_classes=0, embed_dim=30)
    _, nv, M = _masked_and_converted(model, seed=1)
    masked2, nv2, M2 = _masked_and_converted(copy.deepcopy(nv), seed=2)
    x = torch.randn(2, 3, 16, 16)
    _check_outputs(masked2, nv2, x)
    first = M.embed.nonzero().flatten()
    assert nv2.config.embed_index == first[M2.embed].tolist() and nv2.config.out_dim == 30
    with torch.no_grad():  # the twice-pruned model's features sit where the source's channels were
        assert nv2(x)[:, ~M.embed].abs().max() == 0
    _round_trip(nv2, tmp_path, x)


def test_eva02_tiny_headless(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, num_classes=0).eval()
    masked, nv, M = _masked_and_converted(model, p=0.4)
    x = torch.randn(2, 3, 56, 56)
    out = _check_outputs(masked, nv, x, pruned_channels=~M.embed)
    assert out.shape == (2, 192) and nv.config.rope_dim
    _round_trip(nv, tmp_path, x)


def _headless_swin(seed=0):
    m = tiny_swin(ODD, seed=seed)
    m.reset_classifier(0)
    return m.eval()


def test_swin_headless(tmp_path):
    masked, nv, M = _masked_and_converted(_headless_swin())
    x = _image(ODD)
    out = _check_outputs(masked, nv, x, pruned_channels=~M.embeds[-1])
    dims = [ODD["embed_dim"] * 2 ** s for s in range(3)]
    assert out.shape == (2, dims[-1]) and nv.config.out_dims() == dims
    assert nv.forward_features(x).shape == masked.forward_features(x).shape
    _round_trip(nv, tmp_path, x)


def test_swin_t_headless():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0).eval()
    masked, nv, _ = _masked_and_converted(model, p=0.5)
    x = torch.randn(1, 3, 224, 224)
    assert _check_outputs(masked, nv, x, ).shape == (1, 768)
    with torch.no_grad():
        _same(masked.forward_intermediates(x, norm=True), nv.forward_intermediates(x, norm=True))


# ---- forward_intermediates --------------------------------------------------------------------------
VIT_CALLS = [dict(), dict(norm=True), dict(indices=2, output_fmt="NLC"), dict(indices=[0, -1], stop_early=True),
             dict(indices=[1], return_prefix_tokens=True, intermediates_only=True),
             dict(output_dict=True, return_prefix_tokens=True, norm=True),
             dict(output_dict=True, intermediates_only=True)]


def _call(model, x, kw):
    if "output_dict" in kw and "output_dict" not in inspect.signature(model.forward_intermediates).parameters:
        pytest.skip(f"timm {timm.__version__}'s forward_intermediates has no output_dict")
    with torch.no_grad():
        return model.forward_intermediates(x, **kw)


@pytest.mark.parametrize("variant, num_classes", [("plain", 0), ("dinov2_reg", 0), ("clip_prenorm", 0),
                                                  ("distilled", 5), ("reg_avg_fcnorm", 5)])
@pytest.mark.parametrize("kw", VIT_CALLS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_vit_forward_intermediates_equal_the_masked_models(variant, num_classes, kw):
    masked, nv, _ = _masked_and_converted(tiny_vit(variant, num_classes=num_classes, depth=3))
    x = torch.randn(2, 3, 16, 16)
    ref, out = _call(masked, x, kw), _call(nv, x, kw)
    _same(ref, out)
    first = (ref["image_intermediates"] if isinstance(ref, dict) else ref if kw.get("intermediates_only") else ref[1])[0]
    first = first[0] if isinstance(first, tuple) else first
    assert first.shape[1 if kw.get("output_fmt", "NCHW") == "NCHW" else -1] == 24


@pytest.mark.parametrize("kw", [dict(), dict(norm=True, indices=[0, 2]), dict(output_fmt="NLC", intermediates_only=True),
                                dict(return_prefix_tokens=True, indices=1)], ids=str)
def test_eva_forward_intermediates_equal_the_masked_models(kw):
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, num_classes=0, depth=3).eval()
    masked, nv, _ = _masked_and_converted(model, p=0.4)
    x = torch.randn(2, 3, 56, 56)
    _same(_call(masked, x, kw), _call(nv, x, kw))


@pytest.mark.parametrize("kw", [dict(), dict(norm=True), dict(indices=[0, 1], intermediates_only=True),
                                dict(indices=1, stop_early=True, norm=True)], ids=str)
def test_swin_forward_intermediates_equal_the_masked_models(kw):
    masked, nv, _ = _masked_and_converted(tiny_swin(ODD))
    x = _image(ODD)
    ref, out = _call(masked, x, kw), _call(nv, x, kw)
    _same(ref, out)
    if not kw:  # every stage's map at its source width
        assert [t.shape[1] for t in out[1]] == [ODD["embed_dim"] * 2 ** s for s in range(3)]
        assert nv.config.embed_dims < [ODD["embed_dim"] * 2 ** s for s in range(3)]


def test_vit_prune_intermediate_layers_then_save_and_load(tmp_path):
    masked, nv, _ = _masked_and_converted(tiny_vit("dinov2_reg", num_classes=5, depth=4))
    x = torch.randn(2, 3, 16, 16)
    assert masked.prune_intermediate_layers([0, 2]) == nv.prune_intermediate_layers([0, 2]) == [0, 2]
    assert len(nv.blocks) == len(nv.config.blocks) == 3 and nv.config.num_classes == 0
    for kw in (dict(indices=[0, 2], intermediates_only=True), dict(indices=[0, 2], norm=True)):
        _same(_call(masked, x, kw), _call(nv, x, kw))
    with torch.no_grad():
        _same(masked(x), nv(x))  # no classifier, no pooling: every token, at the source's width
    back = _round_trip(nv, tmp_path, x)
    _same(_call(nv, x, dict(indices=[0, 2])), _call(back, x, dict(indices=[0, 2])))
    assert nv.prune_intermediate_layers(1, prune_norm=True) == [2]
    assert not nv.config.final_norm
    back = _round_trip(nv, tmp_path, x, "m2")
    _same(_call(nv, x, dict(indices=1)), _call(back, x, dict(indices=1)))


def test_swin_prune_intermediate_layers_then_save_and_load(tmp_path):
    masked, nv, _ = _masked_and_converted(tiny_swin(ODD))
    x = _image(ODD)
    assert masked.prune_intermediate_layers([0, 1]) == nv.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(nv.layers) == len(nv.config.embed_dims) == 2 and nv.config.num_classes == 0
    assert not nv.config.final_norm and nv.config.out_dim == 2 * ODD["embed_dim"] == nv.num_features
    kw = dict(indices=[0, 1], intermediates_only=True)
    _same(_call(masked, x, kw), _call(nv, x, kw))
    back = _round_trip(nv, tmp_path, x)
    _same(_call(nv, x, kw), _call(back, x, kw))


def test_reset_classifier_reads_the_pruned_stream():
    _, nv, _ = _masked_and_converted(tiny_vit("plain", num_classes=0))
    nv.reset_classifier(7)
    assert nv.head.in_features == nv.config.embed_dim and nv(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert nv.config.num_classes == 7 and nv.pretrained_cfg["num_classes"] == 7


# ---- export and compatibility -----------------------------------------------------------------------
@onnx_ready
def test_headless_models_export_to_onnx(tmp_path):
    _, nv, _ = _masked_and_converted(tiny_vit("dinov2_reg", num_classes=0, depth=3))
    assert E.export(nv, tmp_path / "vit.onnx", fmt="onnx", log=lambda *_: None) <= 1e-4  # verified: Pad + Gather
    _, sw, _ = _masked_and_converted(_headless_swin())
    assert E.export(sw, tmp_path / "swin.onnx", fmt="onnx", batch="2", log=lambda *_: None) <= 1e-4


@pytest.mark.parametrize("swin", [False, True], ids=["vit", "swin"])
def test_configs_without_the_output_mapping_load_as_before(swin, tmp_path):
    model = _headless_swin() if swin else tiny_vit("plain", num_classes=0)
    _, nv, _ = _masked_and_converted(model)
    nvit.save(nv, tmp_path / "m")
    f = tmp_path / "m" / "config.json"
    d = json.loads(f.read_text())
    new = ("dense_embed_dims", "embed_indices", "final_norm", "global_pool", "drop_path_rates", "drop_rate",
           "proj_drop_rate", "attn_drop_rate") if swin else (
        "dense_embed_dim", "embed_index", "drop_path_rates", "drop_rate", "pos_drop_rate", "proj_drop_rate",
        "attn_drop_rate")
    for k in new:
        del d["model_args"]["config"][k]
    f.write_text(json.dumps(d))
    old = nvit.load(tmp_path / "m")
    assert isinstance(old, NViTSwin if swin else NViT)
    assert (old.config.embed_indices if swin else old.config.embed_index) is None
    x = _image(ODD) if swin else torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = old.forward_features(x)
        assert feats.shape[-1] == old.config.embed_dim == old.num_features  # the pruned width, as before
        assert torch.equal(nv._features(x), feats)
        kept = (nv.config.embed_indices[-1] if swin else nv.config.embed_index)
        assert torch.equal(nv(x)[..., kept], old(x))  # the headless output: the pruned width's channels


def test_config_validates_the_output_mapping():
    base = dict(img_size=16, patch_size=4, in_chans=3, num_classes=0, embed_dim=2,
                blocks=[dict(qk_dims=[2], v_dims=[2], mlp=4, scales=[1.0])])
    NViTConfig(**base, dense_embed_dim=4, embed_index=[3, 1])
    for bad in (dict(dense_embed_dim=4, embed_index=[1, 1]), dict(dense_embed_dim=2, embed_index=[0, 2]),
                dict(dense_embed_dim=4), dict(dense_embed_dim=4, embed_index=[0])):
        with pytest.raises(ValueError, match="embed_index"):
            NViTConfig(**base, **bad)
    with pytest.raises(ValueError, match="global_pool"):
        NViTConfig(**{**base, "num_classes": 3}, global_pool="")

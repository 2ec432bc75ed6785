"""Drop-path and dropout through conversion: a converted model keeps the source's stochastic layers (per
block drop-path rates -- timm's linear decay --, position, attention, projection and head dropout) in
its config and modules, and through nvit.save / nvit.load; they are identities in eval mode (the
conversion stays exact) and active in train mode, where with drop-path alone the converted model draws
what the masked timm model draws (same seed, same outputs). set_drop_path sets timm's linear decay on
timm and converted models."""
import copy

import pytest
import timm
import torch
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import nvit
from nvit.model import NViT, attend, linear_drop_path_rates, residual_blocks, set_drop_path
from nvit.model_swin import NViTSwin
from nvit.structures import Adapter
from nvit_kernels.attention import uneven_attention
from _vit_factory import random_masks
from test_swin import ODD, _image

RATES = dict(drop_path_rate=0.3, proj_drop_rate=0.1, attn_drop_rate=0.2, drop_rate=0.15)


def _randomize(m):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.2).add_(1.0 if "norm" in n and n.endswith("weight") else 0.0)
    return m.eval()


def _vit(**kw):
    torch.manual_seed(0)
    return _randomize(VisionTransformer(img_size=16, patch_size=4, num_classes=5, embed_dim=24, depth=3, num_heads=3,
                                        mlp_ratio=2.0, reg_tokens=2, init_values=0.5, **kw))


def _eva(**kw):
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, num_classes=5, depth=3,
                             **kw).eval()


def _swin(**kw):
    torch.manual_seed(0)
    return _randomize(SwinTransformer(num_classes=5, mlp_ratio=2.0, **{**ODD, "drop_path_rate": 0.0, **kw}))


MODELS = {"vit": (_vit, lambda: torch.randn(2, 3, 16, 16)), "eva": (_eva, lambda: torch.randn(2, 3, 56, 56)),
          "swin": (_swin, lambda: _image(ODD))}


def _convert(model, seed=0):
    a = Adapter(model)
    M = random_masks(a, "per-head", seed)
    a.install_norms(M)
    a.apply_masks(M)
    return a.convert(M)


def _stochastic_modules(nv):
    """(drop-path rate per block, {dropout name: p}) read from the converted model's modules."""
    blocks = residual_blocks(nv)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in blocks]
    assert rates == [b.drop_path2.drop_prob if isinstance(b.drop_path2, DropPath) else 0.0 for b in blocks]
    blk = blocks[-1]
    p = dict(attn=blk.attn.attn_drop.p, proj=blk.attn.proj_drop.p, mlp1=blk.mlp.drop1.p, mlp2=blk.mlp.drop2.p,
             head=nv.head.drop.p if isinstance(nv, NViTSwin) else nv.head_drop.p)
    if isinstance(nv, NViT):
        p["pos"] = nv.pos_drop.p
    return rates, p


@pytest.mark.parametrize("family", list(MODELS))
def test_conversion_keeps_the_sources_rates(family, tmp_path):
    build, image = MODELS[family]
    kw = dict(RATES, **({} if family == "swin" else dict(pos_drop_rate=0.05)))
    model = build(**kw)
    depth = len(residual_blocks(model))
    expect = linear_drop_path_rates(0.3, depth)
    nv = _convert(model)
    c = nv.config
    assert c.drop_path_rates == pytest.approx(expect) and c.drop_path_rates[0] == 0.0
    assert (c.proj_drop_rate, c.attn_drop_rate, c.drop_rate) == (0.1, 0.2, 0.15)
    assert family == "swin" or c.pos_drop_rate == 0.05
    rates, p = _stochastic_modules(nv)
    assert rates == pytest.approx(expect)
    assert p == {**dict(attn=0.2, proj=0.1, mlp1=0.1, mlp2=0.1, head=0.15), **({} if family == "swin" else dict(pos=0.05))}
    x = image()
    with torch.no_grad():  # eval: identities, the conversion stays exact
        ref, out = model(x), nv(x)
        assert (ref - out).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    nvit.save(nv, tmp_path / "m")
    back = nvit.load(tmp_path / "m")
    assert back.config.drop_path_rates == c.drop_path_rates and _stochastic_modules(back) == (rates, p)
    nv.train()  # train: dropout and drop-path draw; forward and backward run (attention dropout included)
    a, b = nv(x), nv(x)
    assert not torch.equal(a, b)
    a.sum().backward()
    nv.eval()
    with torch.no_grad():
        assert torch.equal(nv(x), nv(x))


@pytest.mark.parametrize("family", list(MODELS))
def test_drop_path_draws_as_the_masked_model_in_train_mode(family):
    """Drop-path alone draws one number per sample per branch, so with the same seed the converted model
    drops exactly the branches the masked model drops (every block keeps both branches here)."""
    build, image = MODELS[family]
    model = build()
    set_drop_path(model, 0.5)
    nv = _convert(model)
    assert nv.config.drop_path_rates == pytest.approx(linear_drop_path_rates(0.5, len(residual_blocks(model))))
    x = torch.cat([image()] * 4)  # 8 samples: some branches dropped, some kept
    model.train()
    nv.train()
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ref = model(x)
        torch.manual_seed(seed)
        out = nv(x)
        assert (ref - out).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
        outs.append(out)
    assert not torch.equal(*outs)  # drop-path is active
    model.eval()
    nv.eval()
    with torch.no_grad():
        assert torch.equal(nv(x), nv(x))


@pytest.mark.parametrize("family", list(MODELS))
def test_set_drop_path_on_timm_and_converted_models(family, tmp_path):
    build, image = MODELS[family]
    model = build()  # created without drop-path: Identity modules
    depth = len(residual_blocks(model))
    assert all(not isinstance(b.drop_path1, DropPath) for b in residual_blocks(model))
    rates = set_drop_path(model, 0.4)
    assert rates == pytest.approx([0.4 * i / (depth - 1) for i in range(depth)])
    for blk, r in zip(residual_blocks(model), rates):
        for mod in (blk.drop_path1, blk.drop_path2):
            assert (isinstance(mod, DropPath) and mod.drop_prob == r) if r > 0 else isinstance(mod, torch.nn.Identity)
    nv = _convert(copy.deepcopy(model))
    assert nv.config.drop_path_rates == pytest.approx(rates)
    assert set_drop_path(nv, 0.2) == nv.config.drop_path_rates == pytest.approx(linear_drop_path_rates(0.2, depth))
    assert _stochastic_modules(nv)[0] == pytest.approx(nv.config.drop_path_rates)
    nvit.save(nv, tmp_path / "m")
    back = nvit.load(tmp_path / "m")
    assert _stochastic_modules(back)[0] == pytest.approx(linear_drop_path_rates(0.2, depth))
    set_drop_path(back, 0.0)
    assert back.config.drop_path_rates == [0.0] * depth
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in residual_blocks(back))
    back.train()
    x = image()
    with torch.no_grad():
        assert torch.equal(back(x), back(x))  # nothing stochastic left


def test_set_drop_path_refuses_what_it_cannot_set():
    with pytest.raises(ValueError, match="rate"):
        set_drop_path(_vit(), 1.0)
    with pytest.raises(TypeError, match="blocks"):
        set_drop_path(torch.nn.Linear(2, 2), 0.1)


@pytest.mark.parametrize("extras", [False, True])
def test_attention_dropout_path_computes_the_fused_attention(extras):
    """The train-mode path with attention dropout is the fused op's attention (dropout of ~0 here)."""
    torch.manual_seed(0)
    qk, vd, sc = [2, 3], [4, 1], [0.5, 0.7]
    B, N, nW = 4, 6, 2
    qkv = torch.randn(B, N, sum(2 * q + v for q, v in zip(qk, vd)), requires_grad=True)
    kw = dict(bias=torch.randn(2, N, N), mask=torch.where(torch.rand(nW, N, N) > 0.7, -100.0, 0.0)) if extras else {}
    drop = torch.nn.Dropout(1e-12).train()
    ref = uneven_attention(qkv, qk, vd, sc, **kw)
    out = attend(qkv, qk, vd, sc, drop, **kw)
    assert (ref - out).abs().max() <= 1e-5
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    half = torch.nn.Dropout(0.5).train()
    assert not torch.equal(attend(qkv, qk, vd, sc, half, **kw), attend(qkv, qk, vd, sc, half, **kw))
    assert torch.equal(attend(qkv, qk, vd, sc, half.eval(), **kw), ref)


def test_configs_without_rates_build_no_stochastic_layers():
    nv = _convert(_vit())
    d = nv.config.to_dict()
    for k in ("drop_path_rates", "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate"):
        del d[k]
    old = NViT(type(nv.config).from_dict(d))
    assert old.config.drop_path_rates == [] and _stochastic_modules(old) == (
        [0.0] * 3, dict(attn=0.0, proj=0.0, mlp1=0.0, mlp2=0.0, head=0.0, pos=0.0))
    with pytest.raises(ValueError, match="one rate per block"):
        type(nv.config).from_dict({**d, "drop_path_rates": [0.1]})

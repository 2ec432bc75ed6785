"""Masked model == converted NViT model, exactly (fp32, ≤1e-5), across timm variants and masks."""
import copy

import pytest
import torch

from nvit.structures import UnsupportedModelError, Adapter
from _vit_factory import VARIANTS, random_masks, tiny_vit

GRANS = ["aligned", "per-head"]


def _masked_and_converted(model, gran, seed, branches=False):
    m = copy.deepcopy(model)
    a = Adapter(m)
    M = random_masks(a, gran, seed, branches=branches)
    a.install_norms(M)
    a.apply_masks(M)
    return m, a.convert(M), M


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("seed, branches", [(0, False), (1, False), (1, True)])
def test_converted_equals_masked(variant, gran, seed, branches):
    model = tiny_vit(variant, embed_dim=24 + 6 * seed, depth=2 + seed, num_heads=3, seed=seed)
    masked, nv, M = _masked_and_converted(model, gran, seed, branches)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref, out = masked(x), nv(x)
    assert (ref - out).abs().max().item() <= 1e-5
    # the new model really is smaller, with the dims the masks say
    assert nv.config.embed_dim == int(M.embed.sum())
    for b, cfg in enumerate(nv.config.blocks):
        assert cfg.heads == int(M.heads[b].sum())
        assert cfg.mlp == int(M.mlp[b].sum())
        assert cfg.has_attn == bool(M.attn_on[b]) and cfg.has_mlp == bool(M.mlp_on[b])
        if not cfg.has_attn:
            assert not hasattr(nv.blocks[b], "attn") and not hasattr(nv.blocks[b], "norm1")
        if gran == "aligned" and cfg.has_attn:
            assert len(set(cfg.qk_dims)) == 1 and len(set(cfg.v_dims)) == 1


def test_unmasked_conversion_is_identity_and_keeps_scale():
    model = tiny_vit("plain")
    a = Adapter(copy.deepcopy(model))
    nv = a.convert(a.full_masks())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), nv(x), atol=1e-5, rtol=0)
    assert all(s == pytest.approx(8 ** -0.5) for b in nv.config.blocks for s in b.scales)


def test_nvit_model_can_be_pruned_again():
    model = tiny_vit("plain", embed_dim=30, depth=2, num_heads=3)
    _, nv, _ = _masked_and_converted(model, "per-head", 3)
    masked2, nv2, _ = _masked_and_converted(nv, "per-head", 4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (masked2(x) - nv2(x)).abs().max().item() <= 1e-5
    assert nv2.config.embed_dim <= nv.config.embed_dim


def test_unsupported_modules_are_named():
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        Adapter(torch.nn.Linear(3, 3))
    import timm

    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=1, global_pool="map")
    with pytest.raises(UnsupportedModelError, match="attn_pool"):
        Adapter(m)


@pytest.mark.parametrize("gran", GRANS)
def test_qk_norm_models_convert_exactly_with_qk_dims_kept(gran):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, qk_norm=True,
                          num_classes=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    a = Adapter(m)
    assert not a.qk_prunable
    M = random_masks(a, gran, 2)
    for b in range(len(M.qk)):
        M.qk[b] = M.heads[b][:, None].expand_as(M.qk[b]).clone()
    a.install_norms(M)
    a.apply_masks(M)
    nv = a.convert(M)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (m(x) - nv(x)).abs().max().item() <= 1e-5

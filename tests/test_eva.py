"""timm Eva / EVA-02 (rotary pairs, SwiGLU, q/v biases, LayerScale): saliency == explicit gate
derivatives (float64), converted == masked for random masks in both granularities (branches included),
costs equal the built model, and EVA-02-T prunes and converts exactly through the public API."""
import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from nvit import Pruner, Target
from nvit.cost import count_flops, count_params
from nvit.io import load, save
from nvit.spec import UnsupportedModelError
from nvit.structures import Adapter
from _gates import (assert_saliency_equals_gate_derivatives, attn_out_gate, loss_with_hooks, make_gates, times,
                    times_input)
from _vit_factory import random_masks
from _pruning import prune_until_done

EVA_VARIANTS = {
    "eva02": dict(),  # rotary pairs + SwiGLU + q/v biases, as eva02_tiny builds them
    "eva02_reg_layerscale": dict(num_reg_tokens=2, init_values=0.5),
    "eva_gelu_norope": dict(use_rot_pos_emb=False, swiglu_mlp=False, mlp_ratio=2.0, qkv_bias=False),
}
GRANS = ["aligned", "per-head"]


OLD_TIMM_REGISTERS = not hasattr(timm.models.eva.Eva(img_size=28, patch_size=14, embed_dim=24, depth=1, num_heads=3),
                                 "no_embed_class")  # older timm: Eva with register tokens is broken


def tiny_eva(variant="eva02", *, embed_dim=24, depth=2, num_heads=3, img_size=28, seed=0, dtype=torch.float32):
    if "reg" in variant and OLD_TIMM_REGISTERS:
        pytest.skip(f"timm {timm.__version__}'s Eva prepends the class token twice with register tokens")
    torch.manual_seed(seed)
    kw = dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2), qkv_bias=True)
    kw.update(EVA_VARIANTS[variant])
    m = timm.models.eva.Eva(img_size=img_size, patch_size=14, num_classes=5, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, global_pool="avg", use_fc_norm=True, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2).add_(1.0 if p.dim() == 1 and p.numel() == embed_dim else 0.0)
    return m.to(dtype).eval()


def _gated_loss(model, a, gates, x, y):
    """Loss with the gates (_gates.make_gates) inserted by hooks; a rotary model's QK unit is a rotated pair."""
    ge = gates["embed"][-1]
    hooks = [model.norm_pre.register_forward_hook(times(ge)), model.fc_norm.register_forward_hook(times(ge))]
    for b, (blk, bd) in enumerate(zip(model.blocks, a.dims.blocks)):
        gb, H = gates[b], bd.heads
        hooks += [blk.norm1.register_forward_hook(times(ge)), blk.norm2.register_forward_hook(times(ge))]
        # drop_path1/2 see what the branch adds (after LayerScale): the embedding writes and the branch gate
        hooks += [blk.drop_path1.register_forward_hook(times(ge * gb["attn_branch"])),
                  blk.drop_path2.register_forward_hook(times(ge * gb["mlp_branch"]))]
        gq = gb["qk"].expand(H, -1).repeat_interleave(a.qk_width, dim=-1)  # q as [B, H, N, d], before the rotation
        hooks += [blk.attn.q_norm.register_forward_hook(times(gq[None, :, None, :])),
                  blk.attn.proj.register_forward_pre_hook(times_input(attn_out_gate(gb, bd.v_dims))),
                  blk.mlp.fc2.register_forward_pre_hook(times_input(gb["mlp"]))]
    return loss_with_hooks(model, hooks, x, y)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
@pytest.mark.parametrize("gran", GRANS)
def test_eva_saliency_equals_gate_derivative(variant, gran):
    model = tiny_eva(variant, dtype=torch.float64)
    a = Adapter(model)
    pairs, units = a.saliency_maps(gran, branches=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (3,), generator=g)
    gates = make_gates(a.dims, gran)
    assert_saliency_equals_gate_derivatives(model, pairs, units, gates, _gated_loss(model, a, gates, x, y))


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("seed, branches", [(0, False), (1, True)])
def test_eva_converted_equals_masked(variant, gran, seed, branches):
    model = tiny_eva(variant, seed=seed, depth=2 + seed)
    a = Adapter(model)
    M = random_masks(a, gran, seed, branches=branches)
    a.install_norms(M)
    a.apply_masks(M)
    nv = a.convert(M)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref, out = model(x), nv(x)
    assert (ref - out).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert nv.config.family == ("vit" if variant == "eva_gelu_norope" else "eva")  # a plain EVA is a ViT
    assert count_params(nv.config) == sum(p.numel() for p in nv.parameters())
    with FlopCounterMode(display=False) as fc:
        nv(x[:1])
    assert count_flops(nv.config) == fc.get_total_flops()
    for b, cfg in enumerate(nv.config.blocks):
        if cfg.has_attn and a.qk_width == 2:  # rotary: whole pairs, each dim with its source frequency
            for h, idx in enumerate(cfg.qk_index):
                assert len(idx) == cfg.qk_dims[h] and all(idx[i] // 2 == idx[i + 1] // 2 for i in range(0, len(idx), 2))


def test_eva_nvit_prunes_again_and_round_trips(tmp_path):
    model = tiny_eva("eva02", embed_dim=48)
    a = Adapter(model)
    M = random_masks(a, "per-head", 2)
    a.install_norms(M)
    a.apply_masks(M)
    nv = a.convert(M)
    a2 = Adapter(copy.deepcopy(nv))
    assert a2.family.name == "eva" and a2.qk_width == 2
    M2 = random_masks(a2, "per-head", 5)
    a2.install_norms(M2)
    a2.apply_masks(M2)
    nv2 = a2.convert(M2)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (a2.model(x) - nv2(x)).abs().max().item() <= 1e-5
    save(nv2, tmp_path / "m")
    back = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(x), nv2(x))


@pytest.mark.slow
def test_eva02_tiny_prunes_and_converts_through_the_public_api():
    """EVA-02-T as timm builds it (random init; 56 px so the test stays fast), pruned by the Pruner
    to 60 % of its FLOPs and converted exactly."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, num_classes=10).eval()
    pruner = Pruner(model, Target("flops", 0.6), granularity="per-head")
    x, y = torch.randn(4, 3, 56, 56), torch.randint(0, 10, (4,))
    prune_until_done(pruner, model, x, y, 400)
    nv = pruner.convert()
    with torch.no_grad():
        ref, out = model(x), nv(x)
    assert (ref - out).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert count_flops(nv.config) <= 0.6 * pruner.dense_cost["flops"]
    removed = {k: sum(h["removed"][k] for h in pruner.history) for k in ("qk", "v", "mlp", "embed")}
    assert all(n > 0 for n in removed.values()), removed


@pytest.mark.parametrize("kw, name", [(dict(scale_mlp=True), "scale_mlp"), (dict(scale_attn_inner=True), "scale_attn_inner")])
def test_eva_parts_that_cannot_be_pruned_exactly_are_named(kw, name):
    model = timm.models.eva.Eva(img_size=28, patch_size=14, num_classes=5, embed_dim=24, depth=1, num_heads=3,
                                swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2), **kw)
    with pytest.raises(UnsupportedModelError, match=name):
        Adapter(model)

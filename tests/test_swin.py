"""timm Swin Transformer (v1): saliency == explicit gate derivatives (float64) for every kind, with one
embedding per stage; converted == masked (fp32) on odd maps (padding, shifted windows, small maps whose
window shrinks, odd patch merging), Swin-T and Swin-B; costs equal FlopCounterMode and the parameter
count; the Pruner prunes a Swin exactly; refusals are named."""
import copy
import inspect

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nvit import Pruner, Target
from nvit.model_swin import NViTSwin, NViTSwinConfig, count_flops, count_params
from nvit.spec import EMBED, Masks, UnsupportedModelError
from nvit.structures import Adapter
from nvit_kernels.saliency import saliency_reference
from _gates import (assert_saliency_equals_gate_derivatives, attn_out_gate, loss_with_hooks, make_gates,
                    per_column, times, times_input)
from _vit_factory import random_masks
from _pruning import prune_until_done

GRANS = ["aligned", "per-head"]


def _timm_builds_padded_merges() -> bool:
    """Whether this timm builds the stage after an odd map for the map its patch merging produces (it pads
    5×5 to 6×6 → 3×3). timm 1.0.16 builds that stage for 2×2 while its merge still pads to 3×3, so the
    blocks' masks do not fit their input; nvit refuses such a model by name."""
    from timm.models.swin_transformer import SwinTransformerStage

    stage = SwinTransformerStage(dim=4, out_dim=8, input_resolution=(5, 5), depth=1, downsample=True, num_heads=1,
                                 window_size=2)
    return tuple(stage.output_resolution) == (3, 3)


PADDED_MERGES = _timm_builds_padded_merges()
# img 20, patch 2: maps 10×10 (window 4: padded to 12, shifted), 5×5 (padded to 8, shifted), 3×3 (odd
# merge; the window shrinks to the map and does not shift). Where timm cannot merge an odd map (above),
# img 24: maps 12×12, 6×6 (padded to 8, shifted), 3×3 (the window shrinks to the map).
ODD = dict(img_size=20 if PADDED_MERGES else 24, patch_size=2, embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 4),
           window_size=4)
# the brief's case: img 56, patch 4, window 7: maps 14×14 (two windows a side) and 7×7 (one window, no shift)
SMALL = dict(img_size=56, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=7)
# one stage with an odd map not divisible by the window: 9×9 with window 4 → padded to 12, shifted
PADDED = dict(img_size=18, patch_size=2, embed_dim=12, depths=(3,), num_heads=(3,), window_size=4)
# a non-square image and window (maps 10×14 and 5×7, window 4×3, shift 2×1) and heads wider than the
# embedding / heads (head_dim 6: attention width 12 over an 8-wide stream)
RECT = dict(img_size=(20, 28), patch_size=2, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=(4, 3),
            head_dim=6)


def tiny_swin(cfg=ODD, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = timm.models.swin_transformer.SwinTransformer(num_classes=5, mlp_ratio=2.0, drop_path_rate=0.0,
                                                     **{**cfg, **kw})
    with torch.no_grad():  # random, non-trivial weights everywhere (norms around 1, biases too)
        for n, p in m.named_parameters():
            p.normal_(0, 0.2).add_(1.0 if "norm" in n and n.endswith("weight") else 0.0)
    return m.to(dtype).eval()


def _image(cfg, n=2, seed=0, dtype=torch.float32):
    s = cfg["img_size"]
    h, w = s if isinstance(s, tuple) else (s, s)
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gated_loss(model, a, gates, x, y):
    """Loss with the gates (_gates.make_gates) inserted by hooks: gates["embed"][s] one gate per channel of
    stage s on every write into its stream (patch_embed.norm / the merging reduction, each branch's output)
    and every read from it (norm1, norm2, the next stage's merging norm at the channel's 4 positions, the
    final norm)."""
    ge = gates["embed"]
    hooks = [model.patch_embed.norm.register_forward_hook(times(ge[0])),
             model.norm.register_forward_hook(times(ge[len(ge) - 1]))]
    blocks = iter(enumerate(a.dims.blocks))
    for s, layer in enumerate(model.layers):
        if s > 0:
            hooks += [layer.downsample.norm.register_forward_hook(times(ge[s - 1].repeat(4))),
                      layer.downsample.reduction.register_forward_hook(times(ge[s]))]
        for blk in layer.blocks:
            b, bd = next(blocks)
            gb, H = gates[b], bd.heads
            d = blk.attn.qkv.out_features // (3 * H)
            hooks += [blk.norm1.register_forward_hook(times(ge[s])), blk.norm2.register_forward_hook(times(ge[s])),
                      blk.drop_path1.register_forward_hook(times(ge[s] * gb["attn_branch"])),
                      blk.drop_path2.register_forward_hook(times(ge[s] * gb["mlp_branch"]))]

            def qkv_hook(mod, inp, out, gb=gb, H=H, d=d, widths=bd.qk_units):  # timm's [q of all heads | k | v]
                return torch.cat([out[..., : H * d] * per_column(gb["qk"], widths), out[..., H * d:]], dim=-1)

            hooks += [blk.attn.qkv.register_forward_hook(qkv_hook),
                      blk.attn.proj.register_forward_pre_hook(times_input(attn_out_gate(gb, bd.v_dims))),
                      blk.mlp.fc2.register_forward_pre_hook(times_input(gb["mlp"]))]
    return loss_with_hooks(model, hooks, x, y)


@pytest.mark.parametrize("cfg", [ODD, RECT], ids=["odd", "rect"])
@pytest.mark.parametrize("gran", GRANS)
def test_swin_saliency_equals_gate_derivative(cfg, gran):
    model = tiny_swin(cfg, dtype=torch.float64)
    a = Adapter(model)
    S = len(cfg["depths"])
    assert a.family.name == "swin" and a.dims.embed == [8 * 2 ** s for s in range(S)]
    pairs, units = a.saliency_maps(gran, branches=True)
    x, y = _image(cfg, 3, dtype=torch.float64), torch.tensor([0, 3, 1])
    gates = make_gates(a.dims, gran)
    expect = assert_saliency_equals_gate_derivatives(model, pairs, units, gates, _gated_loss(model, a, gates, x, y))
    for s in range(S):  # every stage's embedding is scored
        assert float(expect[(units.kind == EMBED) & (units.block == s)].abs().sum()) > 0


def _check_converted(model, a, M, x, tol=1e-5):
    a.install_norms(M)
    a.apply_masks(M)
    nv = a.convert(M)
    assert isinstance(nv, NViTSwin) and nv.config.family == "swin"
    assert nv.config.embed_dims == [int(t.sum()) for t in M.embeds]
    with torch.no_grad():
        ref, out = model(x), nv(x)
    err = (ref - out).abs().max().item() / ref.abs().max().item()  # relative to the output scale
    assert err <= tol, err
    assert count_params(nv.config) == sum(p.numel() for p in nv.parameters())
    with FlopCounterMode(display=False) as fc:
        nv(x[:1])
    assert count_flops(nv.config) == fc.get_total_flops()
    return nv, err


@pytest.mark.parametrize("cfg", [ODD, SMALL, PADDED, RECT], ids=["odd", "small", "padded", "rect"])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("seed, branches", [(0, False), (1, True)])
def test_swin_converted_equals_masked(cfg, gran, seed, branches):
    model = tiny_swin(cfg, seed=seed)
    a = Adapter(model)
    M = random_masks(a, gran, seed, branches=branches)
    nv, _ = _check_converted(model, a, M, _image(cfg, seed=seed))
    if not branches:  # a converted model prunes again (per head: its heads have uneven dims now)
        a2 = Adapter(copy.deepcopy(nv))
        assert a2.family.name == "swin" and a2.dims.embed == nv.config.embed_dims
        _check_converted(a2.model, a2, random_masks(a2, "per-head", seed + 7), _image(cfg, seed=seed))


@pytest.mark.slow  # full-size models: the tiny configurations above check the same conversion
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224"])
def test_swin_t_and_b_converted_equal_masked(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    a = Adapter(model)
    M = random_masks(a, "per-head", 3, p=0.5)
    _, err = _check_converted(model, a, M, torch.randn(1, 3, 224, 224))
    print(f"{name}: converted vs masked max |Δ| / max |out| = {err:.2e}")


def test_masks_per_stage_round_trip_and_single_stream_keys_unchanged():
    a = Adapter(tiny_swin())
    M = random_masks(a, "per-head", 4)
    d = M.state_dict()
    assert "embed" not in d and [k for k in d if k.startswith("embed.")] == ["embed.0", "embed.1", "embed.2"]
    assert Masks.from_state_dict(d).equal(M)
    from _vit_factory import tiny_vit

    assert "embed" in Adapter(tiny_vit()).full_masks().state_dict()  # single-stream files keep their layout


def test_pruner_prunes_swin_exactly_per_stage():
    model = tiny_swin(SMALL)
    pruner = Pruner(model, Target("flops", 0.5), granularity="per-head", group_size={"embed": 2})
    x, y = _image(SMALL, 4), torch.tensor([0, 1, 2, 3])
    prune_until_done(pruner, model, x, y, 40)
    nv = pruner.convert()
    with torch.no_grad():
        ref, out = model(x), nv(x)
    assert (ref - out).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert count_flops(nv.config) <= 0.5 * pruner.dense_cost["flops"]
    assert all(w % 2 == 0 for w in nv.config.embed_dims)  # group size per stage
    # the per-stage deltas are exact: removing one embedding channel of stage s saves what the pruner says
    cfg = pruner.config()
    for s in range(2):
        smaller = pruner.adapter.family.with_embed_widths(cfg, [w - (i == s) for i, w in enumerate(cfg.embed_dims)])
        assert pruner._delta("flops", cfg, EMBED, s, -1) == count_flops(cfg) - count_flops(smaller) > 0


def test_swin_guards_per_stage():
    """The last embedding channel of a stage is never removed, though other stages have many."""
    model = tiny_swin(SMALL)
    pruner = Pruner(model, granularity="aligned")
    M = pruner.masks.clone()
    M.embed[0][1:] = False
    pruner.set_masks(M)
    from nvit.pruner import _Group

    first = int(pruner._unit_ids.tables[(EMBED, 0)][0, 0])
    second = int(pruner._unit_ids.tables[(EMBED, 1)][0, 0])
    assert not pruner._allowed(_Group([first], EMBED, 0, -1))
    assert pruner._allowed(_Group([second], EMBED, 1, -1))


def test_swin_v2_and_unsupported_options_are_named():
    v2 = timm.models.swin_transformer_v2.SwinTransformerV2(img_size=32, patch_size=4, embed_dim=8, depths=(1,),
                                                           num_heads=(2,), window_size=4, num_classes=3)
    with pytest.raises(UnsupportedModelError, match="SwinTransformerV2.*cosine attention"):
        Adapter(v2)
    if "dynamic_img_size" in inspect.signature(timm.models.swin_transformer.SwinTransformer).parameters:
        with pytest.raises(UnsupportedModelError, match="dynamic_img_size"):
            Adapter(tiny_swin(PADDED, dynamic_img_size=True))
    with pytest.raises(UnsupportedModelError, match="strict_img_size=False"):
        Adapter(tiny_swin(PADDED, strict_img_size=False))
    if not PADDED_MERGES:  # an odd merge this timm builds inconsistently is refused, not converted wrongly
        with pytest.raises(UnsupportedModelError, match=r"differs from the converted model's"):
            Adapter(tiny_swin(dict(ODD, img_size=20)))
    with pytest.raises(UnsupportedModelError, match="always_partition"):
        Adapter(tiny_swin(PADDED, always_partition=True))
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        Adapter(tiny_swin(PADDED, global_pool=""))


def test_config_round_trips_through_dict():
    a = Adapter(tiny_swin())
    cfg = a.nvit_config(random_masks(a, "per-head", 2))
    back = NViTSwinConfig.from_dict(cfg.to_dict())
    side = ODD["img_size"] // ODD["patch_size"] // 2  # stage 1's map
    assert back == cfg and back.depths == [2, 2, 2] and back.geometry(3) == ((side, side), (4, 4), (2, 2))


def test_save_load_and_timm_local_dir_round_trip(tmp_path):
    import nvit

    model = tiny_swin(ODD)
    a = Adapter(model)
    M = random_masks(a, "per-head", 5)
    a.install_norms(M)
    a.apply_masks(M)
    nv = a.convert(M)
    nvit.save(nv, tmp_path / "m")
    back = nvit.load(tmp_path / "m")
    via_timm = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    x = _image(ODD)
    with torch.no_grad():
        ref = nv(x)
        assert isinstance(back, NViTSwin) and back.config == nv.config
        assert torch.equal(back(x), ref) and torch.equal(via_timm(x), ref)


def test_cli_reads_swin_shapes_from_the_checkpoint():
    from nvit.inputs import shape_overrides

    src = tiny_swin(ODD)
    kw = shape_overrides("swin_tiny_patch4_window7_224", src.state_dict(), {"img_size": ODD["img_size"]})
    built = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kw)
    built.load_state_dict(src.state_dict())  # strict: every shape as the checkpoint's
    assert [len(layer.blocks) for layer in built.layers] == [2, 2, 2] and built.head.fc.out_features == 5


def test_cli_names_a_checkpoint_shape_it_cannot_read():
    from nvit.inputs import RunError, shape_overrides

    with pytest.raises(RunError, match="not a square window's"):
        shape_overrides("swin_tiny_patch4_window7_224", tiny_swin(RECT).state_dict(), {})


@pytest.mark.parametrize("gran", GRANS)
def test_fused_saliency_op_matches_reference_on_swin(gran):
    from nvit_kernels.saliency import SaliencyPlan, saliency_accumulate

    model = tiny_swin(ODD)
    pairs, units = Adapter(model).saliency_maps(gran, branches=True)
    F.cross_entropy(model(_image(ODD, 3)), torch.tensor([0, 1, 2])).backward()
    params = [p for p, _ in pairs]
    w, g = [p.detach() for p in params], [p.grad for p in params]
    scores = torch.zeros(units.num_units)
    saliency_accumulate(w, g, SaliencyPlan.build([t for _, t in pairs], units.num_units), scores)
    ref = saliency_reference([t.double() for t in w], [t.double() for t in g], [t for _, t in pairs], units.num_units)
    assert torch.allclose(scores.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.max()))


def test_revit_names_a_swin_source(tmp_path, capsys):
    import nvit
    from nvit.revit import main

    a = Adapter(tiny_swin(PADDED))
    nvit.save(a.convert(a.full_masks()), tmp_path / "m")
    assert main(["--embed-dim", "64", "--depth", "4", "--from", str(tmp_path / "m"), "--out", str(tmp_path / "c.json")]) == 2
    assert "a swin model (one embedding width per stage)" in capsys.readouterr().err

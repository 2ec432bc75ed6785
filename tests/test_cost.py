"""nvit.cost: analytic params/FLOPs must equal counting the built NViT model and FlopCounterMode, exactly."""
import importlib
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nvit.cost as cost
from nvit.cost import (attention_flops, block_flops, block_params, cost_report, count_flops, count_macs,
                       count_params)
from nvit.model import BlockConfig, NViT, NViTBlock, NViTConfig
from nvit_kernels.attention import uneven_attention


def _random_block(rng: random.Random) -> BlockConfig:
    h = rng.randint(1, 4)
    if rng.random() < 0.5:  # uneven heads, dims of 1 included
        qk = [rng.choice([1, 2, 3, 5, 8]) for _ in range(h)]
        v = [rng.choice([1, 2, 4, 7]) for _ in range(h)]
    else:  # aligned heads (what the reference code's pruning keeps), QK ≠ V allowed
        qk, v = [rng.choice([1, 4, 6])] * h, [rng.choice([1, 3, 8])] * h
    sc = [rng.uniform(0.1, 1.0) for _ in range(h)]
    mlp = rng.choice([1, 5, 16, 24])
    r = rng.random()
    if r < 0.15:  # the whole attention branch removed
        return BlockConfig(qk_dims=[], v_dims=[], mlp=mlp, scales=[])
    if r < 0.3:  # the whole MLP branch removed
        mlp = 0
    return BlockConfig(qk_dims=qk, v_dims=v, mlp=mlp, scales=sc)


def _random_config(seed: int) -> NViTConfig:
    rng = random.Random(seed)
    patch = rng.choice([2, 4])
    dist = rng.random() < 0.3
    return NViTConfig(
        img_size=patch * rng.choice([2, 3]) + rng.choice([0, 1]),  # an undivisible size drops the remainder
        patch_size=patch, in_chans=rng.choice([1, 3]), num_classes=rng.choice([0, 3, 10]),
        embed_dim=rng.choice([1, 6, 13, 16]), blocks=[_random_block(rng) for _ in range(rng.randint(1, 3))],
        qkv_bias=rng.random() < 0.5, proj_bias=rng.random() < 0.7, layer_scale=rng.random() < 0.5,
        class_token=dist or rng.random() < 0.8, dist_token=dist, reg_tokens=rng.choice([0, 0, 1, 4]),
        no_embed_class=rng.random() < 0.3, global_pool=rng.choice(["token", "avg"]),
        fc_norm=rng.random() < 0.3, pre_norm=rng.random() < 0.3, final_norm=rng.random() < 0.8)


def _measured_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


CONFIG_SEEDS = list(range(16))


@pytest.mark.parametrize("seed", CONFIG_SEEDS)
def test_params_and_flops_match_built_model(seed):
    torch.manual_seed(seed)
    cfg = _random_config(seed)
    model = NViT(cfg).eval()
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert count_flops(cfg, batch_size=2) == _measured_flops(model, x)
    assert count_flops(cfg, batch_size=2) == 2 * count_flops(cfg, batch_size=1)
    assert count_macs(cfg) * 2 == count_flops(cfg)


def test_report_breakdown_sums_to_totals():
    cfg = _random_config(3)
    rep = cost_report(cfg, batch_size=3)
    assert rep.params == count_params(cfg)
    assert rep.flops == count_flops(cfg, batch_size=3)
    assert len(rep.blocks) == len(cfg.blocks)
    d = rep.to_dict()
    assert d["flops"] == rep.flops and len(d["blocks"]) == len(cfg.blocks)
    assert "total" in rep.table()


@pytest.mark.parametrize("layer_scale,qkv_bias,proj_bias", [(False, True, True), (True, False, False)])
def test_block_helpers_match_block(layer_scale, qkv_bias, proj_bias):
    D, N = 7, 5
    bc = BlockConfig(qk_dims=[1, 3, 2], v_dims=[4, 1, 2], mlp=9, scales=[0.5, 0.4, 0.3])
    blk = NViTBlock(D, bc, qkv_bias=qkv_bias, proj_bias=proj_bias, layer_scale=layer_scale).eval()
    assert block_params(D, bc, qkv_bias=qkv_bias, proj_bias=proj_bias, layer_scale=layer_scale) == \
        sum(p.numel() for p in blk.parameters())
    with torch.no_grad():
        assert block_flops(D, bc, N, batch_size=2) == _measured_flops(blk, torch.randn(2, N, D))


def test_attention_formula_by_hand():
    # 2 heads, N=3: 2*9*(1+2) + 2*9*(4+5) = 54 + 162 per image
    assert attention_flops([1, 4], [2, 5], tokens=3) == 216
    assert attention_flops([1, 4], [2, 5], tokens=3, batch_size=2) == 432


def test_deit_base_matches_published_count():
    # DeiT-B/16 @224: 86,567,656 params (timm) and 17.6 GMACs (the paper's "17.6G FLOPs").
    blocks = [BlockConfig([64] * 12, [64] * 12, 3072, [0.125] * 12) for _ in range(12)]
    cfg = NViTConfig(224, 16, 3, 1000, 768, blocks)
    assert count_params(cfg) == 86_567_656
    assert round(count_macs(cfg) / 1e9, 1) == 17.6


def test_attention_op_counted_forward_and_backward():
    qk, v, N, B = [2, 1], [3, 1], 4, 2
    qkv = torch.randn(B, N, sum(2 * a + b for a, b in zip(qk, v)), requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = uneven_attention(qkv, qk, v, [0.7, 1.0])
    assert fc.get_total_flops() == attention_flops(qk, v, N, B)
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    # as torch counts the SDPA backward: recompute QKᵀ, then dP, dV, dQ, dK
    assert fc.get_total_flops() == B * sum(2 * N * N * (3 * a + 2 * b) for a, b in zip(qk, v))


def test_reimport_does_not_register_twice():
    importlib.reload(cost)  # register_flop_formula raises on duplicates unless guarded
    cfg = _random_config(0)
    with torch.no_grad():
        assert cost.count_flops(cfg, 2) == _measured_flops(NViT(cfg).eval(),
                                                            torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size))

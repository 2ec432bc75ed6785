"""Global ranking, guards, targets and the prune → convert → save → load path."""
import copy

import pytest
import torch
import torch.nn.functional as F

import nvit
from nvit import Pruner, Target, TargetUnreachableError
from nvit.cost import count_flops, count_params
from nvit.kinds import HEAD, TAKES, allowed
from nvit.spec import KIND_NAMES, MLP
from _vit_factory import tiny_vit

GRANS = ["aligned", "per-head"]


def _accumulate(pruner, model, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("metric", ["flops", "params"])
def test_prune_to_target_convert_save_load(gran, metric, tmp_path):
    model = tiny_vit("plain", embed_dim=32, depth=3, num_heads=4)
    pruner = Pruner(model, Target(metric, 0.5), granularity=gran)
    _accumulate(pruner, model)
    infos = pruner.prune_to_target(n_per_step=16)
    assert infos and infos[-1].done
    assert pruner.fraction() <= 0.5
    nv = pruner.convert()
    cost = count_flops if metric == "flops" else count_params
    dense = cost(pruner.dense_config)
    assert cost(nv.config) / dense == pytest.approx(pruner.fraction())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - nv(x)).abs().max().item() <= 1e-5
    nvit.save(nv, tmp_path / "m")
    back = nvit.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(x), nv(x))
    if gran == "aligned":
        assert all(len(set(b.qk_dims)) == 1 and len(set(b.v_dims)) == 1 for b in nv.config.blocks)


def test_global_pool_spans_kinds_and_blocks():
    model = tiny_vit("plain", embed_dim=32, depth=3, num_heads=4)
    pruner = Pruner(model, Target("flops", 0.3), granularity="per-head")
    _accumulate(pruner, model)
    pruner.prune_to_target(n_per_step=32)
    removed = {k: sum(h["removed"][k] for h in pruner.history) for k in KIND_NAMES}
    assert sum(v > 0 for v in removed.values()) >= 3, removed
    # what the history reports is what the masks say
    M = pruner.masks
    assert removed["embed"] == int((~M.embed).sum())
    assert removed["head"] == sum(int((~h).sum()) for h in M.heads)
    assert removed["mlp"] == sum(int((~m).sum()) for m in M.mlp)
    cfg = pruner.config()
    assert len({(tuple(b.qk_dims), b.mlp) for b in cfg.blocks}) > 1  # blocks end up different


def test_lowest_saliency_goes_first():
    """With normalize="none" and group size 1 a unit's rank is its saliency, and a step removes a prefix
    of the units in rank order, skipping only those the guards keep. So every unit the step removed
    directly scored no higher than any unit still alive that the guards would let go now (guards only
    tighten as units go, so such a unit was removable when the step passed its rank). The QK/V units
    that went only because their head went (nvit.kinds.TAKES) were not ranked on their own: they are
    not among the directly removed (a QK/V unit of a removed head is left out either way)."""
    model = tiny_vit("plain", embed_dim=32, depth=2, num_heads=4)
    pruner = Pruner(model, Target("flops", 0.9), granularity="per-head", normalize="none")
    _accumulate(pruner, model)
    sal = pruner.step_scores().clone()
    alive_before = pruner.unit_alive()
    pruner.ema = sal  # rank on exactly these scores
    pruner.n_batches = 0
    pruner.prune_step(5)
    kept = pruner.unit_alive()
    gone = alive_before & ~kept
    U = pruner.units
    rows = list(zip(U.kind.tolist(), U.block.tolist(), U.head.tolist(), U.index.tolist()))
    heads_gone = {(b, i) for u, (k, b, h, i) in enumerate(rows) if gone[u] and k == HEAD}
    direct = [u for u, (k, b, h, i) in enumerate(rows)
              if gone[u] and not (k in TAKES[HEAD] and (b, h) in heads_gone)]
    removable = [u for u, (k, b, h, i) in enumerate(rows)
                 if kept[u] and allowed(pruner.masks, k, b, h, [i], pruner.adapter.qk_prunable)]
    assert len(direct) >= 5 and removable
    # the largest saliency removed is at most the smallest saliency the guards would still let go
    assert float(sal[direct].max()) <= float(sal[removable].min())


def test_guards_keep_one_of_everything():
    model = tiny_vit("plain", embed_dim=16, depth=2, num_heads=2)
    pruner = Pruner(model, Target("flops", 0.05), granularity="per-head")
    _accumulate(pruner, model)
    pruner.prune_to_target(n_per_step=64)
    cfg = pruner.config()
    assert cfg.embed_dim >= 1
    for b in cfg.blocks:
        assert b.heads >= 1 and min(b.qk_dims) >= 1 and min(b.v_dims) >= 1 and b.mlp >= 1


def test_unreachable_target_is_an_error():
    model = tiny_vit("plain", embed_dim=16, depth=2, num_heads=2)
    with pytest.raises(TargetUnreachableError, match="unreachable"):
        Pruner(model, Target("params", 0.0001))
    with pytest.raises(ValueError, match="fraction"):
        Target("flops", 1.5)
    with pytest.raises(ValueError, match="metric"):
        Target("speed", 0.5)


def test_group_size_keeps_multiples():
    model = tiny_vit("plain", embed_dim=32, depth=2, num_heads=2)
    pruner = Pruner(model, Target("flops", 0.5), granularity="aligned",
                    group_size={"mlp": 8, "qk": 4, "v": 4, "embed": 8})
    _accumulate(pruner, model)
    pruner.prune_to_target(n_per_step=16)
    cfg = pruner.config()
    assert cfg.embed_dim % 8 == 0
    for b in cfg.blocks:
        assert b.mlp % 8 == 0 and b.qk_dims[0] % 4 == 0 and b.v_dims[0] % 4 == 0


def test_predicted_cost_deltas_are_exact():
    model = tiny_vit("plain", embed_dim=24, depth=2, num_heads=3)
    pruner = Pruner(model, Target("flops", 0.5), granularity="per-head")
    deltas = pruner.cost.unit_deltas("flops", pruner.masks)
    alive = pruner.unit_alive()
    for u in [0, int(alive.numel()) // 3, int(alive.numel()) - 1, int((pruner.units.kind == 1).nonzero()[0])]:
        p2 = copy.copy(pruner)
        p2.masks = pruner.masks.clone()
        before = count_flops(p2.config())
        p2._remove(u)
        assert before - count_flops(p2.config()) == deltas[u]


def test_masks_survive_optimizer_steps_and_state_roundtrip():
    model = tiny_vit("plain", embed_dim=24, depth=2, num_heads=3)
    pruner = Pruner(model, Target("flops", 0.6), granularity="aligned")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _accumulate(pruner, model)
    pruner.prune_step(20)
    for _ in range(2):
        _accumulate(pruner, model, batches=1, seed=3)
        opt.step()
        pruner.apply_masks()
    nv = pruner.convert()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - nv(x)).abs().max().item() <= 1e-5
    st = pruner.state_dict()
    fresh = Pruner(tiny_vit("plain", embed_dim=24, depth=2, num_heads=3), Target("flops", 0.6), granularity="aligned")
    fresh.load_state_dict(st)
    assert fresh.masks.equal(pruner.masks) and fresh.steps == pruner.steps


def test_accumulate_needs_gradients():
    model = tiny_vit("plain")
    pruner = Pruner(model, Target("flops", 0.5))
    with pytest.raises(RuntimeError, match="gradient"):
        pruner.accumulate()
    with pytest.raises(RuntimeError, match="no saliency"):
        pruner.prune_step(1)


def _synthetic_latency_table(cfg):
    """A latency table with known values (block time ∝ its matmul work), instead of measuring DeiT-S here."""
    import numpy as np

    from nvit.latency import LatencyGrid, LatencyTable

    grid = LatencyGrid.for_model(cfg, points=2)
    vals = np.zeros(grid.shape)
    for idx, (e, h, qk, v, m) in grid.points():
        vals[idx] = 1e-9 * (e * h * (2 * qk + v) * 2 + e * m * 2 + 197 * h * (qk + v))
    return LatencyTable(grid, vals, {"synthetic": True})


@pytest.mark.parametrize("gran, metric", [("per-head", "flops"), ("aligned", "latency")])
def test_deit_small_end_to_end(gran, metric, tmp_path):
    """The issue's acceptance path on the real DeiT-S architecture (random init, nothing downloaded)."""
    import timm

    from nvit.structures import Adapter

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    table = None
    if metric == "latency":
        a = Adapter(model)
        table = _synthetic_latency_table(a.nvit_config(a.full_masks()))
    pruner = Pruner(model, Target(metric, 0.5), granularity=gran, group_size={"mlp": 16, "embed": 8},
                    latency_table=table)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 3, 224, 224, generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 1000, (2,), generator=g)).backward()
        pruner.accumulate()
    pruner.prune_to_target(n_per_step=2048)
    model.eval()
    nv = pruner.convert()
    if metric == "flops":
        assert count_flops(nv.config) <= 0.5 * count_flops(pruner.dense_config)
    else:
        assert table.model_latency(nv.config) <= 0.5 * table.model_latency(pruner.dense_config)
    nvit.save(nv, tmp_path / "deit_s")
    back = nvit.load(tmp_path / "deit_s")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - back(x)).abs().max().item() <= 1e-4


def test_baselines_uniform_allocation_and_magnitude_criterion():
    model = tiny_vit("plain", embed_dim=32, depth=3, num_heads=4)
    pruner = Pruner(model, Target("flops", 0.5), granularity="aligned", allocation="uniform")
    _accumulate(pruner, model)
    pruner.prune_to_target(n_per_step=64)
    cfg = pruner.config()
    assert 0.45 <= pruner.fraction() <= 0.5  # meets the target without overshooting it
    assert len({(b.heads, b.qk_dims[0], b.v_dims[0], b.mlp) for b in cfg.blocks}) == 1  # same shape everywhere

    model = tiny_vit("plain", embed_dim=32, depth=3, num_heads=4)
    pruner = Pruner(model, Target("flops", 0.5), criterion="magnitude", normalize="none")
    pruner.accumulate()  # needs no gradient
    w = pruner.adapter.model.blocks[0].mlp.fc2.weight.detach()
    mlp0 = (pruner.units.kind == 4) & (pruner.units.block == 0)
    expect = (w * w).sum(0).double() ** 2
    assert torch.allclose(pruner.scores[mlp0].double(), expect, rtol=1e-4)
    pruner.prune_to_target(n_per_step=32)
    assert pruner.fraction() <= 0.5


def test_dinov2_with_registers_prunes_and_converts_exactly():
    """DINOv2-reg (LayerScale + 4 register tokens, timm's own builder, random init): the register
    tokens used to crash the saliency kernel; now the model prunes and converts exactly."""
    import copy

    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2,
                              num_classes=7)
    pruner = Pruner(model, Target("flops", 0.5), granularity="per-head")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(2, 3, 56, 56, generator=g)), torch.randint(0, 7, (2,), generator=g)).backward()
        pruner.accumulate()
    pruner.prune_to_target(n_per_step=512)
    model.eval()
    nv = pruner.convert()
    assert count_flops(nv.config) <= 0.5 * count_flops(pruner.dense_config)
    assert nv.config.reg_tokens == 4 and nv.config.layer_scale
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref, out = copy.deepcopy(model)(x), nv(x)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1)


def test_unreachable_target_honours_group_sizes_before_any_step():
    """With the CLI's group sizes the smallest allowed model keeps 4 embedding channels, 2 QK/V dims
    and 8 MLP channels: 0.1 % of the FLOPs is unreachable, and that is said at construction."""
    from nvit.tiny_model import create_embedded_model

    groups = {"embed": 4, "head": 1, "qk": 2, "v": 2, "mlp": 8}
    with pytest.raises(TargetUnreachableError, match="unreachable"):
        Pruner(create_embedded_model(pretrained=False), Target("flops", 0.001), group_size=groups)
    Pruner(create_embedded_model(pretrained=False), Target("flops", 0.01), group_size=groups)  # reachable


def test_units_on_a_flat_stretch_of_the_latency_table_are_still_ranked():
    """A latency table flat along the MLP axis says removing MLP channels saves nothing; they must
    then be costed by the FLOPs they save, not ranked as infinitely important."""
    from nvit.latency import LatencyGrid, LatencyTable
    from nvit.structures import Adapter
    from nvit.tiny_model import create_embedded_model

    model = create_embedded_model(pretrained=False)
    cfg = Adapter(model).nvit_config(Adapter(model).full_masks())
    import numpy as np

    grid = LatencyGrid.for_model(cfg, points=3)
    vals = np.zeros(grid.shape)
    for idx, (e, h, qk, v, m) in grid.points():
        vals[idx] = 1e-9 * (e * h * (2 * qk + v) + 50 * h * (qk + v)) + 1e-6  # no MLP term at all
    table = LatencyTable(grid, vals, {"synthetic": True})
    pruner = Pruner(model, Target("latency", 0.7), latency_table=table, group_size={"mlp": 8})
    U = pruner.units
    pruner.scores.fill_(1.0)
    pruner.scores[U.kind == MLP] = 1e-6  # near-useless MLP channels
    pruner.n_batches = 1
    info = pruner.prune_step(64)
    assert info.removed["mlp"] == 64


def test_whole_branches_are_ranked_removed_and_saved(tmp_path):
    """branches=True: a block's whole attention / MLP branch is one unit of the global pool; when one
    goes, the converted model omits it, still computes what the masked model computed, and saves."""
    model = tiny_vit("layerscale_nobias", depth=3, embed_dim=24)
    pruner = Pruner(model, Target("flops", 0.35), branches=True)
    U = pruner.units
    assert int((U.kind == KIND_NAMES.index("attn_branch")).sum()) == 3
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    pruner.accumulate()
    pruner.scores[U.kind == KIND_NAMES.index("attn_branch")] = 0.0  # make one branch kind the cheapest loss
    pruner.prune_to_target(n_per_step=8)
    assert not bool(pruner.masks.attn_on.all())
    model.eval()
    nv = pruner.convert()
    assert any(not b.has_attn for b in nv.config.blocks)
    with torch.no_grad():
        ref, out = model(x), nv(x)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1)
    nvit.save(nv, tmp_path / "m")
    back = nvit.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(x), out)
    assert count_params(nv.config) == sum(p.numel() for p in nv.parameters())


def test_dims_stay_multiples_of_the_group_size_even_from_odd_dense_dims():
    """MLP 50 and QK 10 per head with groups of 8 and 4: the remainder goes first, then whole groups,
    so every kept dim is a multiple of its group size (what --round-to asks for)."""
    model = tiny_vit("plain", embed_dim=30, num_heads=3, mlp_ratio=50 / 30, depth=2)
    pruner = Pruner(model, Target("flops", 0.3), granularity="per-head", group_size={"mlp": 8, "qk": 4, "v": 2})
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    pruner.accumulate()
    pruner.prune_to_target(n_per_step=16)
    for b in pruner.config().blocks:
        assert b.mlp % 8 == 0 and all(q % 4 == 0 for q in b.qk_dims) and all(v % 2 == 0 for v in b.v_dims)


def test_round_to_flag():
    from nvit.settings import RunError, round_to_groups

    assert round_to_groups("8") == {"group_embed": 8, "group_qk": 8, "group_v": 8, "group_mlp": 8}
    assert round_to_groups("qk=8,mlp=16") == {"group_qk": 8, "group_mlp": 16}
    with pytest.raises(RunError, match="--round-to"):
        round_to_groups("heads=2")

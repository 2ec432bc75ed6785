"""Where a prune step stops: at or below the target, and below it by at most one removal group.

Pruner.prune_step promises, for a step that reaches its target t (history[-1]["reached"]):

    t − last_group_cost  <  fraction  ≤  t

with `fraction` the exact metric of the resulting config over the dense model's and
`last_group_cost` the exact cost of the step's last removal group, measured on the config just
before its removal. These tests check both numbers independently of the pruner's own bookkeeping.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvit import Pruner, Target
from nvit.cost import count_flops, count_params
from nvit.latency import LatencyGrid, LatencyTable
from nvit.spec import KIND_NAMES, MLP
from nvit.structures import Adapter
from _vit_factory import tiny_vit

GROUPS = {"embed": 4, "qk": 2, "v": 2, "mlp": 4}
DIMS = dict(embed_dim=32, depth=3, num_heads=4)  # head dims 8, MLP 64


def _model():
    return tiny_vit("plain", **DIMS)


def _dense_config():
    a = Adapter(_model())
    return a.nvit_config(a.full_masks())


def _cross_term_table(points=3):
    """Block latency with products of the dims (the first-order estimate over-counts joint removals)
    and a tiny constant, so a target of 0.2 stays reachable."""
    grid = LatencyGrid.for_model(_dense_config(), points=points)
    vals = np.zeros(grid.shape)
    for idx, (e, h, qk, v, m) in grid.points():
        vals[idx] = 1e-6 * (e * h * (2 * qk + v) + e * m + 0.02 * h * qk * v * m / 8 + 17 * h * (qk + v)) + 1e-8
    return LatencyTable(grid, vals, {"synthetic": True})


def _kinked_table():
    """Flat along the MLP axis from 32 to 64 channels (the dense width), steep below 32: removing one
    channel from the dense block saves nothing, removing 33 saves a lot -- the first-order estimate
    under-counts what a batch of MLP removals saves."""
    grid = LatencyGrid.for_model(_dense_config(), points=3)  # mlp axis [1, 32, 64]
    assert grid.mlp == [1, 32, 64]
    vals = np.zeros(grid.shape)
    for idx, (e, h, qk, v, m) in grid.points():
        vals[idx] = 1e-6 * (e * h * (2 * qk + v) + 6 * e * min(m, 32)) + 1e-8
    return LatencyTable(grid, vals, {"synthetic": True})


def _pruner(metric="flops", target=0.2, *, gran="aligned", branches=False, groups=None, table=None,
            allocation="global", seed=0, batches=2):
    """A tiny ViT and its pruner with the saliency of `batches` random batches (deterministic)."""
    model = _model()
    if metric == "latency" and table is None:
        table = _cross_term_table()
    pruner = Pruner(model, Target(metric, target), granularity=gran, branches=branches, group_size=groups,
                    latency_table=table, allocation=allocation, deterministic=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()
    return pruner


def _exact(pruner, metric):
    """The metric of the pruner's current config over the dense one, computed here."""
    cfg, dense = pruner.config(), pruner.dense_config
    if metric == "latency":
        return pruner.table.model_latency(cfg) / pruner.table.model_latency(dense)
    cost = count_flops if metric == "flops" else count_params
    return cost(cfg) / cost(dense)


def _check_step(pruner, info, metric, t):
    """The step's record: exact fraction; if it reached t, within (t − last_group_cost, t]."""
    h = pruner.history[-1]
    f = _exact(pruner, metric)
    assert info.fraction == pytest.approx(f, rel=1e-12, abs=1e-15) and h["fraction"] == info.fraction
    assert h["target"] == t and h["metric"] == metric and h["reached"] == (f <= t) == info.done
    assert h["last_group_cost"] == info.last_group_cost
    if sum(h["removed"].values()):
        assert info.last_group_cost is not None and h["last_group"] is not None
    if h["reached"]:
        assert f <= t
        assert f > t - info.last_group_cost, (f, t, info.last_group_cost, h["last_group"])
    return h


def _check_last_group(make, h, total_removed, metric):
    """Independent check of last_group_cost: the same pruner (same saliency) asked to remove all
    units but the last group's stops exactly before that group; its fraction is the fraction before
    the last group, above the target, and exceeds the step's fraction by last_group_cost."""
    n = total_removed - h["last_group"]["units"]
    if n < 1:
        return
    other = make()
    info = other.prune_step(n)
    assert sum(info.removed.values()) == n
    assert not info.done  # the config before the last group was above the target
    assert _exact(other, metric) - h["fraction"] == pytest.approx(h["last_group_cost"], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["g1", "groups"])
@pytest.mark.parametrize("branches", [False, True], ids=["nobranch", "branches"])
@pytest.mark.parametrize("gran", ["aligned", "per-head"])
@pytest.mark.parametrize("metric", ["flops", "params", "latency"])
def test_one_shot_step_lands_within_one_group_of_a_low_target(metric, gran, branches, groups):
    """One step with every unit allowed, straight to 0.2: it ends at or below 0.2 (it used to stop
    at ~0.29 of the FLOPs) and above 0.2 minus its last group's cost."""
    t = 0.2

    def make():
        return _pruner(metric, t, gran=gran, branches=branches, groups=groups)

    pruner = make()
    info = pruner.prune_step(pruner.units.num_units)
    assert info.fraction <= t and info.done, info.fraction  # the step reached the target
    h = _check_step(pruner, info, metric, t)
    assert h["reached"]
    gs = (groups or {}).get(h["last_group"]["kind"], 1)
    if h["last_group"]["kind"] not in ("head", "attn_branch", "mlp_branch"):
        assert h["last_group"]["units"] == gs  # dims stayed multiples of the group size
    _check_last_group(make, h, sum(info.removed.values()), metric)


@pytest.mark.parametrize("gran", ["aligned", "per-head"])
@pytest.mark.parametrize("metric, groups", [("flops", None), ("params", GROUPS), ("latency", GROUPS),
                                            ("latency", None)])
def test_several_small_steps_each_within_one_group(metric, gran, groups):
    """Many small steps (as in training): those that stop short of the target are above it, the one
    that reaches it lands within its last group, and every record is exact."""
    t = 0.35
    pruner = _pruner(metric, t, gran=gran, groups=groups)
    steps = 0
    while not pruner.done:
        info = pruner.prune_step(12)
        h = _check_step(pruner, info, metric, t)
        assert h["reached"] or sum(info.removed.values()) >= 12  # short of the target: n_units went
        steps += 1
        assert steps < 200
    assert steps > 3 and pruner.history[-1]["reached"]
    assert all(not h["reached"] for h in pruner.history[:-1])


def test_step_short_of_the_target_records_its_last_group():
    """A step whose n_units run out first: above the target, not done, and its last group's exact
    cost is recorded (checked against a pruner stopped one group earlier)."""
    t = 0.2

    def make():
        return _pruner("flops", t, gran="per-head", groups=GROUPS)

    pruner = make()
    info = pruner.prune_step(60)
    h = _check_step(pruner, info, "flops", t)
    assert not info.done and info.fraction > t and sum(info.removed.values()) >= 60
    assert info.last_group_cost > 0
    _check_last_group(make, h, sum(info.removed.values()), "flops")


@pytest.mark.parametrize("gran", ["aligned", "per-head"])
def test_latency_table_kink_does_not_overshoot(gran):
    """Where the first-order estimate UNDER-counts (a flat stretch of the table ends within the
    step), the step must still stop within one group of the target instead of far below it."""
    t = 0.6
    table = _kinked_table()

    def make():
        p = _pruner("latency", t, gran=gran, table=table)
        p.scores[p.units.kind == MLP] *= 1e-4  # MLP channels go first
        return p

    pruner = make()
    info = pruner.prune_step(pruner.units.num_units)
    assert info.done and info.removed["mlp"] > 0
    assert info.fraction > t - 0.02, info.fraction  # one group (an MLP channel, or a head) costs far less
    h = _check_step(pruner, info, "latency", t)
    _check_last_group(make, h, sum(info.removed.values()), "latency")


def test_embedded_model_one_shot_to_flops_target():
    """The CLI's embedded model with its group sizes, one step to 0.4 of the FLOPs (the CLI's
    --one-shot --one-shot-steps 1 case, which ended at 0.409-0.413)."""
    from nvit.tiny_model import create_embedded_model

    torch.manual_seed(0)
    model = create_embedded_model(pretrained=False)
    groups = {"embed": 4, "head": 1, "qk": 2, "v": 2, "mlp": 8}
    pruner = Pruner(model, Target("flops", 0.4), group_size=groups, deterministic=True)
    g = torch.Generator().manual_seed(1)
    for p in pruner.params:
        p.grad = torch.randn(p.shape, generator=g)
    pruner.accumulate()
    info = pruner.prune_step(pruner.units.num_units)
    assert info.fraction <= 0.4 and info.done, info.fraction
    _check_step(pruner, info, "flops", 0.4)


@pytest.mark.parametrize("metric", ["flops", "latency"])
def test_uniform_allocation_records_its_tolerance(metric):
    """The uniform baseline: one step to 0.2 and several small steps; the step that reaches the
    target lands within its last slice (one unit of every bucket whose count changes at the final
    kept ratio), and the other steps stay above the target."""
    for n in (10 ** 6, 40):
        pruner = _pruner(metric, 0.2, allocation="uniform")
        steps = 0
        while not pruner.done:
            info = pruner.prune_step(n)
            h = _check_step(pruner, info, metric, 0.2)
            steps += 1
            assert steps < 100
        assert h["reached"] and h["last_group"] == {"kind": "uniform slice"}
        assert info.last_group_cost > 0  # can be large: at a ratio like 1/4 every kind's buckets shrink together
        cfg = pruner.config()
        assert len({(b.heads, b.qk_dims[0], b.v_dims[0], b.mlp) for b in cfg.blocks}) == 1
        assert (steps == 1) == (n == 10 ** 6)


def test_no_saliency_is_a_distinct_error_and_a_property():
    """A prune step before any accumulate() raises NoSaliencyError (a RuntimeError) and changes
    nothing; has_saliency says beforehand whether a step can rank."""
    from nvit.pruner import NoSaliencyError

    model = _model()
    pruner = Pruner(model, Target("flops", 0.5))
    assert not pruner.has_saliency
    masks = pruner.masks.clone()
    with pytest.raises(NoSaliencyError, match="no saliency"):
        pruner.prune_step(4)
    assert issubclass(NoSaliencyError, RuntimeError)
    assert pruner.masks.equal(masks) and pruner.steps == 0 and pruner.history == []
    model.zero_grad()
    F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    pruner.accumulate()
    assert pruner.has_saliency
    pruner.prune_step(4)
    assert pruner.n_batches == 0 and pruner.has_saliency  # the EMA can rank the next step
    assert set(KIND_NAMES) == set(pruner.history[-1]["removed"])

"""nvit.latency: grid, multilinear lookup, on-disk cache, and one real (tiny) CPU measurement."""
import json

import numpy as np
import pytest
import torch

import nvit.latency as lat
from nvit.cost import block_params
from nvit.latency import LatencyGrid, LatencyTable, cache_key, default_grid
from nvit.model import BlockConfig, NViTConfig

GRID = LatencyGrid(embed=[8, 16, 32], heads=[1, 2], qk=[1, 4], v=[1, 2, 8], mlp=[1, 16])
TINY = LatencyGrid(embed=[4, 8], heads=[1, 2], qk=[1, 3], v=[1, 2], mlp=[1, 8])
BRANCH_CALLS = 2 * (2 * 2 * 2) + 2 * 2  # branch measurements: attention (embed × heads × qk × v), MLP (embed × mlp)
# + the calibration: one point (TINY's centre is its top corner), its block and both branches, 3 rounds
TINY_CALLS = BRANCH_CALLS + 3 * lat.CALIBRATION_ROUNDS


def _table_from(fn, grid=GRID) -> LatencyTable:
    vals = np.zeros(grid.shape)
    for idx, p in grid.points():
        vals[idx] = fn(*p)
    return LatencyTable(grid=grid, values=vals)


def _multilinear(e, h, q, v, m):  # degree ≤ 1 in each variable, positive on and around the grid
    return 1e-3 * (5 + 0.3 * e + 0.2 * h * q + 0.05 * e * h * v + 0.01 * e * m + 0.002 * h * q * v * m)


# ---------------------------------------------------------------------------------------------- grid
def test_grid_sorts_dedups_and_validates():
    g = LatencyGrid(embed=[32, 8, 8], heads=[2, 1], qk=[4], v=[1], mlp=[16, 1])
    assert g.embed == [8, 32] and g.heads == [1, 2] and g.shape == (2, 2, 1, 1, 2) and g.size == 8
    assert LatencyGrid.from_dict(g.to_dict()) == g
    for bad in ([], [0], [1.5], [True]):
        with pytest.raises(ValueError, match="embed"):
            LatencyGrid(embed=bad, heads=[1], qk=[1], v=[1], mlp=[1])
    with pytest.raises(ValueError, match="axes"):
        LatencyGrid.from_dict({"embed": [1]})


def test_default_grid():
    g = default_grid(128, 4, 32, 512)
    assert g == LatencyGrid(embed=[43, 85, 128], heads=[1, 2, 4], qk=[1, 16, 32], v=[1, 16, 32], mlp=[1, 256, 512])
    for name, dense in zip(lat.AXES, (128, 4, 32, 32, 512)):
        assert getattr(g, name)[-1] == dense
    assert all(getattr(g, n)[0] == 1 for n in ("heads", "qk", "v", "mlp"))
    # the paper's DeiT-B grid
    p = default_grid(768, 12, 64, 3072, points={"embed": 3, "heads": 5, "qk": 5, "v": 5, "mlp": 5})
    assert p.embed == [256, 512, 768] and p.heads == [1, 3, 6, 9, 12] and p.qk == [1, 16, 32, 48, 64]
    assert default_grid(8, 1, 1, 2, points=4).heads == [1]  # duplicates collapse
    with pytest.raises(ValueError, match="unknown grid axes"):
        default_grid(8, 2, 2, 2, points={"depth": 2})
    cfg = NViTConfig(32, 16, 3, 10, 64, [BlockConfig([16] * 4, [16] * 4, 256, [0.25] * 4)])
    assert LatencyGrid.for_model(cfg) == default_grid(64, 4, 16, 256, points={"embed": 3, "heads": 5, "qk": 5,
                                                                             "v": 5, "mlp": 5})
    assert LatencyGrid.for_model(cfg, points=3) == default_grid(64, 4, 16, 256)


# ------------------------------------------------------------------------------------ interpolation
def test_exact_at_grid_points():
    rng = np.random.default_rng(0)
    t = LatencyTable(grid=GRID, values=rng.uniform(1e-4, 1e-2, GRID.shape))
    for idx, p in GRID.points():
        assert t.block_latency(*p) == t.values[idx]


def test_multilinear_function_reproduced_inside_and_outside():
    t = _table_from(_multilinear)
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = [rng.uniform(lo - 0.3 * (hi - lo), hi + 0.3 * (hi - lo)) for lo, hi in ((a[0], a[-1]) for a in GRID.axes)]
        p = [max(x, 0.5) for x in p]
        assert t.block_latency(*p) == pytest.approx(_multilinear(*p), rel=1e-12)


def test_linear_extrapolation_not_clamped_and_floored_at_zero():
    t = _table_from(lambda e, h, q, v, m: 1e-3 * e)  # 8, 16, 32 -> 8e-3 .. 32e-3
    assert t.block_latency(4, 1, 1, 1, 1) == pytest.approx(4e-3)  # below the grid: keeps falling
    assert t.block_latency(64, 1, 1, 1, 1) == pytest.approx(64e-3)  # above: keeps rising
    s = _table_from(lambda e, h, q, v, m: 1e-3 * (e - 7))  # would be negative below embed 7
    assert s.block_latency(2, 1, 1, 1, 1) == 0.0


def test_monotone_where_measurements_are():
    rng = np.random.default_rng(2)
    vals = rng.uniform(0, 1e-3, GRID.shape)
    for ax in range(5):
        vals = np.cumsum(vals, axis=ax)  # non-decreasing along every axis
    t = LatencyTable(grid=GRID, values=vals)
    for _ in range(10):
        base = [rng.uniform(a[0], a[-1]) for a in GRID.axes]
        for ax, a in enumerate(GRID.axes):
            xs = np.linspace(a[0] - 0.5 * (a[-1] - a[0]), a[-1] + 0.5 * (a[-1] - a[0]), 41)
            ys = [t.block_latency(*(base[:ax] + [x] + base[ax + 1:])) for x in xs]
            assert all(y1 <= y2 + 1e-15 for y1, y2 in zip(ys, ys[1:])), (ax, ys)
            assert min(ys) >= 0.0


def test_single_point_axis_is_constant():
    g = LatencyGrid(embed=[8, 16], heads=[2], qk=[4], v=[4], mlp=[1, 16])
    t = _table_from(lambda e, h, q, v, m: 1e-3 * (e + m), grid=g)
    assert t.block_latency(12, 7, 1.5, 30, 8.5) == pytest.approx(1e-3 * 20.5)


def test_block_config_and_model_latency_use_mean_dims_and_sum_blocks():
    t = _table_from(_multilinear)
    uneven = BlockConfig(qk_dims=[1, 4, 2], v_dims=[8, 1, 3], mlp=9, scales=[1.0, 0.5, 0.7])
    assert t.block_config_latency(12, uneven) == pytest.approx(t.block_latency(12, 3, 7 / 3, 4, 9))
    dense = BlockConfig(qk_dims=[4, 4], v_dims=[8, 8], mlp=16, scales=[0.5, 0.5])
    cfg = NViTConfig(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, blocks=[uneven, dense])
    assert t.model_latency(cfg) == pytest.approx(t.block_config_latency(16, uneven) + t.block_latency(16, 2, 4, 8, 16))


def test_monotonized_removes_dips_only():
    rng = np.random.default_rng(3)
    vals = rng.uniform(0, 1e-3, GRID.shape)
    m = LatencyTable(grid=GRID, values=vals).monotonized()
    for ax in range(5):
        assert np.all(np.diff(m.values, axis=ax) >= 0)
    assert np.all(m.values >= vals)
    inc = np.cumsum(np.cumsum(vals, axis=0), axis=4)
    inc = np.maximum.accumulate(np.maximum.accumulate(np.maximum.accumulate(inc, 1), 2), 3)
    np.testing.assert_array_equal(LatencyTable(grid=GRID, values=inc).monotonized().values, inc)


# --------------------------------------------------------------------------------- serialisation
def test_dict_and_file_roundtrip(tmp_path):
    t = _table_from(_multilinear)
    t.meta["device"] = "test"
    u = LatencyTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert u.grid == t.grid and np.array_equal(u.values, t.values) and u.meta == t.meta
    t.save(tmp_path / "t.json")
    v = LatencyTable.load(tmp_path / "t.json")
    assert np.array_equal(v.values, t.values) and v.grid == t.grid
    with pytest.raises(ValueError, match="shape"):
        LatencyTable(grid=GRID, values=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        LatencyTable(grid=GRID, values=np.full(GRID.shape, -1.0))
    with pytest.raises(ValueError, match="format"):
        LatencyTable.from_dict(dict(t.to_dict(), format=99))


# ---------------------------------------------------------------------------------------- caching
class FakeTimer:
    """Stands in for the timer: counts calls, checks the block/input built, returns a known 'latency'."""

    def __init__(self, whole_block_factor: float = 1.0, burst_calls: tuple = ()):
        self.calls = 0
        self.burst_calls = burst_calls  # these calls "hit a burst of background load": 100x slower
        self.whole_block_factor = whole_block_factor  # a whole block "runs" this much slower than its branches
        self.whole_blocks = 0

    def __call__(self, block, x, *, warmup, repeats, statistic="median"):
        self.calls += 1
        embed = x.shape[-1]
        whole = block.has_attn and block.has_mlp  # a calibration point; else one branch at a time
        self.whole_blocks += whole
        a = block.attn if block.has_attn else None
        cfg = BlockConfig(a.qk_dims if a else [], a.v_dims if a else [],
                          block.mlp.fc1.out_features if block.has_mlp else 0, a.scales if a else [])
        assert not block.training and torch.is_inference_mode_enabled()
        if a:
            assert len(set(cfg.qk_dims)) == 1 and len(set(cfg.v_dims)) == 1
            assert cfg.scales == [cfg.qk_dims[0] ** -0.5] * cfg.heads
        burst = 100.0 if self.calls in self.burst_calls else 1.0
        return 1e-9 * block_params(embed, cfg) * (self.whole_block_factor if whole else 1.0) * burst


@pytest.fixture
def fake_timer(monkeypatch):
    ft = FakeTimer()
    monkeypatch.setattr(lat, "_time_block", ft)
    return ft


def _measure(tmp_path, **kw):
    args = dict(tokens=5, batch_size=2, cache_dir=tmp_path, progress=False)
    args.update(kw)
    return LatencyTable.measure(TINY, **args)


def test_measure_fills_each_point_with_its_block(tmp_path, fake_timer):
    """Each point is its attention branch plus its MLP branch, each measured once on its own axes
    (the fake timer returns 1e-9 × the parameters of what it times: the two branches sum to the block)."""
    t = _measure(tmp_path)
    E, Hs, Qs, Vs, Ms = TINY.axes
    assert BRANCH_CALLS == len(E) * (len(Hs) * len(Qs) * len(Vs) + len(Ms))
    assert fake_timer.calls == TINY_CALLS < TINY.size and fake_timer.whole_blocks == lat.CALIBRATION_ROUNDS
    for idx, (e, h, q, v, m) in TINY.points():
        assert t.values[idx] == pytest.approx(1e-9 * block_params(e, BlockConfig([q] * h, [v] * h, m, [1.0] * h)))
    assert t.meta["tokens"] == 5 and t.meta["batch_size"] == 2 and t.meta["dtype"] == "float32"


def test_branch_sums_calibrated_against_whole_blocks(tmp_path, monkeypatch):
    """Whole blocks timed 1.25× slower than their branches' sum: every point is scaled by 1.25, and the
    calibration (factor, points with both figures) is recorded; the top corner and the centre are timed.
    A burst of load on one branch timing of the grid does not move the factor: the calibration times
    each point's branches again, next to its block."""
    ft = FakeTimer(whole_block_factor=1.25)
    monkeypatch.setattr(lat, "_time_block", ft)
    t = LatencyTable.measure(GRID, tokens=5, batch_size=2, cache_dir=tmp_path, progress=False)
    cal = t.meta["calibration"]
    assert ft.whole_blocks == 2 * lat.CALIBRATION_ROUNDS and cal["factor"] == pytest.approx(1.25)
    assert [p["point"] for p in cal["points"]] == [[32, 2, 4, 8, 16], [16, 2, 4, 2, 16]]
    for idx, (e, h, q, v, m) in GRID.points():
        assert t.values[idx] == pytest.approx(1.25e-9 * block_params(e, BlockConfig([q] * h, [v] * h, m, [1.0] * h)))


def test_calibration_ignores_a_load_burst_on_the_grid_and_in_one_round(tmp_path, monkeypatch):
    """A burst on a grid branch timing, and one on a calibration round, leave the factor exact."""
    monkeypatch.setattr(lat, "_time_block", FakeTimer(whole_block_factor=1.25, burst_calls=(1, TINY_CALLS)))
    t = LatencyTable.measure(TINY, tokens=5, batch_size=2, cache_dir=tmp_path, progress=False)
    assert t.meta["calibration"]["factor"] == pytest.approx(1.25)


def test_cache_hit_does_not_remeasure(tmp_path, fake_timer):
    t1 = _measure(tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    t2 = _measure(tmp_path)
    assert fake_timer.calls == TINY_CALLS  # loaded, not measured
    assert np.array_equal(t1.values, t2.values) and t2.grid == TINY
    _measure(tmp_path, refresh=True)
    assert fake_timer.calls == 2 * TINY_CALLS
    _measure(tmp_path, use_cache=False)
    assert fake_timer.calls == 3 * TINY_CALLS


def test_cache_dir_from_env(tmp_path, fake_timer, monkeypatch):
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path))
    assert lat.default_cache_dir() == tmp_path / "latency"
    LatencyTable.measure(TINY, tokens=5, batch_size=2, progress=False)
    assert len(list((tmp_path / "latency").glob("latency-*.json"))) == 1


def test_cache_key_changes_with_settings(tmp_path, fake_timer):
    base = dict(tokens=5, batch_size=2, dtype=torch.float32, device="cpu")
    k0 = cache_key(TINY, **base)
    assert k0 == cache_key(TINY, **base)
    assert k0["threads"] == torch.get_num_threads() and k0["torch"] == torch.__version__ and k0["device"]
    variants = [cache_key(TINY, **dict(base, tokens=6)), cache_key(TINY, **dict(base, batch_size=3)),
                cache_key(TINY, **dict(base, dtype=torch.float64)),
                cache_key(LatencyGrid(embed=[4], heads=[1], qk=[1], v=[1], mlp=[1]), **base),
                cache_key(TINY, **base, extra={"kernels": "v2"})]
    old = torch.get_num_threads()
    torch.set_num_threads(1 if old != 1 else 2)
    try:
        variants.append(cache_key(TINY, **base))
    finally:
        torch.set_num_threads(old)
    hashes = {lat._key_hash(k) for k in [k0] + variants}
    assert len(hashes) == len(variants) + 1
    # a different setting is a cache miss
    _measure(tmp_path)
    _measure(tmp_path, tokens=6)
    _measure(tmp_path, dtype=torch.float64)
    _measure(tmp_path, statistic="min")
    assert fake_timer.calls == 4 * TINY_CALLS and len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key", "bad_values"])
def test_corrupt_cache_warns_and_remeasures(tmp_path, fake_timer, damage):
    t1 = _measure(tmp_path)
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    if damage == "garbage":
        path.write_text("not json at all")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "other_key":
        d = json.loads(text)
        d["key"]["tokens"] = 999
        path.write_text(json.dumps(d))
    else:
        d = json.loads(text)
        d["table"]["values"] = "oops"
        path.write_text(json.dumps(d))
    with pytest.warns(RuntimeWarning, match="unusable"):
        t2 = _measure(tmp_path)
    assert fake_timer.calls == 2 * TINY_CALLS
    assert np.array_equal(t1.values, t2.values)
    _measure(tmp_path)  # the re-measured table was written back: now a hit
    assert fake_timer.calls == 2 * TINY_CALLS


def test_atomic_write_keeps_old_file_on_failure(tmp_path, fake_timer, monkeypatch):
    _measure(tmp_path)
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()

    import nvit.io as nio

    real_write_text = nio.Path.write_text

    def failing_write(self, text, *a, **kw):
        real_write_text(self, text[: len(text) // 2])  # a half-written temp file...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(nio.Path, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        _measure(tmp_path, refresh=True)
    assert path.read_bytes() == before  # the old table is intact
    assert list(tmp_path.iterdir()) == [path]  # and no temp file is left behind
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(nio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        LatencyTable(grid=TINY, values=np.ones(TINY.shape)).save(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == [path]  # save() cleans up its temp file too


# ------------------------------------------------------------------------------- real measurement
def test_real_tiny_measurement_on_cpu(tmp_path):
    t = LatencyTable.measure(TINY, tokens=5, batch_size=2, warmup=0, repeats=1, cache_dir=tmp_path, progress=False)
    assert t.values.shape == TINY.shape
    assert np.all(np.isfinite(t.values)) and np.all(t.values > 0)
    assert t.meta["device"] == lat.device_name("cpu") and t.meta["repeats"] == 1
    assert t.block_latency(6, 1.5, 2, 1.5, 4) > 0
    cached = json.loads(next(tmp_path.iterdir()).read_text())
    assert np.array_equal(LatencyTable.from_dict(cached["table"]).values, t.values)
    with pytest.raises(ValueError, match="statistic"):
        LatencyTable.measure(TINY, tokens=5, batch_size=2, statistic="mean", use_cache=False, progress=False)
    with pytest.raises(ValueError, match="repeats"):
        LatencyTable.measure(TINY, tokens=5, batch_size=2, repeats=0, use_cache=False, progress=False)


def test_time_block_statistics_skip_warmup(monkeypatch):
    clock = [0.0]  # a fake clock: each forward "takes" its delay, so the test does not depend on load
    monkeypatch.setattr(lat.time, "perf_counter", lambda: clock[0])

    class Sleeper(torch.nn.Module):  # warmup calls are slow; then one fast call among slow ones
        def __init__(self, delays):
            super().__init__()
            self.delays = list(delays)

        def forward(self, x):
            clock[0] += self.delays.pop(0)
            return x

    x = torch.zeros(1)
    assert lat._time_block(Sleeper([0.3, 0.3, 0.02, 0.0, 0.02]), x, warmup=2, repeats=3) == pytest.approx(0.02)
    assert lat._time_block(Sleeper([0.3, 0.02, 0.0, 0.02]), x, warmup=1, repeats=3, statistic="min") == 0.0
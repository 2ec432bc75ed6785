"""Measured block-latency lookup table for latency-aware pruning (NViT's Lat(W)).

One NViT block's forward latency is tabulated on a 5-D grid — embedding width, heads, per-head QK
dim, per-head V dim, MLP width — for a fixed token count, batch size, dtype and device; between grid
points it is interpolated multilinearly. A pre-norm block runs its attention branch and then its MLP
branch, so its latency is the sum of the two: each branch is measured on its own axes (attention:
embedding × heads × QK × V; MLP: embedding × MLP) and the table holds the sums -- the paper's 5-point
grid then takes 390 measurements instead of 1875, and a block without a branch is measured too.
A branch timed alone need not run as fast as inside a whole block (on one 2-core AMD EPYC machine the
sums underpredicted whole blocks by 12-16 %; on an Intel Xeon they agreed within 1 %), so the sums are
calibrated by one factor: whole blocks and their branches are timed side by side at a few grid points (:data:`CALIBRATION_POINTS`) and the
table is scaled so that it predicts the whole blocks. A model's latency is the sum of its blocks' latencies: the
stem (patch embedding, tokens) and the head (final norm, classifier) are ignored, as in the paper
(pruning does not change them except through the embedding width, and they are small).

Tables are cached on disk as JSON (``~/.cache/nvit/latency``, or ``$NVIT_CACHE_DIR/latency``, or the
``cache_dir`` argument), one file per measurement setting: device name, torch version, dtype, batch
size, tokens, grid, CPU thread count and the attention backend in use. A hit loads instead of
measuring; an unreadable or mismatched file is reported with a warning and re-measured.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .io import atomic_write_json
from .model import BlockConfig, NViTBlock, NViTConfig

# A Swin stage's blocks: (feature map (H, W), window (wh, ww), shift (sh, sw)), as NViTSwinConfig.geometry
Window = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

__all__ = ["AXES", "LatencyGrid", "LatencyTable", "SwinLatencyTables", "default_grid", "default_cache_dir",
           "device_name"]

AXES = ("embed", "heads", "qk", "v", "mlp")
FORMAT_VERSION = 3  # bump when what is measured changes (invalidates every cached table); 2: branch sums;
# 3: branch sums calibrated against whole blocks
# Where whole blocks are timed to calibrate the branch sums: the grid's top corner (the dense block)
# and its centre (each axis's middle value: a typical pruned block).
CALIBRATION_POINTS = ("top", "centre")


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------
@dataclass
class LatencyGrid:
    """Grid values per axis (sorted, unique integers ≥ 1). qk and v are per-head dims."""

    embed: list[int]
    heads: list[int]
    qk: list[int]
    v: list[int]
    mlp: list[int]

    def __post_init__(self):
        for name in AXES:
            vals = list(getattr(self, name))
            if not vals:
                raise ValueError(f"nvit: LatencyGrid.{name} is empty; every axis needs at least one value")
            for x in vals:
                if isinstance(x, bool) or int(x) != x or x < 1:
                    raise ValueError(f"nvit: LatencyGrid.{name} has {x!r}; grid values must be integers ≥ 1")
            setattr(self, name, sorted({int(x) for x in vals}))

    @property
    def axes(self) -> tuple[list[int], ...]:
        return tuple(getattr(self, name) for name in AXES)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def points(self) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(index, (embed, heads, qk, v, mlp)) for every grid point, in C order."""
        for idx in np.ndindex(*self.shape):
            yield idx, tuple(a[i] for a, i in zip(self.axes, idx))

    def to_dict(self) -> dict[str, list[int]]:
        return {name: list(getattr(self, name)) for name in AXES}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[int]]) -> "LatencyGrid":
        if set(d) != set(AXES):
            raise ValueError(f"nvit: a latency grid needs exactly the axes {AXES}, got {sorted(d)}")
        return cls(**{k: list(v) for k, v in d.items()})

    @classmethod
    def for_model(cls, config: NViTConfig, points: int | Mapping[str, int] = 5, embed_points: int = 3) -> "LatencyGrid":
        """default_grid from the widest block of `config` (its dense dims, before pruning); an int
        `points` sets heads, QK, V and MLP, the embedding takes `embed_points` (the paper: 5 and 3)."""
        b = config.blocks
        if isinstance(points, int):
            points = {name: points for name in AXES if name != "embed"} | {"embed": embed_points}
        return default_grid(config.embed_dim, max(x.heads for x in b),
                            max(max(x.qk_dims + x.v_dims) for x in b), max(x.mlp for x in b), points)


def _spread(dense: int, n: int, lowest_one: bool) -> list[int]:
    if n < 1:
        raise ValueError(f"nvit: a grid axis needs ≥1 point, got {n}")
    if lowest_one:  # 1 plus n-1 even steps up to dense: heads 12, n=5 -> 1, 3, 6, 9, 12 (the paper's grid)
        vals = [1] + [round(dense * k / (n - 1)) for k in range(1, n)] if n > 1 else [dense]
    else:  # n even steps up to dense: embed 768, n=3 -> 256, 512, 768 (the paper's grid)
        vals = [round(dense * k / n) for k in range(1, n + 1)]
    return sorted({max(1, v) for v in vals})


def default_grid(embed_dim: int, heads: int, head_dim: int, mlp: int,
                 points: int | Mapping[str, int] = 3) -> LatencyGrid:
    """A small grid around a dense model: `points` values per axis (an int, or a dict per axis name).

    Heads, QK, V and MLP span 1 .. dense in even steps (1, D/(n-1), ..., D): pruning can take them
    to 1. The embedding spans D/n .. D in n even steps (a block with embedding 1 is meaningless and
    the paper's grid starts at D/3); below D/n the table extrapolates linearly. With points=5 for
    heads/QK/V and 3 for the embedding this is the paper's DeiT-B grid.
    """
    pts = {name: points for name in AXES} if isinstance(points, int) else {name: 3 for name in AXES}
    if not isinstance(points, int):
        unknown = set(points) - set(AXES)
        if unknown:
            raise ValueError(f"nvit: unknown grid axes {sorted(unknown)}; axes are {AXES}")
        pts.update(points)
    return LatencyGrid(embed=_spread(embed_dim, pts["embed"], False), heads=_spread(heads, pts["heads"], True),
                       qk=_spread(head_dim, pts["qk"], True), v=_spread(head_dim, pts["v"], True),
                       mlp=_spread(mlp, pts["mlp"], True))


# --------------------------------------------------------------------------------------------------
# Measurement settings and cache
# --------------------------------------------------------------------------------------------------
def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model string (what the latency depends on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def default_cache_dir() -> Path:
    """$NVIT_CACHE_DIR/latency if NVIT_CACHE_DIR is set (the root of nvit's caches), else ~/.cache/nvit/latency."""
    root = os.environ.get("NVIT_CACHE_DIR")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "nvit" / "latency"


def _attention_backend(device: torch.device) -> str:
    from nvit_kernels import dispatch

    return dispatch.resolve("attention", device)  # silent: a fallback notice belongs to the measurement


def cache_key(grid: LatencyGrid, *, tokens: int, batch_size: int, dtype: torch.dtype,
              device: torch.device | str, extra: Mapping[str, Any] | None = None) -> dict:
    """Everything a measured table depends on; its hash names the cache file."""
    device = torch.device(device)
    key = {"format": FORMAT_VERSION, "device_type": device.type, "device": device_name(device),
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch_size": int(batch_size),
           "tokens": int(tokens), "grid": grid.to_dict(), "threads": torch.get_num_threads(),
           "attention_backend": _attention_backend(device)}
    if extra:
        key["extra"] = dict(extra)
    return key


def _key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _cache_entry(grid: LatencyGrid, *, tokens: int, batch_size: int, dtype: torch.dtype, device, extra_key=None,
                 statistic: str = "median", cache_dir=None) -> tuple[dict, Path]:
    """(cache key, cache file) of a measurement."""
    key = cache_key(grid, tokens=tokens, batch_size=batch_size, dtype=dtype, device=device, extra=extra_key)
    if statistic != "median":  # (the median's key stays as it was)
        key["statistic"] = statistic
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return key, root / f"latency-{_key_hash(key)}.json"


def is_cached(grid: LatencyGrid, *, tokens: int, batch_size: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", cache_dir=None) -> bool:
    """Whether LatencyTable.measure with these settings would load a cached table."""
    return _cache_entry(grid, tokens=tokens, batch_size=batch_size, dtype=dtype, device=torch.device(device),
                        cache_dir=cache_dir)[1].exists()


def estimate_measure_seconds(grid: LatencyGrid, *, tokens: int, batch_size: int, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu") -> float:
    """About how long LatencyTable.measure takes for `grid` (default warmup/repeats): the widest
    attention and MLP branches timed once, scaled by the number of points (an average point costs
    about half the widest) plus a few ms per point to build its module."""
    device = torch.device(device)
    E, Hs, Qs, Vs, Ms = grid.axes
    calls = (1 + 3) if device.type == "cpu" else (3 + 10)
    x = torch.randn(batch_size, tokens, E[-1]).to(device=device, dtype=dtype)
    total = 0.0
    with torch.inference_mode():
        for cfg, n in ((BlockConfig([Qs[-1]] * Hs[-1], [Vs[-1]] * Hs[-1], 0, [1.0] * Hs[-1]), len(E) * len(Hs) * len(Qs) * len(Vs)),
                       (BlockConfig([], [], Ms[-1], []), len(E) * len(Ms))):
            block = NViTBlock(E[-1], cfg).to(device=device, dtype=dtype).eval()
            total += n * (calls * 0.5 * _time_block(block, x, warmup=1, repeats=1) + 0.003)
    return total


def _time_block(block: torch.nn.Module, x: torch.Tensor, *, warmup: int, repeats: int,
                statistic: str = "median") -> float:
    """Median (or min) wall time (s) of one forward; synchronises the GPU around each timed call."""
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        block(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(x)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) if statistic == "min" else statistics.median(times)


CALIBRATION_ROUNDS = 3


def _block(embed: int, cfg: BlockConfig, window: Window | None) -> torch.nn.Module:
    """The block a table times: NViT's, or (a Swin stage's window geometry) NViT-Swin's window block."""
    if window is None:
        return NViTBlock(embed, cfg)
    from .model_swin import SwinBlock

    return SwinBlock(embed, cfg, window, qkv_bias=True, norm_eps=1e-5)


def _input(batch_size: int, tokens: int, embed: int, window: Window | None, gen) -> torch.Tensor:
    """[B, tokens, D], or a Swin stage's feature map [B, H, W, D] (H·W = tokens)."""
    return torch.randn(batch_size, *(window[0] if window else (tokens,)), embed, generator=gen)


def _calibrate(grid: LatencyGrid, inputs: dict[int, torch.Tensor], *, device, dtype, warmup: int, repeats: int,
               statistic: str, window: Window | None = None) -> dict:
    """The factor that makes branch sums predict whole blocks, from CALIBRATION_POINTS: at each, the whole
    block and its two branches are timed side by side in CALIBRATION_ROUNDS interleaved rounds (fastest
    round each), so a burst of background load cannot land on one side of the ratio only -- the grid's
    own branch timings, spread over the whole measurement, could not give that."""
    centre = tuple(len(a) // 2 for a in grid.axes)
    top = tuple(len(a) - 1 for a in grid.axes)
    points, whole, summed = [], 0.0, 0.0
    for idx in dict.fromkeys(top if p == "top" else centre for p in CALIBRATION_POINTS):  # unique, in order
        embed, heads, qk, v, mlp = (a[i] for a, i in zip(grid.axes, idx))
        attn = ([qk] * heads, [v] * heads, [qk ** -0.5] * heads)
        parts = {"block": BlockConfig(attn[0], attn[1], mlp, attn[2]), "attn": BlockConfig(attn[0], attn[1], 0, attn[2]),
                 "mlp": BlockConfig([], [], mlp, [])}
        blocks = {k: _block(embed, c, window).to(device=device, dtype=dtype).eval() for k, c in parts.items()}
        best = dict.fromkeys(blocks, math.inf)
        with torch.inference_mode():
            for _ in range(CALIBRATION_ROUNDS):
                for k, blk in blocks.items():
                    best[k] = min(best[k], _time_block(blk, inputs[embed], warmup=warmup, repeats=repeats,
                                                       statistic=statistic))
        branches = best["attn"] + best["mlp"]
        points.append({"point": [embed, heads, qk, v, mlp], "block_s": best["block"], "branches_s": branches})
        whole += best["block"]
        summed += branches
    return {"factor": whole / summed if summed > 0 else 1.0, "points": points}


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)  # values is an array: compare tables by .grid and np.array_equal(.values)
class LatencyTable:
    """Block latency (seconds) at every point of `grid`; `values` has shape grid.shape."""

    grid: LatencyGrid
    values: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != self.grid.shape:
            raise ValueError(f"nvit: latency values have shape {self.values.shape}, the grid needs {self.grid.shape}")
        if not np.all(np.isfinite(self.values)) or np.any(self.values < 0):
            raise ValueError("nvit: latency values must be finite and ≥ 0")

    # -- measuring ---------------------------------------------------------------------------------
    @classmethod
    def measure(cls, grid: LatencyGrid, *, tokens: int, batch_size: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", warmup: int | None = None, repeats: int | None = None,
                cache_dir: str | os.PathLike | None = None, use_cache: bool = True, refresh: bool = False,
                extra_key: Mapping[str, Any] | None = None, statistic: str = "median",
                progress: bool = True, window: Window | None = None) -> "LatencyTable":
        """One NViT block's forward latency at every grid point: its attention branch and its MLP branch
        each timed (median of `repeats` after `warmup` calls) on their own axes, and summed; the sums
        scaled by one factor so that they predict whole blocks timed at CALIBRATION_POINTS
        (meta["calibration"]: the factor and each point's whole-block and branch-sum times).

        Branches have `heads` equal heads of `qk`/`v` dims, scale qk^-0.5, run in eval mode under
        inference_mode on a random [batch_size, tokens, embed] input. Defaults: warmup 1 / repeats 3
        on CPU (the default 5-point grid of a 128-wide model then takes about 20 s on 2 idle cores),
        3 / 10 on GPU. `statistic="min"` takes the fastest repeat instead of the median (more robust
        on a CPU shared with other jobs; it is part of the cache key). Points are measured in a shuffled (seeded) order so that drift in the machine's
        load shows up as noise rather than as a slope along one axis.

        With `use_cache` a table measured under the same settings (see :func:`cache_key`; `extra_key`
        adds your own, e.g. a kernel build id) is loaded from `cache_dir` (default
        :func:`default_cache_dir`) instead; `refresh` re-measures and overwrites it.

        `window` (a Swin stage's feature map, window and shift; tokens = H·W): time NViT-Swin's window
        block on [batch_size, H, W, embed] instead -- its attention runs on batch_size·nW windows of
        wh·ww tokens each, with the shift's roll, padding and mask (see :class:`SwinLatencyTables`).
        """
        device = torch.device(device)
        warmup = (3 if device.type == "cuda" else 1) if warmup is None else warmup
        repeats = (10 if device.type == "cuda" else 3) if repeats is None else repeats
        if statistic not in ("median", "min"):
            raise ValueError(f"nvit: statistic must be 'median' or 'min', got {statistic!r}")
        if tokens < 1 or batch_size < 1 or warmup < 0 or repeats < 1:
            raise ValueError(f"nvit: need tokens ≥ 1, batch_size ≥ 1, warmup ≥ 0, repeats ≥ 1; got "
                             f"{tokens}, {batch_size}, {warmup}, {repeats}")
        if window is not None:
            if window[0][0] * window[0][1] != tokens:
                raise ValueError(f"nvit: a Swin stage's map {window[0]} has {window[0][0] * window[0][1]} tokens, "
                                 f"not {tokens}")
            extra_key = {**(extra_key or {}), "swin_window": [list(w) for w in window]}
        key, path = _cache_entry(grid, tokens=tokens, batch_size=batch_size, dtype=dtype, device=device,
                                 extra_key=extra_key, statistic=statistic, cache_dir=cache_dir)
        if use_cache and not refresh and path.exists():
            table = cls._load_cached(path, key)
            if table is not None:
                return table

        from tqdm.auto import tqdm

        E, Hs, Qs, Vs, Ms = grid.axes
        branches = [(("attn", e, h, q, v), BlockConfig([q] * h, [v] * h, 0, [q ** -0.5] * h))
                    for e in E for h in Hs for q in Qs for v in Vs]
        branches += [(("mlp", e, m), BlockConfig([], [], m, [])) for e in E for m in Ms]
        np.random.default_rng(0).shuffle(branches)  # machine drift shows up as noise, not as a slope along an axis
        t_start = time.perf_counter()
        gen = torch.Generator(device="cpu").manual_seed(0)
        inputs: dict[int, torch.Tensor] = {}
        timed: dict[tuple, float] = {}
        with torch.inference_mode(), tqdm(total=len(branches), desc="nvit latency table", disable=not progress) as bar:
            for name, cfg in branches:
                embed = name[1]
                block = _block(embed, cfg, window).to(device=device, dtype=dtype).eval()
                if embed not in inputs:
                    inputs[embed] = _input(batch_size, tokens, embed, window, gen).to(device=device, dtype=dtype)
                timed[name] = _time_block(block, inputs[embed], warmup=warmup, repeats=repeats, statistic=statistic)
                del block
                bar.update(1)
        values = np.zeros(grid.shape)
        for idx, (embed, heads, qk, v, mlp) in grid.points():
            values[idx] = timed[("attn", embed, heads, qk, v)] + timed[("mlp", embed, mlp)]
        calibration = _calibrate(grid, inputs, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                                 statistic=statistic, window=window)
        values *= calibration["factor"]
        meta = dict(key, warmup=warmup, repeats=repeats, calibration=calibration,
                    measure_seconds=round(time.perf_counter() - t_start, 3),
                    measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        table = cls(grid=grid, values=values, meta=meta)
        if use_cache:
            atomic_write_json(path, {"key": key, "table": table.to_dict()}, indent=1)
        return table

    @classmethod
    def _load_cached(cls, path: Path, key: dict) -> "LatencyTable | None":
        try:
            with open(path) as f:
                d = json.load(f)
            if d.get("key") != key:
                raise ValueError("its settings do not match this measurement")
            return cls.from_dict(d["table"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"nvit: latency cache {path} is unusable ({type(e).__name__}: {e}); re-measuring",
                          RuntimeWarning, stacklevel=3)
            return None

    # -- lookup ------------------------------------------------------------------------------------
    def block_latency(self, embed: float, heads: float, qk: float, v: float, mlp: float) -> float:
        """Latency (s) of one block by multilinear interpolation over the 5-D grid.

        Exact at grid points. Outside the grid each axis extrapolates linearly from its nearest
        segment (not clamped: pruning below the smallest grid point must still lower the latency);
        the result is floored at 0. Arguments may be non-integers (mean per-head dims of uneven heads).
        Along an axis the result is monotone wherever the measurements are.
        """
        idxs, weights = [], []
        for g, x in zip(self.grid.axes, (embed, heads, qk, v, mlp)):
            x = float(x)
            if len(g) == 1:  # a single value: the latency is taken as constant along this axis
                idxs.append([0])
                weights.append(np.ones(1))
                continue
            i = min(max(bisect.bisect_right(g, x) - 1, 0), len(g) - 2)
            t = (x - g[i]) / (g[i + 1] - g[i])
            idxs.append([i, i + 1])
            weights.append(np.array([1.0 - t, t]))
        sub = self.values[np.ix_(*idxs)]
        for w in weights:  # contract one axis at a time (the leading one)
            sub = np.tensordot(w, sub, axes=(0, 0))
        return max(0.0, float(sub))

    def block_config_latency(self, embed: int, block_cfg: BlockConfig) -> float:
        """Latency of a block with `block_cfg`: heads = its head count, qk / v = its mean per-head dims.

        A removed branch is modelled by extrapolating its axis to 0 (heads = 0 with the grid's smallest
        QK/V dims, or mlp = 0): the table is measured on whole blocks, so a block without a branch is
        an extrapolation, not a measurement."""
        if not block_cfg.has_attn and not block_cfg.has_mlp:
            return 0.0
        if not block_cfg.has_attn:
            qk, v = self.grid.axes[2][0], self.grid.axes[3][0]
            return self.block_latency(embed, 0, qk, v, block_cfg.mlp)
        return self.block_latency(embed, block_cfg.heads, float(np.mean(block_cfg.qk_dims)),
                                  float(np.mean(block_cfg.v_dims)), block_cfg.mlp)

    def config_block_latency(self, config: NViTConfig, block_cfg: BlockConfig) -> float:
        """A block's latency in a model of `config` (its embedding width)."""
        return self.block_config_latency(config.embed_dim, block_cfg)

    def covers(self, config) -> bool:
        """Whether this table models `config`'s blocks (NViT's ViT blocks)."""
        return config.family == "vit"

    def model_latency(self, config: NViTConfig) -> float:
        """Sum of the blocks' latencies (stem and head ignored, as in the paper).

        The result is for the table's batch size and token count (meta["batch_size"], meta["tokens"]),
        whatever config.num_tokens is: measure the table at the model's token count.
        """
        return float(sum(self.block_config_latency(config.embed_dim, b) for b in config.blocks))

    def monotonized(self) -> "LatencyTable":
        """A copy whose values never decrease along any axis (running max along each axis in turn).

        Measurement noise can make a smaller block look slower than a bigger one; a pruning step that
        then "costs" latency is wrong. The running max removes such dips (biased upward, by at most
        the noise); it keeps the values where they are already monotone.
        """
        vals = self.values
        for ax in range(vals.ndim):
            vals = np.maximum.accumulate(vals, axis=ax)
        return LatencyTable(grid=self.grid, values=vals, meta=dict(self.meta, monotonized=True))

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "grid": self.grid.to_dict(), "values": self.values.tolist(),
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyTable":
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"nvit: latency table format {d.get('format')!r}, expected {FORMAT_VERSION}")
        return cls(grid=LatencyGrid.from_dict(d["grid"]), values=np.array(d["values"], dtype=np.float64),
                   meta=dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        m = self.meta
        return (f"LatencyTable(grid={self.grid.shape}, device={m.get('device')!r}, dtype={m.get('dtype')}, "
                f"batch={m.get('batch_size')}, tokens={m.get('tokens')}, "
                f"range={self.values.min() * 1e3:.3f}..{self.values.max() * 1e3:.3f} ms)")



@dataclass
class SwinLatencyTables:
    """Latency of NViT-Swin blocks: one :class:`LatencyTable` per stage, each timing the stage's window
    block (its feature map, window size and so tokens per window and number of windows, its shift) over
    the stage's grid of embedding width, heads, QK, V and MLP. A model's latency is the sum of its
    blocks' (stem, patch merging and head ignored, as for ViTs). The odd blocks of a stage shift their
    windows (a roll and an additive mask); each stage is timed with its blocks' costlier geometry, the
    shifted one where the stage has one."""

    tables: list[LatencyTable]

    @classmethod
    def measure(cls, config, *, batch_size: int, points: int | Mapping[str, int] = 5, embed_points: int = 3,
                **kwargs) -> "SwinLatencyTables":
        """Each stage's table, its grid from the stage's widest block (kwargs: LatencyTable.measure's)."""
        tables = []
        for s, width in enumerate(config.embed_dims):
            blocks = [i for i, b in enumerate(config.blocks) if b.stage == s]
            if not blocks:
                raise ValueError(f"nvit: Swin stage {s} has no blocks to time")
            geometries = [config.geometry(i) for i in blocks]
            window = next((g for g in geometries if any(g[2])), geometries[0])
            stage = SimpleNamespace(embed_dim=width, blocks=[config.blocks[i] for i in blocks])  # what for_model reads
            grid = LatencyGrid.for_model(stage, points, embed_points)
            tables.append(LatencyTable.measure(grid, tokens=window[0][0] * window[0][1], batch_size=batch_size,
                                               window=window, **kwargs))
        return cls(tables)

    def config_block_latency(self, config, block_cfg) -> float:
        return self.tables[block_cfg.stage].block_config_latency(config.embed_dims[block_cfg.stage], block_cfg)

    def covers(self, config) -> bool:
        return config.family == "swin" and len(config.embed_dims) == len(self.tables)

    def model_latency(self, config) -> float:
        return float(sum(self.config_block_latency(config, b) for b in config.blocks))

    def monotonized(self) -> "SwinLatencyTables":
        return SwinLatencyTables([t.monotonized() for t in self.tables])


def measure_model_latency(model: torch.nn.Module, input_shape: Sequence[int], *, batch_size: int,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          warmup: int | None = None, repeats: int | None = None,
                          statistic: str = "median") -> float:
    """Wall time (s) of one inference forward of a whole model on a random batch [batch_size, *input_shape]."""
    device = torch.device(device)
    warmup = (1 if device.type == "cpu" else 3) if warmup is None else warmup
    repeats = (5 if device.type == "cpu" else 20) if repeats is None else repeats
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device, dtype=dtype)
    try:
        with torch.inference_mode():
            return _time_block(model, x, warmup=warmup, repeats=repeats, statistic=statistic)
    finally:
        model.train(was_training)


def measure_blocks_latency(model: torch.nn.Module, *, tokens: int, batch_size: int,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                           repeats: int | None = None) -> float:
    """Wall time (s) of a ViT's blocks alone (``model.blocks`` on a random [batch_size, tokens, embed]
    input): what LatencyTable.model_latency predicts, measured (best of 3 medians).

    The blocks run as the table's blocks ran: a copy with weights and input in `dtype` (a bf16 table
    is a bf16 model's latency), whatever precision the model's own weights are in (fp32 master
    weights of a mixed-precision run)."""
    import copy

    device = torch.device(device)
    embed = next(p for n, p in model.named_parameters() if n.startswith("blocks.")).shape[-1]
    x = torch.randn(batch_size, tokens, embed, device=device, dtype=dtype)
    repeats = (5 if device.type == "cpu" else 20) if repeats is None else repeats
    blocks = copy.deepcopy(model.blocks).to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        return min(_time_block(blocks, x, warmup=1, repeats=repeats) for _ in range(3))

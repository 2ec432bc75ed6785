"""The target metric of a pruning run: what `--target-metric auto` chooses (latency when its table is cached
or quick to measure here and the model's blocks are what the table measures, else FLOPs), the latency table
a run measures once and keeps in its folder (latency_table.json: a resumed run ranks, stops and reports on
the table it started with), the metric's value of a config, and the report's check of the table against
the blocks' measured latency.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable

from . import engine
from .engine import Precision, Processes
from .settings import RunError


def refuse_unsupported_metric(settings: dict, family: str) -> None:
    """Latency targets and --eta need ViT blocks (what the latency table measures): refused before any work."""
    if (settings["target_metric"] == "latency" or settings["eta"] > 0) and family != "vit":
        raise RunError(f"--target-metric latency / --eta: the latency table measures ViT blocks, not {family} "
                       "blocks; use --target-metric flops or params")


class MetricPolicy:
    """One run's target metric and latency table; `dense_config` is the dense model's architecture (read
    once by the run), `log` the run's log and `timings` its timings (latency_table_s)."""

    def __init__(self, settings: dict, out: Path, procs: Processes, precision: Precision, dense_config,
                 log: Callable[[str], None], timings: dict):
        self.settings, self.out, self.procs, self.precision = settings, out, procs, precision
        self.device = procs.device
        self.dense_config, self.log, self.timings = dense_config, log, timings
        self.table = self.saved_table()  # the latency table, once the run has measured one (resume: its own)

    @functools.cached_property
    def grid(self):
        """The latency grid around the dense model: read once, for the metric choice and the table."""
        from .latency import LatencyGrid

        return LatencyGrid.for_model(self.dense_config, points=self.settings["latency_points"])

    def resolve(self) -> str:
        """--target-metric auto → latency when its table is cached or quick to measure here (and the
        model's blocks are what the table measures), else flops; said once, and kept in the settings
        (a resumed run keeps the choice)."""
        from .latency import estimate_measure_seconds, is_cached

        s = self.settings
        if s["target_metric"] != "auto":
            return s["target_metric"]
        cfg, grid = self.dense_config, self.grid
        why = None
        if cfg.family != "vit":
            why = f"the latency table measures ViT blocks, not {cfg.family}"
        else:
            measure = dict(tokens=cfg.num_tokens, batch_size=s["latency_batch"], dtype=self.precision.tensor_dtype,
                           device=self.device)
            est = None
            if self.procs.main:
                est = 0.0 if is_cached(grid, **measure) else estimate_measure_seconds(grid, **measure)
            est = self.procs.broadcast_object(est)  # one decision for every rank
            if est > s["latency_budget"]:
                why = (f"its table would take about {est:.0f} s to measure here (> --latency-budget "
                       f"{s['latency_budget']:g}); --target-metric latency measures it anyway")
        metric = "flops" if why else "latency"
        self.log(f"target metric: {metric} (auto: " + (why or "measured on this device, as in the paper") + ")")
        self.set(metric)
        return metric

    def set(self, metric: str) -> None:
        """Fix what --target-metric auto chose, here and in run.json (a resumed run keeps it)."""
        self.settings["target_metric"] = metric
        if self.procs.main:
            from .io import atomic_write_json

            run = json.loads((self.out / "run.json").read_text())
            run["settings"]["target_metric"] = metric
            atomic_write_json(self.out / "run.json", run)

    @property
    def table_path(self) -> Path:
        return self.out / "latency_table.json"

    def saved_table(self):
        """The latency table this run measured (a resumed run ranks, stops and reports on the table it
        started with, whatever --threads, node or cache it has now), or None before it measured one."""
        from .latency import LatencyTable

        if not self.table_path.is_file():
            return None
        try:
            return LatencyTable.from_dict(json.loads(self.table_path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"{self.table_path} cannot be read ({type(e).__name__}: {e}); remove it to measure "
                           f"the table again") from None

    def latency_table(self):
        """Measured once (rank 0), kept in the run's folder and shared: every rank must rank structures by
        the same table, and a resumed run by the one it started with."""
        from .io import atomic_write_json
        from .latency import LatencyTable

        if self.table is not None:
            return self.table
        s, cfg = self.settings, self.dense_config
        t0 = time.time()
        table = None
        if self.procs.main:
            table = LatencyTable.measure(self.grid, tokens=cfg.num_tokens, batch_size=s["latency_batch"],
                                         device=self.device, progress=s["progress"],
                                         dtype=self.precision.tensor_dtype).monotonized()
            engine.kill_point(s, "latency")
            atomic_write_json(self.table_path, table.to_dict())
        self.table = self.procs.broadcast_object(table)
        self.timings["latency_table_s"] = round(time.time() - t0, 2)
        return self.table

    def value(self, metric: str, cfg) -> float:
        """The quantity --target is a fraction of, for a config: the latency table's prediction (what the
        pruner ranked and stopped on), or the counted FLOPs / params."""
        from . import io as nvio

        return float(self.table.model_latency(cfg)) if metric == "latency" else float(nvio.count(metric, cfg))

    def table_check(self, dense, dense_cfg, models: list[dict]) -> dict:
        """The latency table's prediction for the blocks of the dense and of each pruned model next to
        the blocks' measured latency (same batch, tokens, dtype and device as the table)."""
        from .latency import measure_blocks_latency

        meta, out = self.table.meta, {}
        nets = [("dense", dense, dense_cfg)] + [(f"target {m['target']:g}", m["model"], m["model"].config)
                                                for m in models]
        for name, net, cfg in nets:
            predicted = self.table.model_latency(cfg)
            measured = measure_blocks_latency(net, tokens=meta["tokens"], batch_size=meta["batch_size"],
                                              device=self.device, dtype=self.precision.tensor_dtype)
            out[name] = {"predicted_s": predicted, "measured_s": measured, "error": predicted / measured - 1}
        return out

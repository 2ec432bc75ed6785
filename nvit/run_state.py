"""What a pruning run keeps to resume exactly: its counters, timings and log (:class:`RunState`), the
checkpoint that holds them with the phase in progress, the snapshots of the pruned models and the
fine-tuned ones (files of the run's folder, removed when the run ends).

The random draws need no state: each training step's are seeded from (seed, phase, iteration, rank), the
data's from (seed, phase, iteration, position); the latency table is a file of the run (nvit.metric_policy).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import engine
from .engine import Precision, Processes
from .settings import RunError

SCHEMA_VERSION = 3


class StopRequested(Exception):
    def __init__(self, it: int):
        super().__init__(f"stopped after {it} iterations as asked (--stop-after); resume with --resume")


class RunState:
    """The run-wide state a checkpoint saves: timings, the counters a resumed run continues (`book`: the
    units removed per prune step, the steps skipped for non-finite gradients, the running loss of the phase
    in progress) and the log."""

    def __init__(self, out: Path, procs: Processes, precision: Precision):
        self.out, self.procs, self.precision = out, procs, precision
        self.timings: dict[str, float] = {}
        self.book: dict = {"units_per_step": None, "skipped_steps": 0, "consecutive_skips": 0, "loss_avg": None}
        self.log_lines: list[str] = []

    def checkpoint(self, phase: str, it: int, raw, opt, sched=None, pruner=None, **more) -> None:
        """Everything a later decision or update reads, so a resume continues exactly: weights, optimizer,
        schedule, loss scale, the pruner's masks and saliency, the run's counters (`book`) and log."""
        state = {**more, "schema": SCHEMA_VERSION, "phase": phase, "iteration": it, "world_size": self.procs.world,
                 "model": raw.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": None if sched is None else sched.state_dict(),
                 "scaler": self.precision.state_dict(),
                 "pruner": None if pruner is None else pruner.state_dict(), "timings": self.timings,
                 "book": dict(self.book), "log": self.log_lines,
                 "nvit_config": None if phase != "finetune" else raw.config.to_dict()}
        engine.save_checkpoint(state, self.out / "checkpoint.pt", self.procs)

    def restore(self, ck: dict | None, phase: str, raw, opt, **more) -> int:
        """Load a checkpoint of `phase` into model, optimizer, scaler and `more` (key → object); the
        iteration to continue from (0 without one)."""
        if ck is None or ck["phase"] != phase:
            return 0
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        self.precision.load_state_dict(ck.get("scaler"))
        for key, obj in more.items():
            obj.load_state_dict(ck[key])
        return ck["iteration"]

    def resume_from(self, ck: dict) -> None:
        """The run-wide state of a checkpoint: timings, counters, log (phases restore their own parts)."""
        self.timings.update(ck["timings"])
        self.book.update(ck.get("book", {}))
        self.log_lines[:] = ck.get("log", [])


def pruning_record(pruner, top1: float) -> dict:
    """What a pruned model keeps of its pruning: masks, history, the dense config, its top-1 before
    fine-tuning, and how it met its target (the exact fraction and the tolerance: the cost of the last
    group removed, see Pruner.prune_step: a step that removed nothing leaves the one before it in charge)."""
    costs = [h["last_group_cost"] for h in pruner.history if h.get("last_group_cost") is not None]
    return {"masks": pruner.masks.state_dict(), "history": list(pruner.history),
            "dense_config": pruner.dense_config.to_dict(), "masked_top1": top1,
            "metric": pruner.target.metric, "fraction": pruner.fraction(),
            "tolerance": float(costs[-1]) if costs else 0.0}


def load_state_file(path: Path, what: str) -> dict:
    """A checkpoint or snapshot of this run, or a clear error for a truncated or foreign file."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise RunError(f"{path} ({what}) cannot be read: {type(e).__name__}: {str(e)[:200]}; it is damaged or "
                       f"not nvit's (a run's files are replaced atomically, so this is not an interrupted write)") from None
    if not isinstance(d, dict) or ("model" not in d):
        raise RunError(f"{path} is not {what} of an nvit run")
    return d


def snapshot_path(out: Path, target: float) -> Path:
    """A target's pruned, converted model before fine-tuning (resume state, removed when the run ends)."""
    return out / "snapshots" / f"target_{target:g}.pt"


def finished_path(out: Path, target: float) -> Path:
    """A target's fine-tuned model (resume state, removed when the run ends)."""
    return out / "snapshots" / f"finetuned_{target:g}.pt"

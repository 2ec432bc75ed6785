"""The phases of a pruning run: prune while training with distillation, then fine-tune the converted
NViT model. One :class:`Run` holds what both phases share (inputs, processes, precision, checkpoints).

Multi-rank runs (torchrun): the student trains as DDP, so every rank holds the same averaged gradients
and therefore the same saliency scores and prune decisions; after every prune step the ranks compare
a digest of their masks and stop if they differ.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from pathlib import Path

import torch

from . import engine
from .engine import Precision, Processes
from .inputs import check_teacher_input, input_shape, is_streaming, load_data, load_dense_model, load_teachers
from .loader import PHASES, mix, train_loader
from .settings import GROUP_FLAGS, RunError

SCHEMA_VERSION = 3


class StopRequested(Exception):
    def __init__(self, it: int):
        super().__init__(f"stopped after {it} iterations as asked (--stop-after); resume with --resume")


@contextlib.contextmanager
def heads_apart(model: torch.nn.Module):
    """A DeiT distilled model's two heads as a pair, in inference: only the root module's `training` flag
    (which timm's distilled head reads) is raised; dropout and the rest stay in eval mode."""
    prev = (model.training, getattr(model, "distilled_training", False))
    model.training, model.distilled_training = True, True
    try:
        yield
    finally:
        model.training, model.distilled_training = prev


def set_distilled_training(model: torch.nn.Module, on: bool) -> None:
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(on)
    else:
        model.distilled_training = on


class Run:
    def __init__(self, s: dict, out: Path, procs: Processes):
        self.s, self.out, self.p = s, out, procs
        self.device = procs.device
        self.dense, self.provenance = load_dense_model(s)
        check_prunable(self.dense)  # before any data is read or any evaluation runs
        if s["drop_path"] is not None:  # the student's, so both phases train the same regularised model
            from .model import set_drop_path

            set_drop_path(self.dense, s["drop_path"])
        self.dense.to(self.device)
        family = self.dense_grid[0].family
        if (s["target_metric"] == "latency" or s["eta"] > 0) and family != "vit":  # refused before any work
            raise RunError(f"--target-metric latency / --eta: the latency table measures ViT blocks, not {family} "
                           "blocks; use --target-metric flops or params")
        self.separate_heads = s["distill_heads"] == "separate"
        if self.separate_heads and not hasattr(self.dense, "head_dist"):
            raise RunError("--distill-heads separate needs a DeiT distilled student (a model with a distillation "
                           "head, e.g. deit_small_distilled_patch16_224)")
        self.teacher, self.hard_teacher, self.teacher_desc = load_teachers(s, self.dense)
        shape = input_shape(self.dense)
        if s["teacher"]:
            check_teacher_input(self.teacher, shape, "--teacher")
        if self.hard_teacher is not None:
            check_teacher_input(self.hard_teacher, shape, "--hard-teacher")
        self.teacher.to(self.device)
        if self.hard_teacher is not None:
            self.hard_teacher.to(self.device)
        if s["batch_size"] % procs.world:
            raise RunError(f"--batch-size {s['batch_size']} (the global batch) must divide evenly over "
                           f"{procs.world} ranks")
        self.train_set, self.test_set, self.train_transform, self.data_desc = load_data(s, self.dense, procs.world)
        self.streaming = is_streaming(self.train_set)
        self.precision = Precision(s["amp"], self.device)
        # A streaming dataset's length is this rank's share (timm shards it over the ranks).
        n_train = len(self.train_set) * (procs.world if self.streaming else 1)
        self.per_epoch = max(1, n_train // s["batch_size"])
        self.workers = s["workers"] if s["workers"] is not None else default_workers(s, procs)
        self.timings: dict[str, float] = {}
        # Counters a resumed run continues (saved in every checkpoint): the units removed per prune step,
        # the steps skipped for non-finite gradients, and the running loss of the phase in progress.
        self.book: dict = {"units_per_step": None, "skipped_steps": 0, "consecutive_skips": 0, "loss_avg": None}
        self.log_lines: list[str] = []
        self.table = self.saved_table()  # the latency table, once the run has measured one (resume: its own)

    # ---- output (rank 0 alone) ---------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.p.main:
            from tqdm import tqdm

            tqdm.write(msg)
        self.log_lines.append(msg)

    def bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not (self.s["progress"] and self.p.main))

    # ---- data --------------------------------------------------------------------------------------
    def batches(self, phase: str, start: int):
        """This rank's (x, y) of iterations start, start+1, … of `phase`, on the device."""
        if self.streaming:
            yield from self._stream(start)
            return
        loader = train_loader(self.train_set, global_batch=self.s["batch_size"], seed=self.s["seed"], phase=phase,
                              rank=self.p.rank, world=self.p.world, start=start, workers=self.workers,
                              pin_memory=self.device.type == "cuda", transform=self.train_transform)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _stream(self, start: int):
        """A streaming dataset, epoch after epoch (timm reshuffles by seed and epoch); a resumed run replays
        the stream up to `start`, which is exact for the same world size and worker count."""
        from torch.utils.data import DataLoader

        local, epoch, skip = self.s["batch_size"] // self.p.world, 0, start
        while True:
            self.train_set.set_epoch(epoch)
            loader = DataLoader(self.train_set, batch_size=local, num_workers=self.workers, drop_last=True,
                                pin_memory=self.device.type == "cuda")
            n = 0
            for x, y in loader:
                n += 1
                if skip:
                    skip -= 1
                    continue
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if n == 0:
                raise RunError(f"--data {self.s['data']}: this rank's share of the stream holds less than one "
                               f"batch of {local}")
            epoch += 1

    def evaluate(self, model, progress: bool = False) -> float:
        return engine.evaluate(model, self.test_set, self.p, precision=self.precision, workers=self.workers,
                               progress=progress and self.s["progress"])

    # ---- one training iteration --------------------------------------------------------------------
    def loss(self, model, x, y) -> torch.Tensor:
        """The distillation loss of `model` on (x, y), teachers and student under autocast."""
        s = self.s
        with self.precision.autocast():
            with torch.no_grad():
                if self.separate_heads and hasattr(self.teacher, "head_dist"):
                    with heads_apart(self.teacher):
                        t = self.teacher(x)
                else:
                    t = self.teacher(x)
                h = self.hard_teacher(x) if self.hard_teacher is not None else None
            return engine.distillation_loss(model(x), t, y, temperature=s["temperature"], weight=s["distill_weight"],
                                            label_smoothing=s["label_smoothing"], hard_teacher=h)

    def step(self, model, raw, opt, x, y, phase: str, it: int) -> float:
        """Forward (autocast) + distillation loss + backward; gradients left for the caller. Returns the loss.

        The stochastic layers (dropout, drop-path) draw from torch's global generator, seeded here from
        (seed, phase, iteration, rank): a resumed run draws what the uninterrupted run drew, whatever ran
        before (data workers or not, a restart). Each rank draws for its own samples, so with these
        layers active a batch's result depends on the world size (the data does not)."""
        raw.train()
        torch.manual_seed(mix(self.s["seed"], PHASES[phase], 2, it, self.p.rank))
        loss = self.loss(model, x, y)
        value = loss.item()
        bad = not math.isfinite(value)
        if self.p.distributed:
            bad = self.p.sum([float(bad)])[0] > 0  # every rank stops together, none waits in a collective
        if bad:
            raise RunError(f"the loss became {value} at iteration {it}; lower --lr "
                           f"(now {opt.param_groups[0]['lr']:.2e})")
        opt.zero_grad(set_to_none=False)
        self.precision.backward(loss)
        self.track_loss(value)
        return value

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, phase: str, it: int, raw, opt, sched=None, pruner=None, **more) -> None:
        """Everything a later decision or update reads, so a resume continues exactly: weights, optimizer,
        schedule, loss scale, the pruner's masks and saliency, the run's counters (`book`) and log. The
        random draws need no state: each step's are seeded from (seed, phase, iteration, rank), the data's
        from (seed, phase, iteration, position); the latency table is a file of the run (latency_table.json)."""
        state = {**more, "schema": SCHEMA_VERSION, "phase": phase, "iteration": it, "world_size": self.p.world,
                 "model": raw.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": None if sched is None else sched.state_dict(),
                 "scaler": self.precision.state_dict(),
                 "pruner": None if pruner is None else pruner.state_dict(), "timings": self.timings,
                 "book": dict(self.book), "log": self.log_lines,
                 "nvit_config": None if phase != "finetune" else raw.config.to_dict()}
        engine.save_checkpoint(state, self.out / "checkpoint.pt", self.p)

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
        self.log_lines = list(ck.get("log", []))

    def maybe_stop(self, it_total: int) -> None:
        if self.s["stop_after"] is not None and it_total >= self.s["stop_after"]:
            raise StopRequested(it_total)

    # ---- phase 1: prune while training -------------------------------------------------------------
    def make_pruner(self, model):
        from .pruner import Pruner, Target, TargetUnreachableError

        s = self.s
        auto = s["target_metric"] == "auto"
        metric = self.resolve_metric()
        table = self.latency_table() if metric == "latency" or s["eta"] > 0 else None

        def pruner(metric):  # the guards are checked against the last (smallest) target
            return Pruner(model, Target(metric, s["target"][-1]), granularity=s["granularity"],
                          normalize=s["normalize"], eta=s["eta"], latency_table=table,
                          group_size={kind: s[flag] for kind, flag in GROUP_FLAGS.items()},
                          ema_momentum=s["ema_momentum"], deterministic=True, criterion=s["criterion"],
                          allocation=s["allocation"], branches=bool(s["prune_branches"]))
        try:
            return pruner(metric)
        except TargetUnreachableError as e:
            if not (auto and metric == "latency"):
                raise RunError(str(e)) from None
            self.log(f"target metric: flops after all ({str(e).removeprefix('nvit: ')}: the blocks' fixed costs "
                     "dominate the measured latency of a model this small)")
            self.set_metric("flops")
        try:
            return pruner("flops")
        except TargetUnreachableError as e:
            raise RunError(str(e)) from None

    @functools.cached_property
    def dense_grid(self):
        """(the dense model's architecture, the latency grid around it): read once, for the metric
        choice and the table."""
        from .latency import LatencyGrid
        from .structures import Adapter

        adapter = Adapter(self.dense)
        cfg = adapter.nvit_config(adapter.full_masks())
        return cfg, LatencyGrid.for_model(cfg, points=self.s["latency_points"])

    def resolve_metric(self) -> str:
        """--target-metric auto → latency when its table is cached or quick to measure here (and the
        model's blocks are what the table measures), else flops; said once, and kept in the settings
        (a resumed run keeps the choice)."""
        from .latency import estimate_measure_seconds, is_cached

        s = self.s
        if s["target_metric"] != "auto":
            return s["target_metric"]
        cfg, grid = self.dense_grid
        why = None
        if cfg.family != "vit":
            why = f"the latency table measures ViT blocks, not {cfg.family}"
        else:
            settings = dict(tokens=cfg.num_tokens, batch_size=s["latency_batch"], dtype=self.precision.tensor_dtype,
                            device=self.device)
            est = None
            if self.p.main:
                est = 0.0 if is_cached(grid, **settings) else estimate_measure_seconds(grid, **settings)
            est = self.p.broadcast_object(est)  # one decision for every rank
            if est > s["latency_budget"]:
                why = (f"its table would take about {est:.0f} s to measure here (> --latency-budget "
                       f"{s['latency_budget']:g}); --target-metric latency measures it anyway")
        metric = "flops" if why else "latency"
        self.log(f"target metric: {metric} (auto: " + (why or "measured on this device, as in the paper") + ")")
        self.set_metric(metric)
        return metric

    def set_metric(self, metric: str) -> None:
        """Fix what --target-metric auto chose, here and in run.json (a resumed run keeps it)."""
        self.s["target_metric"] = metric
        if self.p.main:
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
        s = self.s
        cfg, grid = self.dense_grid
        t0 = time.time()
        table = None
        if self.p.main:
            table = LatencyTable.measure(grid, tokens=cfg.num_tokens, batch_size=s["latency_batch"],
                                         device=self.device, progress=s["progress"],
                                         dtype=self.precision.tensor_dtype).monotonized()
            engine.kill_point(s, "latency")
            atomic_write_json(self.table_path, table.to_dict())
        self.table = self.p.broadcast_object(table)
        self.timings["latency_table_s"] = round(time.time() - t0, 2)
        return self.table

    def prune_phase(self, ck: dict | None):
        from .pruner import Target, TargetUnreachableError

        s = self.s
        raw = copy.deepcopy(self.dense).train()
        if self.separate_heads:
            set_distilled_training(raw, True)
        pruner = self.make_pruner(raw)  # wraps the embedding norms: before DDP sees the modules
        opt = engine.make_optimizer(raw, s["lr"], s["weight_decay"])
        planned = max(1, math.ceil(s["prune_epochs"] * self.per_epoch))
        n_units = s["prune_units"] or self._auto_units(pruner, planned)  # from the dense model, also on resume
        self.book["units_per_step"] = n_units
        start = self.restore(ck, "prune", raw, opt, pruner=pruner)
        # Several targets: the pruner aims at each in turn; reaching one that is not the last saves a
        # snapshot (the converted model at that moment) to fine-tune after the phase.
        targets = s["target"]
        reached = ck.get("targets_reached", 0) if ck is not None and ck["phase"] == "prune" else 0
        pruner.target = Target(s["target_metric"], targets[reached])
        model = engine.wrap_ddp(raw, self.p)
        t0 = time.time() - self.timings.get("prune_s", 0.0)
        it = start
        bar = self.bar(planned, start, "prune")
        data = self.batches("prune", start)
        while it < planned or not pruner.done:
            if it >= 50 * planned:
                raise RunError("pruning did not reach the target; raise --prune-units or --prune-epochs")
            x, y = next(data)
            loss = self.step(model, raw, opt, x, y, "prune", it)
            finite = self.after_backward(opt, it)  # true gradients (fp16: unscaled) for the saliency
            if finite and not pruner.done:
                pruner.accumulate()  # a skipped step feeds no saliency either
            self.precision.step(opt, finite)
            pruner.apply_masks()
            it += 1
            engine.kill_point(s, "prune", it)
            bar.update(1)
            bar.set_postfix(loss=f"{self.book['loss_avg']:.3f}", frac=f"{pruner.fraction():.3f}" if it % 10 == 0 else None)
            pruned_now = False
            if it % s["prune_every"] == 0 and not pruner.done:
                if not pruner.has_saliency:  # fp16: every step so far overflowed; prune when one did not
                    self.log(f"prune step postponed @ it {it}: no finite gradients since the last step")
                else:
                    try:
                        info = pruner.prune_step(n_units)
                    except TargetUnreachableError as e:
                        raise RunError(str(e)) from None
                    engine.check_agreement("prune masks", pruner.masks.state_dict(), self.p)
                    pruned_now = True
                    kinds = ", ".join(f"{k} {v}" for k, v in info.removed.items() if v)
                    self.log(f"prune step {info.step} @ it {it}: removed {kinds or 'nothing'}; "
                             f"{s['target_metric']} {info.fraction:.3f} of dense; loss {self.book['loss_avg']:.4f}")
                    # One step may pass several targets: each passed one gets this model (it is at or
                    # below each of them, and below the first by at most the last group's cost).
                    while pruner.done and reached < len(targets) - 1:
                        self.save_snapshot(targets[reached], pruner, it)
                        reached += 1
                        pruner.target = Target(s["target_metric"], targets[reached])
            if pruned_now or it % s["checkpoint_every"] == 0:
                self.timings["prune_s"] = round(time.time() - t0, 2)
                self.checkpoint("prune", it, raw, opt, pruner=pruner, targets_reached=reached)
                self.maybe_stop(it)
        bar.close()
        self.timings["prune_s"] = round(time.time() - t0, 2)
        self.timings["prune_iterations"] = it
        engine.check_agreement("pruned model's weights", raw.state_dict(), self.p)
        if self.separate_heads:
            set_distilled_training(raw, False)
        return raw, pruner

    def after_backward(self, opt, it: int) -> bool:
        """After a training step's backward: unscale (fp16) and whether every gradient is finite; a step
        that is not gets skipped (in every precision) and counted. Many in a row: a clear error."""
        finite = self.precision.unscale(opt)
        b = self.book
        if finite:
            b["consecutive_skips"] = 0
            return True
        b["skipped_steps"] += 1
        b["consecutive_skips"] += 1
        if b["consecutive_skips"] >= MAX_CONSECUTIVE_SKIPS:
            raise RunError(f"the gradients were not finite in {b['consecutive_skips']} iterations in a row (up to "
                           f"{it}); lower --lr (now {opt.param_groups[0]['lr']:.2e})"
                           + ("" if self.precision.name == "fp16" else " or try --amp none"))
        return False

    def track_loss(self, loss: float) -> float:
        avg = self.book["loss_avg"]
        self.book["loss_avg"] = loss if avg is None else 0.9 * avg + 0.1 * loss
        return self.book["loss_avg"]

    def save_snapshot(self, target: float, pruner, it: int) -> None:
        """The model as the pruner has it now, converted (exact), with its masks and history: one of
        the run's models, fine-tuned after the pruning phase."""
        nv = pruner.convert({"source": self.provenance})
        top1 = self.evaluate(nv)
        self.log(f"target {target:g} reached at iteration {it}: snapshot (top-1 {top1:.2f}% before fine-tuning)")
        snap = {"target": target, "nvit_config": nv.config.to_dict(), "model": nv.state_dict(),
                "pruning": pruning_record(pruner, top1)}
        engine.save_checkpoint(snap, snapshot_path(self.out, target), self.p)
        engine.kill_point(self.s, "snapshot")

    # ---- phase 1, one-shot: prune the trained model as it is ----------------------------------------
    def one_shot_phase(self):
        """No weight updates: the saliency of --calibration-batches batches ranks the units, the target is
        approached in --one-shot-steps steps (the metric falls geometrically; each earlier target is a
        step too, and leaves a snapshot) and the saliency is estimated afresh after every step (no EMA:
        the pruned model's own gradients). fp16 backpropagates with loss scaling (a batch that overflows
        is retried at half the scale); a batch whose gradients are not finite feeds no saliency."""
        from .pruner import Target, TargetUnreachableError

        s = self.s
        raw = copy.deepcopy(self.dense).eval()
        pruner = self.make_pruner(raw)
        pruner.ema_momentum = 0.0  # each step ranks by the current model's saliency alone
        final = pruner.target
        earlier = list(s["target"][:-1])
        geometric = [final.fraction ** (k / s["one_shot_steps"]) for k in range(1, s["one_shot_steps"] + 1)]
        schedule = sorted(set(geometric) | set(earlier), reverse=True)
        model = engine.wrap_ddp(raw, self.p)  # gradients averaged over ranks, as in training
        params = [q for q in raw.parameters() if q.requires_grad]
        t0 = time.time()
        data = self.batches("prune", 0)
        n = s["calibration_batches"]
        bar = self.bar(len(schedule) * n, 0, "one-shot")
        for k, fraction in enumerate(schedule, 1):
            for i in range(n):
                x, y = next(data)
                for _ in range(MAX_CONSECUTIVE_SKIPS):
                    raw.zero_grad(set_to_none=False)
                    loss = self.loss(model, x, y)
                    if self.precision.scaled_gradients(loss, params) or self.precision.scaler is None:
                        break  # fp16: retried at half the scale after an overflow
                if engine.grads_finite(params):
                    pruner.accumulate()
                else:
                    self.book["skipped_steps"] += 1
                bar.update(1)
            if not pruner.has_saliency:
                raise RunError(f"one-shot step {k}: no batch of {n} gave finite gradients"
                               + (" (try --amp bf16 or none)" if self.precision.name == "fp16" else ""))
            pruner.target = Target(final.metric, fraction)
            try:
                info = pruner.prune_step(pruner.units.num_units)
            except TargetUnreachableError as e:
                raise RunError(str(e)) from None
            engine.check_agreement("prune masks", pruner.masks.state_dict(), self.p)
            kinds = ", ".join(f"{kk} {v}" for kk, v in info.removed.items() if v)
            self.log(f"one-shot step {k}/{len(schedule)}: removed {kinds or 'nothing'}; {final.metric} "
                     f"{info.fraction:.3f} of dense")
            if fraction in earlier:
                raw.zero_grad(set_to_none=True)
                self.save_snapshot(fraction, pruner, 0)
            engine.kill_point(s, "prune", k)
        bar.close()
        pruner.target = final
        if not pruner.done:  # prune_step stops only at the target (exactly counted) or at the guards
            raise RunError(f"one-shot pruning ended at {pruner.fraction():.4f} of the dense {final.metric}, above "
                           f"the target {final.fraction:g}")
        raw.zero_grad(set_to_none=True)
        self.timings["one_shot_s"] = round(time.time() - t0, 2)
        self.timings["prune_iterations"] = 0
        return raw, pruner

    def _auto_units(self, pruner, planned: int) -> int:
        """N so that removing N units per step would meet the target two thirds into the phase:
        the alive units times the fraction still to remove, over the steps available."""
        steps = max(1, int(planned * 2 / 3) // self.s["prune_every"])
        to_remove = int(pruner.unit_alive().sum()) * (1.0 - self.s["target"][-1])
        return max(1, math.ceil(to_remove / steps))

    # ---- phase 3: fine-tune the converted model(s) -------------------------------------------------
    def finetune_model(self, target: float, ck: dict | None) -> dict:
        """The model of one target, fine-tuned (or read back, if an earlier attempt of this run finished
        it): {"target", "model", "pruning", "top1"}."""
        from .io import build_from_dict

        done = finished_path(self.out, target)
        if done.exists():
            d = load_state_file(done, "a fine-tuned model")
        else:
            path = snapshot_path(self.out, target)
            if not path.is_file():
                raise RunError(f"the pruned model of target {target:g} is missing ({path}): the pruning phase did "
                               f"not save it; start the run again")
            snap = load_state_file(path, "a pruned model")
            cfg = ck["nvit_config"] if ck is not None else snap["nvit_config"]
            nv = build_from_dict(cfg)  # NViT or NViT-Swin, told apart by the config
            nv.load_state_dict(snap["model"])
            nv = self.finetune_phase(nv.to(self.device), ck, target=target)
            top1 = self.evaluate(nv, progress=True)
            self.log(f"fine-tuned NViT model (target {target:g}): top-1 {top1:.2f}%")
            d = {"target": target, "nvit_config": nv.config.to_dict(), "model": nv.state_dict(),
                 "pruning": snap["pruning"], "top1": top1}
            engine.save_checkpoint(d, done, self.p)
        nv = build_from_dict(d["nvit_config"])
        nv.load_state_dict(d["model"])
        return {"target": target, "model": nv.to(self.device).eval(), "pruning": d["pruning"], "top1": d["top1"]}

    def finetune_phase(self, nv, ck: dict | None, target: float | None = None):
        from .training import lr_lambda

        s = self.s
        if self.separate_heads:
            set_distilled_training(nv, True)
        opt = engine.make_optimizer(nv, s["finetune_lr"], s["weight_decay"])
        total = max(1, math.ceil(s["finetune_epochs"] * self.per_epoch)) if s["finetune_epochs"] else 0
        warm = min(total, max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(total, 1), warm, s["min_lr_ratio"]))
        start = self.restore(ck, "finetune", nv, opt, scheduler=sched)
        if ck is None or ck["phase"] != "finetune":
            self.book["loss_avg"] = None  # a new phase's running loss
        model = engine.wrap_ddp(nv, self.p)
        t0 = time.time() - self.timings.get("finetune_s", 0.0)
        bar = self.bar(total, start, "fine-tune")
        prune_its = self.timings.get("prune_iterations", 0)
        data = self.batches("finetune", start) if start < total else iter(())
        for it in range(start, total):
            x, y = next(data)
            loss = self.step(model, nv, opt, x, y, "finetune", it)
            finite = self.after_backward(opt, it)
            self.precision.step(opt, finite)
            sched.step()
            engine.kill_point(s, "finetune", it + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{self.book['loss_avg']:.3f}")
            if (it + 1) % s["checkpoint_every"] == 0 and it + 1 < total:
                self.timings["finetune_s"] = round(time.time() - t0, 2)
                self.checkpoint("finetune", it + 1, nv, opt, sched, target=target)
                self.maybe_stop(prune_its + it + 1)
        bar.close()
        self.timings["finetune_s"] = round(time.time() - t0, 2)
        if self.book["loss_avg"] is not None and total:
            self.log(f"fine-tuned {total} iterations; final loss {self.book['loss_avg']:.4f}")
        engine.check_agreement("fine-tuned weights", nv.state_dict(), self.p)
        if self.separate_heads:
            set_distilled_training(nv, False)
        return nv.eval()


# A run stops (clear error) after this many iterations in a row whose gradients were not finite.
MAX_CONSECUTIVE_SKIPS = 50


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


def check_prunable(model: torch.nn.Module) -> None:
    """A RunError naming the modules nvit cannot prune exactly (the adapter reads, changes nothing)."""
    from .structures import UnsupportedModelError, Adapter

    try:
        Adapter(model)
    except UnsupportedModelError as e:
        raise RunError(str(e)) from None


def default_workers(s: dict, procs: Processes) -> int:
    """0 for the embedded tensors (nothing to decode), else up to 8 per rank from the cores there are."""
    if not s["data"]:
        return 0
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, procs.world) - 1))

"""The phases of a pruning run: prune while training with distillation (or one-shot), then fine-tune the
converted NViT model(s). One :class:`Run` holds what the phases share: the inputs (student, teachers,
data), the processes and precision, the family and adapter of the dense model (built once), the
distillation step, the log and the run's state. Its pieces live in their own modules:

- nvit.streams: the training batches (map-style or streaming);
- nvit.training_loop: the one training loop (loss, skips, progress, timings, checkpoint cadence, stops)
  that :class:`PruneTraining` and :class:`FineTuning` extend;
- nvit.run_state: the counters, timings and log a checkpoint saves, and the run's resume files;
- nvit.metric_policy: --target-metric auto's choice and the run's latency table.

Multi-rank runs (torchrun): the student trains as DDP, so every rank holds the same averaged gradients
and therefore the same saliency scores and prune decisions; after every prune step the ranks compare
a digest of their masks and stop if they differ.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import torch

from . import engine
from .engine import Precision, Processes
from .inputs import check_teacher_input, input_shape, load_data, load_dense_model, load_teachers
from .loader import PHASES, mix
from .metric_policy import MetricPolicy, refuse_unsupported_metric
from .run_state import (SCHEMA_VERSION, RunState, StopRequested, finished_path, load_state_file,  # noqa: F401
                        pruning_record, snapshot_path)
from .settings import GROUP_FLAGS, RunError
from .streams import TrainBatches, default_workers
from .training_loop import TrainingLoop

# A run stops (clear error) after this many iterations in a row whose gradients were not finite.
MAX_CONSECUTIVE_SKIPS = 50


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
    def __init__(self, settings: dict, out, procs: Processes):
        s = self.settings = settings
        self.out, self.procs, self.device = out, procs, procs.device
        self.dense, self.provenance = load_dense_model(s)
        self.adapter = prunable_adapter(self.dense)  # before any data is read or any evaluation runs
        self.family = self.adapter.family  # the dense model's, read once: the pruner's and the report's too
        if s["drop_path"] is not None:  # the student's, so both phases train the same regularised model
            from .model import set_drop_path

            set_drop_path(self.dense, s["drop_path"])
        self.dense.to(self.device)
        self.dense_config = self.adapter.nvit_config(self.adapter.full_masks())
        refuse_unsupported_metric(s, self.dense_config.family)  # before any work
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
        self.train_set, self.test_set, train_transform, self.data_desc = load_data(s, self.dense, procs.world)
        self.precision = Precision(s["amp"], self.device)
        self.workers = s["workers"] if s["workers"] is not None else default_workers(s, procs)
        self.batches = TrainBatches(s, procs, self.train_set, train_transform, self.workers)
        self.per_epoch = self.batches.per_epoch()
        self.state = RunState(out, procs, self.precision)
        self.timings, self.book = self.state.timings, self.state.book
        self.metric_policy = MetricPolicy(s, out, procs, self.precision, self.dense_config, self.log, self.timings)

    # ---- output (rank 0 alone) ---------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.procs.main:
            from tqdm import tqdm

            tqdm.write(msg)
        self.state.log_lines.append(msg)

    def bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc,
                    disable=not (self.settings["progress"] and self.procs.main))

    def evaluate(self, model, progress: bool = False) -> float:
        return engine.evaluate(model, self.test_set, self.procs, precision=self.precision, workers=self.workers,
                               progress=progress and self.settings["progress"])

    # ---- one training iteration --------------------------------------------------------------------
    def loss(self, model, x, y) -> torch.Tensor:
        """The distillation loss of `model` on (x, y), teachers and student under autocast."""
        s = self.settings
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
        torch.manual_seed(mix(self.settings["seed"], PHASES[phase], 2, it, self.procs.rank))
        loss = self.loss(model, x, y)
        value = loss.item()
        bad = not math.isfinite(value)
        if self.procs.distributed:
            bad = self.procs.sum([float(bad)])[0] > 0  # every rank stops together, none waits in a collective
        if bad:
            raise RunError(f"the loss became {value} at iteration {it}; lower --lr "
                           f"(now {opt.param_groups[0]['lr']:.2e})")
        opt.zero_grad(set_to_none=False)
        self.precision.backward(loss)
        self.track_loss(value)
        return value

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

    # ---- checkpoints and stops ---------------------------------------------------------------------
    def checkpoint(self, phase: str, it: int, raw, opt, sched=None, pruner=None, **more) -> None:
        self.state.checkpoint(phase, it, raw, opt, sched, pruner, **more)

    def restore(self, ck: dict | None, phase: str, raw, opt, **more) -> int:
        return self.state.restore(ck, phase, raw, opt, **more)

    def resume_from(self, ck: dict) -> None:
        self.state.resume_from(ck)

    def maybe_stop(self, it_total: int) -> None:
        if self.settings["stop_after"] is not None and it_total >= self.settings["stop_after"]:
            raise StopRequested(it_total)

    # ---- the pruner and its snapshots --------------------------------------------------------------
    def make_pruner(self, model):
        from .pruner import Pruner, Target, TargetUnreachableError

        s, policy = self.settings, self.metric_policy
        auto = s["target_metric"] == "auto"
        metric = policy.resolve()
        table = policy.latency_table() if metric == "latency" or s["eta"] > 0 else None

        def pruner(metric):  # the guards are checked against the last (smallest) target
            return Pruner(model, Target(metric, s["target"][-1]), granularity=s["granularity"],
                          normalize=s["normalize"], eta=s["eta"], latency_table=table,
                          group_size={kind: s[flag] for kind, flag in GROUP_FLAGS.items()},
                          ema_momentum=s["ema_momentum"], deterministic=True, criterion=s["criterion"],
                          allocation=s["allocation"], branches=bool(s["prune_branches"]),
                          family=type(self.family))  # the dense model's family, not looked up again
        try:
            return pruner(metric)
        except TargetUnreachableError as e:
            if not (auto and metric == "latency"):
                raise RunError(str(e)) from None
            self.log(f"target metric: flops after all ({str(e).removeprefix('nvit: ')}: the blocks' fixed costs "
                     "dominate the measured latency of a model this small)")
            policy.set("flops")
        try:
            return pruner("flops")
        except TargetUnreachableError as e:
            raise RunError(str(e)) from None

    def save_snapshot(self, target: float, pruner, it: int) -> None:
        """The model as the pruner has it now, converted (exact), with its masks and history: one of
        the run's models, fine-tuned after the pruning phase."""
        nv = pruner.convert({"source": self.provenance})
        top1 = self.evaluate(nv)
        self.log(f"target {target:g} reached at iteration {it}: snapshot (top-1 {top1:.2f}% before fine-tuning)")
        snap = {"target": target, "nvit_config": nv.config.to_dict(), "model": nv.state_dict(),
                "pruning": pruning_record(pruner, top1)}
        engine.save_checkpoint(snap, snapshot_path(self.out, target), self.procs)
        engine.kill_point(self.settings, "snapshot")

    # ---- phase 3's models --------------------------------------------------------------------------
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
            nv = finetune_phase(self, nv.to(self.device), ck, target=target)
            top1 = self.evaluate(nv, progress=True)
            self.log(f"fine-tuned NViT model (target {target:g}): top-1 {top1:.2f}%")
            d = {"target": target, "nvit_config": nv.config.to_dict(), "model": nv.state_dict(),
                 "pruning": snap["pruning"], "top1": top1}
            engine.save_checkpoint(d, done, self.procs)
        nv = build_from_dict(d["nvit_config"])
        nv.load_state_dict(d["model"])
        return {"target": target, "model": nv.to(self.device).eval(), "pruning": d["pruning"], "top1": d["top1"]}


# ---- phase 1: prune while training -----------------------------------------------------------------
class PruneTraining(TrainingLoop):
    """Training with distillation, the pruner accumulating saliency and removing the lowest-ranked units
    every --prune-every iterations; several targets are aimed at in turn, and reaching one that is not the
    last saves a snapshot (the converted model at that moment) to fine-tune after the phase."""
    phase, desc = "prune", "prune"

    def __init__(self, run, raw, opt, pruner, start: int, planned: int, n_units: int, reached: int):
        super().__init__(run, raw, opt, start, planned)
        self.pruner, self.n_units, self.reached = pruner, n_units, reached

    def running(self, it: int) -> bool:
        if it < self.total or not self.pruner.done:
            if it >= 50 * self.total:
                raise RunError("pruning did not reach the target; raise --prune-units or --prune-epochs")
            return True
        return False

    def after_gradients(self, finite: bool) -> None:
        if finite and not self.pruner.done:
            self.pruner.accumulate()  # a skipped step feeds no saliency either

    def after_update(self) -> None:
        self.pruner.apply_masks()

    def postfix(self, it: int) -> dict:
        return {**super().postfix(it), "frac": f"{self.pruner.fraction():.3f}" if it % 10 == 0 else None}

    def after_iteration(self, it: int) -> bool:
        """A prune step when one is due; whether one ran (a checkpoint follows it)."""
        from .pruner import Target

        r, s, pruner = self.run, self.run.settings, self.pruner
        if it % s["prune_every"] != 0 or pruner.done:
            return False
        if not pruner.has_saliency:  # fp16: every step so far overflowed; prune when one did not
            r.log(f"prune step postponed @ it {it}: no finite gradients since the last step")
            return False
        info, kinds = prune_step(pruner, self.n_units, r.procs)
        r.log(f"prune step {info.step} @ it {it}: removed {kinds}; "
              f"{s['target_metric']} {info.fraction:.3f} of dense; loss {r.book['loss_avg']:.4f}")
        # One step may pass several targets: each passed one gets this model (it is at or
        # below each of them, and below the first by at most the last group's cost).
        targets = s["target"]
        while pruner.done and self.reached < len(targets) - 1:
            r.save_snapshot(targets[self.reached], pruner, it)
            self.reached += 1
            pruner.target = Target(s["target_metric"], targets[self.reached])
        return True

    def checkpoint(self, it: int) -> None:
        self.run.checkpoint("prune", it, self.raw, self.opt, pruner=self.pruner, targets_reached=self.reached)


def prune_phase(r: Run, ck: dict | None):
    """Phase 1: (the masked model, its pruner)."""
    from .pruner import Target

    s = r.settings
    raw = copy.deepcopy(r.dense).train()
    if r.separate_heads:
        set_distilled_training(raw, True)
    pruner = r.make_pruner(raw)  # wraps the embedding norms: before DDP sees the modules
    opt = engine.make_optimizer(raw, s["lr"], s["weight_decay"])
    planned = max(1, math.ceil(s["prune_epochs"] * r.per_epoch))
    n_units = s["prune_units"] or auto_units(s, pruner, planned)  # from the dense model, also on resume
    r.book["units_per_step"] = n_units
    start = r.restore(ck, "prune", raw, opt, pruner=pruner)
    reached = ck.get("targets_reached", 0) if ck is not None and ck["phase"] == "prune" else 0
    pruner.target = Target(s["target_metric"], s["target"][reached])
    model = engine.wrap_ddp(raw, r.procs)
    it = PruneTraining(r, raw, opt, pruner, start, planned, n_units, reached).loop(model)
    r.timings["prune_iterations"] = it
    engine.check_agreement("pruned model's weights", raw.state_dict(), r.procs)
    if r.separate_heads:
        set_distilled_training(raw, False)
    return raw, pruner


def prune_step(pruner, n_units: int, procs: Processes):
    """One prune step of either phase: (its info, what it removed as text), the ranks' masks compared."""
    from .pruner import TargetUnreachableError

    try:
        info = pruner.prune_step(n_units)
    except TargetUnreachableError as e:
        raise RunError(str(e)) from None
    engine.check_agreement("prune masks", pruner.masks.state_dict(), procs)
    return info, ", ".join(f"{k} {v}" for k, v in info.removed.items() if v) or "nothing"


def auto_units(s: dict, pruner, planned: int) -> int:
    """N so that removing N units per step would meet the target two thirds into the phase:
    the alive units times the fraction still to remove, over the steps available."""
    steps = max(1, int(planned * 2 / 3) // s["prune_every"])
    to_remove = int(pruner.unit_alive().sum()) * (1.0 - s["target"][-1])
    return max(1, math.ceil(to_remove / steps))


# ---- phase 1, one-shot: prune the trained model as it is ------------------------------------------
def one_shot_phase(r: Run):
    """No weight updates: the saliency of --calibration-batches batches ranks the units, the target is
    approached in --one-shot-steps steps (the metric falls geometrically; each earlier target is a
    step too, and leaves a snapshot) and the saliency is estimated afresh after every step (no EMA:
    the pruned model's own gradients). fp16 backpropagates with loss scaling (a batch that overflows
    is retried at half the scale); a batch whose gradients are not finite feeds no saliency."""
    from .pruner import Target

    s = r.settings
    raw = copy.deepcopy(r.dense).eval()
    pruner = r.make_pruner(raw)
    pruner.ema_momentum = 0.0  # each step ranks by the current model's saliency alone
    final = pruner.target
    earlier = list(s["target"][:-1])
    geometric = [final.fraction ** (k / s["one_shot_steps"]) for k in range(1, s["one_shot_steps"] + 1)]
    schedule = sorted(set(geometric) | set(earlier), reverse=True)
    model = engine.wrap_ddp(raw, r.procs)  # gradients averaged over ranks, as in training
    params = [q for q in raw.parameters() if q.requires_grad]
    t0 = time.time()
    data = r.batches("prune", 0)
    n = s["calibration_batches"]
    bar = r.bar(len(schedule) * n, 0, "one-shot")
    for k, fraction in enumerate(schedule, 1):
        for i in range(n):
            x, y = next(data)
            for _ in range(MAX_CONSECUTIVE_SKIPS):
                raw.zero_grad(set_to_none=False)
                finite = r.precision.scaled_gradients(r.loss(model, x, y), params)
                if finite or r.precision.scaler is None:
                    break  # fp16: retried at half the scale after an overflow
            if finite:
                pruner.accumulate()
            else:
                r.book["skipped_steps"] += 1
            bar.update(1)
        if not pruner.has_saliency:
            raise RunError(f"one-shot step {k}: no batch of {n} gave finite gradients"
                           + (" (try --amp bf16 or none)" if r.precision.name == "fp16" else ""))
        pruner.target = Target(final.metric, fraction)
        info, kinds = prune_step(pruner, pruner.units.num_units, r.procs)
        r.log(f"one-shot step {k}/{len(schedule)}: removed {kinds}; {final.metric} "
              f"{info.fraction:.3f} of dense")
        if fraction in earlier:
            raw.zero_grad(set_to_none=True)
            r.save_snapshot(fraction, pruner, 0)
        engine.kill_point(s, "prune", k)
    bar.close()
    pruner.target = final
    if not pruner.done:  # prune_step stops only at the target (exactly counted) or at the guards
        raise RunError(f"one-shot pruning ended at {pruner.fraction():.4f} of the dense {final.metric}, above "
                       f"the target {final.fraction:g}")
    raw.zero_grad(set_to_none=True)
    r.timings["one_shot_s"] = round(time.time() - t0, 2)
    r.timings["prune_iterations"] = 0
    return raw, pruner


# ---- phase 3: fine-tune the converted model(s) -----------------------------------------------------
class FineTuning(TrainingLoop):
    """Training the converted model with the same distillation, on a warmup-cosine schedule."""
    phase, desc = "finetune", "fine-tune"

    def __init__(self, run, raw, opt, sched, start: int, total: int, target: float | None):
        super().__init__(run, raw, opt, start, total, stop_offset=run.timings.get("prune_iterations", 0))
        self.sched, self.target = sched, target

    def after_update(self) -> None:
        self.sched.step()

    def cadence(self, it: int) -> bool:
        return super().cadence(it) and it < self.total

    def checkpoint(self, it: int) -> None:
        self.run.checkpoint("finetune", it, self.raw, self.opt, self.sched, target=self.target)


def finetune_phase(r: Run, nv, ck: dict | None, target: float | None = None):
    from .training import lr_lambda

    s = r.settings
    if r.separate_heads:
        set_distilled_training(nv, True)
    opt = engine.make_optimizer(nv, s["finetune_lr"], s["weight_decay"])
    total = max(1, math.ceil(s["finetune_epochs"] * r.per_epoch)) if s["finetune_epochs"] else 0
    warm = min(total, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(total, 1), warm, s["min_lr_ratio"]))
    start = r.restore(ck, "finetune", nv, opt, scheduler=sched)
    if ck is None or ck["phase"] != "finetune":
        r.book["loss_avg"] = None  # a new phase's running loss
    model = engine.wrap_ddp(nv, r.procs)
    FineTuning(r, nv, opt, sched, start, total, target).loop(model)
    if r.book["loss_avg"] is not None and total:
        r.log(f"fine-tuned {total} iterations; final loss {r.book['loss_avg']:.4f}")
    engine.check_agreement("fine-tuned weights", nv.state_dict(), r.procs)
    if r.separate_heads:
        set_distilled_training(nv, False)
    return nv.eval()


def prunable_adapter(model: torch.nn.Module):
    """The model seen through its family (nvit.structures.Adapter), or a RunError naming the modules nvit
    cannot prune exactly (the adapter reads, changes nothing)."""
    from .structures import UnsupportedModelError, Adapter

    try:
        return Adapter(model)
    except UnsupportedModelError as e:
        raise RunError(str(e)) from None

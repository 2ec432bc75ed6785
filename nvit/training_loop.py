"""The one training loop of a pruning run, for both phases that update weights (pruning while training,
fine-tuning): the distillation step (Run.step: per-step seeding, loss, backward), the skip of a step whose
gradients are not finite, the optimizer step, the running loss and progress bar, the phase's timing, the
kill points, the checkpoint cadence and --stop-after. A phase adds its own parts through the hooks."""
from __future__ import annotations

import time

from . import engine


class TrainingLoop:
    phase: str  # "prune" or "finetune": the name of its seeds, data, kill points and timing ("<phase>_s")
    desc: str   # the progress bar's

    def __init__(self, run, raw, opt, start: int, total: int, stop_offset: int = 0):
        """raw: the model (unwrapped); total: the planned iterations (the bar's length); stop_offset: the
        iterations of earlier phases, which --stop-after counts too."""
        self.run, self.raw, self.opt, self.start, self.total = run, raw, opt, start, total
        self.stop_offset = stop_offset

    # ---- hooks -------------------------------------------------------------------------------------
    def running(self, it: int) -> bool:
        """Whether iteration `it` (0-based) runs."""
        return it < self.total

    def after_gradients(self, finite: bool) -> None:
        """After backward (and, fp16, unscaling), before the optimizer step."""

    def after_update(self) -> None:
        """After the optimizer step (skipped or not)."""

    def after_iteration(self, it: int) -> bool:
        """After `it` iterations (the kill point passed); True: checkpoint now, whatever the cadence."""
        return False

    def cadence(self, it: int) -> bool:
        """Whether the run checkpoints after `it` iterations."""
        return it % self.run.settings["checkpoint_every"] == 0

    def postfix(self, it: int) -> dict:
        return {"loss": f"{self.run.book['loss_avg']:.3f}"}

    def checkpoint(self, it: int) -> None:
        raise NotImplementedError

    # ---- the loop ----------------------------------------------------------------------------------
    def loop(self, model) -> int:
        """Train `model` (raw, or raw wrapped in DDP) from `start` while `running`; the iterations done."""
        r, key = self.run, f"{self.phase}_s"
        t0 = time.time() - r.timings.get(key, 0.0)
        bar = r.bar(self.total, self.start, self.desc)
        data = r.batches(self.phase, self.start)
        it = self.start
        while self.running(it):
            x, y = next(data)
            r.step(model, self.raw, self.opt, x, y, self.phase, it)
            finite = r.after_backward(self.opt, it)  # true gradients (fp16: unscaled)
            self.after_gradients(finite)
            r.precision.step(self.opt, finite)
            self.after_update()
            it += 1
            engine.kill_point(r.settings, self.phase, it)
            bar.update(1)
            bar.set_postfix(**self.postfix(it))
            if self.after_iteration(it) or self.cadence(it):
                r.timings[key] = round(time.time() - t0, 2)
                self.checkpoint(it)
                r.maybe_stop(self.stop_offset + it)
        bar.close()
        r.timings[key] = round(time.time() - t0, 2)
        return it

"""`python -m nvit.prune`: prune a Vision Transformer with NViT's global Hessian-aware method.

With no arguments it runs the embedded default: the small DeiT-style timm ViT shipped with nvit,
pretrained on the shipped Fashion-MNIST subset, pruned to 40 % of its latency measured on this device
(--target-metric auto, the default: latency when its table is cached or quick to measure, as in the
paper, else FLOPs; the run says which), fine-tuned, and reported (a couple of minutes on 2 CPU cores).
With arguments it prunes your timm model on your images:

    python -m nvit.prune --model deit_small_patch16_224 --checkpoint deit_s.safetensors \\
        --data /data/imagenet-subset --target-metric latency --target 0.5 --out runs/deit_s

On several GPUs or nodes, the same command under torchrun (--batch-size is the global batch):

    torchrun --nproc-per-node 8 -m nvit.prune --device cuda --amp bf16 --workers 8 … 

Phases: (1) prune while training with distillation from a frozen teacher (the dense model unless
--teacher): every --prune-every iterations the lowest-ranked structures of the whole model are removed,
until the target is met; (2) convert to an NViT model (exact); (3) fine-tune it with the same
distillation; (4) report. Settings can come from a YAML file (--config; keys are the flag names).

Where things live: settings.py (every flag), inputs.py (models, teachers, data), loader.py and
streams.py (batches), engine.py (processes, precision, optimizer, evaluation, checkpoint files),
phases.py (the run and its phases), training_loop.py (the one training loop), run_state.py (what a
resume continues), metric_policy.py (the target metric and latency table), report.py (what the run
writes and prints).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from . import engine, settings
from .io import atomic_write_json
from .phases import Run, one_shot_phase, prune_phase
from .run_state import SCHEMA_VERSION, StopRequested, load_state_file, pruning_record, snapshot_path
from .settings import RunError

DEFAULTS = settings.DEFAULTS


class RunComplete(Exception):
    """--resume of a run that already finished (exit 0)."""


def resolve_settings(argv: list[str] | None) -> dict:
    return settings.resolve(argv, description=__doc__)


def prepare_out_dir(s: dict, p: engine.Processes) -> Path:
    """The run's folder, checked on every rank, created by rank 0."""
    if s["resume"]:
        out = Path(s["resume"])
        if (out / "report.json").is_file():  # killed after the report was written: only leftovers to remove
            if p.main:
                from .report import remove_resume_state

                remove_resume_state(out)
            raise RunComplete(f"{out} holds a complete run (report.json); nothing to resume")
        if not (out / "run.json").is_file():
            raise RunError(f"--resume {out}: no nvit run there (no run.json)")
        return out
    out = Path(s["out"] or f"runs/nvit-{time.strftime('%Y%m%d-%H%M%S')}")
    if s["out"] is None:
        out = Path(p.broadcast_object(str(out)))  # one name for all ranks
    if out.exists() and any(out.iterdir()):
        what = "another nvit run" if (out / "run.json").exists() else "other files"
        raise RunError(f"output directory {out} already holds {what}; choose a new --out "
                       f"(or --resume {out} to continue an interrupted run)")
    p.barrier()  # every rank has checked before rank 0 writes into it
    if p.main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def kernels(dev: torch.device) -> dict:
    """The backends that run (or ran) the ops on `dev`; a RunError if the compiled extension exists but
    cannot load (it would cost the whole speedup; NVIT_ALLOW_REFERENCE=1 accepts the fallback)."""
    from nvit_kernels.info import backends

    try:
        return backends(dev)
    except RuntimeError as e:
        raise RunError(str(e).removeprefix("nvit: ")) from None


def kernels_line(k: dict) -> str:
    ext = k["extension"] or f"no compiled extension: {k.get('extension_error', '')}"
    return f"kernels: saliency {k['saliency']}, attention {k['attention']} ({ext})"


def run(s: dict, p: engine.Processes | None = None) -> dict | None:
    """The whole run; returns the report (on rank 0; None on the other ranks)."""
    from .report import finish

    p = p or engine.Processes()
    # Which kernels will run, said before anything is read or written (and an error if the compiled
    # extension exists but cannot load: that would silently cost the whole speedup).
    k = kernels(p.device)
    if p.main:
        print(f"nvit.prune: {kernels_line(k)}; {p.world} process(es) on {p.device.type}", flush=True)
    out = prepare_out_dir(s, p)
    if s["resume"]:
        saved = json.loads((out / "run.json").read_text())
        keep = {key: s[key] for key in settings.RESUME_OVERRIDES}
        s = {**settings.DEFAULTS, **saved["settings"], **keep}
        s["target"] = settings.fraction_list(s["target"])  # a list in run.json (a number before several targets)
        if saved.get("world_size", 1) != p.world:
            raise RunError(f"--resume {out}: the run started with {saved.get('world_size', 1)} process(es) and "
                           f"this one has {p.world}; resume with the same world size (the same --nproc-per-node "
                           f"× --nnodes), so each rank continues its own shard of the same global batches")
    elif p.main:
        atomic_write_json(out / "run.json", {"schema": SCHEMA_VERSION, "settings": s, "world_size": p.world,
                                             "started": time.time()})
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    torch.manual_seed(s["seed"])
    ck = None
    if s["resume"] and (out / "checkpoint.pt").is_file():  # else stopped before its first one: from the start
        ck = load_state_file(out / "checkpoint.pt", "the run's checkpoint")
        if ck.get("schema") != SCHEMA_VERSION or "phase" not in ck:
            raise RunError(f"--resume {out}: checkpoint.pt is of another nvit version (schema {ck.get('schema')}, "
                           f"this one reads {SCHEMA_VERSION}); start the run again")
    r = Run(s, out, p)
    if ck is not None:
        r.resume_from(ck)
        r.log(f"resuming {out} at {ck['phase']} iteration {ck['iteration']}")
    t_start = time.time()
    dense_top1 = r.evaluate(r.dense, progress=True)
    r.log(f"dense model: top-1 {dense_top1:.2f}% on {len(r.test_set)} test images")

    targets = s["target"]
    if ck is None or ck["phase"] == "prune":
        masked, pruner = one_shot_phase(r) if s["one_shot"] else prune_phase(r, ck)
        masked.eval()
        masked_top1 = r.evaluate(masked)
        nv = pruner.convert({"source": r.provenance})
        r.log(f"pruned (masked) top-1 {masked_top1:.2f}%; converted to NViT")
        pruning = pruning_record(pruner, masked_top1)
        r.timings["prune_phase_top1"] = masked_top1
        # The last target's model joins the snapshots of the earlier ones: every model is fine-tuned from
        # a file, so a run resumed in any model's fine-tuning finds all of them.
        engine.save_checkpoint({"target": targets[-1], "nvit_config": nv.config.to_dict(), "model": nv.state_dict(),
                                "pruning": pruning}, snapshot_path(out, targets[-1]), p)
        ck = None
    models = [r.finetune_model(t, ck if ck is not None and ck.get("target", targets[-1]) == t else None)
              for t in targets]
    return finish(r, models, dense_top1=dense_top1, t_start=t_start, kernels=kernels(r.device))


def main(argv: list[str] | None = None) -> int:
    p = None
    try:
        s = resolve_settings(argv)
        try:
            p = engine.start_processes(s["device"])
        except RuntimeError as e:
            raise RunError(str(e)) from None
        run(s, p)
        return 0
    except (StopRequested, RunComplete) as e:
        if p is None or p.main:
            print(f"nvit.prune: {e}", file=sys.stderr)
        return 0
    except RunError as e:
        print(f"nvit.prune: error: {e}" if p is None or not p.distributed else f"nvit.prune [rank {p.rank}]: "
              f"error: {e}", file=sys.stderr)
        return 2
    except engine.WriteFailed as e:
        print(f"nvit.prune: error: {e}", file=sys.stderr)
        return 2
    except engine.RanksDisagree as e:
        print(f"nvit.prune [rank {p.rank}]: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("nvit.prune: interrupted; continue with --resume <out>", file=sys.stderr)
        return 130
    finally:
        if p is not None:
            engine.stop_processes(p)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m nvit.prune`: prune a Vision Transformer with NViT's global Hessian-aware method.

With no arguments it runs the embedded default: the small DeiT-style timm ViT shipped with nvit,
pretrained on the shipped Fashion-MNIST subset, pruned to 40 % of its FLOPs, fine-tuned, and
reported (a few minutes on 2 CPU cores). With arguments it prunes your timm model on your images:

    python -m nvit.prune --model deit_small_patch16_224 --checkpoint deit_s.safetensors \\
        --data /data/imagenet-subset --target-metric latency --target 0.5 --out runs/deit_s

Phases: (1) prune while training with distillation from the frozen dense teacher: every
--prune-every iterations the lowest-ranked structures of the whole model are removed, until the
target is met; (2) convert to an NViT model (exact); (3) fine-tune it with the same distillation;
(4) report. Settings can come from a YAML file (--config; keys are the flag names with '_').
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from .io import atomic_write, atomic_write_json

SCHEMA_VERSION = 1
DEFAULTS = dict(
    model=None, checkpoint=None, nvit_model=None, data=None, img_size=None, in_chans=None,
    out=None, resume=None, config=None,
    target_metric="flops", target=0.4, granularity="aligned", eta=0.0, normalize="cost",
    criterion="hessian", allocation="global",
    prune_every=10, prune_units=None, prune_epochs=1.5, finetune_epochs=2.5,
    lr=5e-4, finetune_lr=5e-4, min_lr_ratio=0.02, weight_decay=0.05, batch_size=64,
    temperature=3.0, distill_weight=0.5, label_smoothing=0.0, pad=2, flip=True,
    group_embed=4, group_heads=1, group_qk=2, group_v=2, group_mlp=8, ema_momentum=0.9,
    latency_batch=64, latency_points=3, eval_limit=None, train_limit=None,
    seed=0, threads=None, device="cpu", progress=True, checkpoint_every=50, stop_after=None,
)


class RunError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nvit.prune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("input")
    g.add_argument("--model", help="timm model name (e.g. deit_small_patch16_224); needs --checkpoint")
    g.add_argument("--checkpoint", help="weights for --model (.safetensors, or a torch state dict .pth/.pt)")
    g.add_argument("--nvit-model", help="a saved NViT model directory to prune further")
    g.add_argument("--data", help="image folder with train/ and val/ (or test/) class subfolders; "
                                  "default: the embedded Fashion-MNIST subset")
    g.add_argument("--img-size", type=int, help="input size for --data (default: the model's)")
    g.add_argument("--in-chans", type=int, help="1 (grayscale) or 3 (default: the model's)")
    g.add_argument("--config", help="YAML file of settings (flags override it)")
    g = ap.add_argument_group("output")
    g.add_argument("--out", help="output directory (default: runs/nvit-<time>); must not hold another run")
    g.add_argument("--resume", help="continue the interrupted run in this directory")
    g = ap.add_argument_group("target and ranking")
    g.add_argument("--target-metric", choices=("latency", "flops", "params"))
    g.add_argument("--target", type=float, help="fraction of the dense model's metric to reach, in (0, 1)")
    g.add_argument("--granularity", choices=("aligned", "per-head"))
    g.add_argument("--eta", type=float, help="latency-aware term η (measures a latency table when > 0)")
    g.add_argument("--normalize", choices=("cost", "none"), help="rank by saliency per cost saved, or raw")
    g.add_argument("--criterion", choices=("hessian", "magnitude"),
                   help="structure score: Hessian saliency (NViT) or weight magnitude (baseline)")
    g.add_argument("--allocation", choices=("global", "uniform"),
                   help="one global ranking (NViT), or the same keep ratio in every block (baseline)")
    g.add_argument("--group-embed", type=int, help="embedding channels removed together")
    g.add_argument("--group-heads", type=int)
    g.add_argument("--group-qk", type=int)
    g.add_argument("--group-v", type=int)
    g.add_argument("--group-mlp", type=int)
    g.add_argument("--ema-momentum", type=float, help="EMA of the saliency across prune steps")
    g.add_argument("--latency-points", type=int, help="latency table grid points per axis")
    g = ap.add_argument_group("schedule")
    g.add_argument("--prune-every", type=int, help="iterations between prune steps (K)")
    g.add_argument("--prune-units", type=int, help="units removed per prune step (N; default: sized so the "
                                                   "target is met two thirds into the pruning phase)")
    g.add_argument("--prune-epochs", type=float, help="epochs of the pruning phase")
    g.add_argument("--finetune-epochs", type=float, help="epochs of fine-tuning the converted model")
    g.add_argument("--lr", type=float, help="learning rate while pruning")
    g.add_argument("--finetune-lr", type=float, help="peak learning rate of the fine-tuning (cosine)")
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--temperature", type=float, help="distillation temperature")
    g.add_argument("--distill-weight", type=float, help="weight of the KL term, in [0, 1]")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--pad", type=int, help="random-crop padding of the embedded data (0: none)")
    g.add_argument("--no-flip", dest="flip", action="store_const", const=False, help="no horizontal flip")
    g = ap.add_argument_group("run")
    g.add_argument("--latency-batch", type=int, help="batch size of the latency measurements")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test images")
    g.add_argument("--train-limit", type=int, help="train on the first N images")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    g.add_argument("--device", help="cpu or cuda[:i]")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    g.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    g.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: stop as if interrupted
    ap.set_defaults(**{k: None for k in DEFAULTS})
    return ap


def resolve_settings(argv: list[str] | None) -> dict:
    """Defaults < YAML file < flags; then checked."""
    args = vars(build_parser().parse_args(argv))
    s = dict(DEFAULTS)
    if args.get("config"):
        p = Path(args["config"])
        if not p.is_file():
            raise RunError(f"config file {p} not found")
        try:
            y = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(y, dict):
            raise RunError(f"config file {p} must hold a mapping of settings")
        y = {k.replace("-", "_"): v for k, v in y.items()}
        unknown = sorted(set(y) - set(DEFAULTS))
        if unknown:
            raise RunError(f"config file {p}: unknown settings {unknown}")
        s.update(y)
    s.update({k: v for k, v in args.items() if v is not None})
    check_settings(s)
    return s


def check_settings(s: dict) -> None:
    if s["model"] and s["nvit_model"]:
        raise RunError("give either --model (with --checkpoint) or --nvit-model, not both")
    if s["model"] and not s["checkpoint"]:
        raise RunError(f"--model {s['model']} needs --checkpoint FILE (nvit downloads nothing)")
    if s["checkpoint"] and not s["model"]:
        raise RunError("--checkpoint needs --model NAME (the timm architecture it belongs to)")
    if s["target_metric"] not in ("latency", "flops", "params"):
        raise RunError(f"--target-metric must be latency, flops or params, got {s['target_metric']!r}")
    if not isinstance(s["target"], (int, float)) or not 0.0 < float(s["target"]) < 1.0:
        raise RunError(f"--target must be a fraction in (0, 1) of the dense model's {s['target_metric']}, "
                       f"got {s['target']}")
    if s["granularity"] not in ("aligned", "per-head"):
        raise RunError(f"--granularity must be aligned or per-head, got {s['granularity']!r}")
    positive = ("prune_every", "batch_size", "latency_batch", "checkpoint_every", "group_embed", "group_heads",
                "group_qk", "group_v", "group_mlp", "latency_points")
    for k in positive:
        if int(s[k]) < 1:
            raise RunError(f"--{k.replace('_', '-')} must be ≥1, got {s[k]}")
    for k in ("prune_epochs", "finetune_epochs", "eta", "weight_decay", "label_smoothing"):
        if float(s[k]) < 0:
            raise RunError(f"--{k.replace('_', '-')} must be ≥0, got {s[k]}")
    for k in ("lr", "finetune_lr", "temperature"):
        if float(s[k]) <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be > 0, got {s[k]}")
    if not 0.0 <= float(s["distill_weight"]) <= 1.0:
        raise RunError(f"--distill-weight must be in [0, 1], got {s['distill_weight']}")
    if s["prune_units"] is not None and int(s["prune_units"]) < 1:
        raise RunError(f"--prune-units must be ≥1, got {s['prune_units']}")


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def load_dense_model(s: dict) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, provenance)."""
    if s["nvit_model"]:
        import nvit

        p = Path(s["nvit_model"])
        if not p.exists():
            raise RunError(f"--nvit-model {p} does not exist")
        try:
            return nvit.load(p), {"source": "nvit", "path": str(p)}
        except ValueError as e:
            raise RunError(str(e)) from None
    if s["model"]:
        import timm

        name = s["model"]
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise RunError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        ck = Path(s["checkpoint"])
        if not ck.is_file():
            raise RunError(f"checkpoint {ck} not found")
        state = _read_state_dict(ck)
        kw = {}  # shape facts the checkpoint fixes: its classifier width and depth
        if "head.weight" in state:
            kw["num_classes"] = state["head.weight"].shape[0]
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
        if blocks:
            kw["depth"] = max(blocks) + 1
        if s["img_size"]:
            kw["img_size"] = s["img_size"]
        if s["in_chans"]:
            kw["in_chans"] = s["in_chans"]
        try:
            model = timm.create_model(name, pretrained=False, **kw)
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (RuntimeError, TypeError) as e:
            raise RunError(f"checkpoint {ck} does not fit {name}: {e}") from None
        if missing or unexpected:
            raise RunError(f"checkpoint {ck} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval(), {"source": "timm", "model": name, "checkpoint": str(ck)}
    from .tiny_model import EMBEDDED_MODEL, WEIGHTS_PATH, create_embedded_model

    return create_embedded_model(pretrained=True), {"source": "embedded", "model": "nvit.tiny_model",
                                                    "config": EMBEDDED_MODEL, "checkpoint": WEIGHTS_PATH.name}


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "model_ema"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
    except Exception as e:  # torch/safetensors raise many types for a bad file
        raise RunError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    from .model import NViT

    if isinstance(model, NViT):
        c = model.config
        return c.in_chans, c.img_size, c.img_size
    pe = model.patch_embed
    img = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    return pe.proj.in_channels, img[0], img[1]


def load_data(s: dict, model: torch.nn.Module):
    """(train set, test set, description)."""
    C, H, _ = input_shape(model)
    if s["data"]:
        from .datasets import load_image_folder

        root = Path(s["data"])
        if not root.is_dir():
            raise RunError(f"--data {root} is not a folder")
        try:
            train = load_image_folder(root, "train", s["img_size"] or H, s["in_chans"] or C)
            try:
                test = load_image_folder(root, "val", s["img_size"] or H, s["in_chans"] or C)
            except FileNotFoundError:
                test = load_image_folder(root, "test", s["img_size"] or H, s["in_chans"] or C)
        except (FileNotFoundError, ValueError) as e:
            raise RunError(str(e)) from None
        desc = {"kind": "image-folder", "root": str(root)}
    else:
        from .datasets import load_embedded

        if (C, H) != (1, 28):
            raise RunError(f"the embedded data is 1×28×28 but the model takes {C}×{H}×{H}; give --data")
        train, test = load_embedded("train"), load_embedded("test")
        desc = {"kind": "embedded", "name": "Fashion-MNIST subset"}
    if s["train_limit"]:
        train = torch.utils.data.Subset(train, range(min(len(train), s["train_limit"])))
        if hasattr(train.dataset, "tensors"):
            train = torch.utils.data.TensorDataset(*(t[: len(train)] for t in train.dataset.tensors))
    if s["eval_limit"]:
        n = min(len(test), s["eval_limit"])
        test = (torch.utils.data.TensorDataset(*(t[:n] for t in test.tensors)) if hasattr(test, "tensors")
                else torch.utils.data.Subset(test, range(n)))
    desc.update(n_train=len(train), n_test=len(test))
    return train, test, desc


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def prepare_out_dir(s: dict) -> Path:
    if s["resume"]:
        out = Path(s["resume"])
        if not (out / "checkpoint.pt").is_file():
            raise RunError(f"--resume {out}: no checkpoint.pt there (nothing to resume)")
        return out
    out = Path(s["out"] or f"runs/nvit-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        what = "another nvit run" if (out / "run.json").exists() else "other files"
        raise RunError(f"output directory {out} already holds {what}; choose a new --out "
                       f"(or --resume {out} to continue an interrupted run)")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, s: dict, out: Path):
        from .training import BatchStream

        self.s, self.out = s, out
        self.device = torch.device(s["device"])
        self.dense, self.provenance = load_dense_model(s)
        self.dense.to(self.device)
        self.train_set, self.test_set, self.data_desc = load_data(s, self.dense)
        self.teacher = copy.deepcopy(self.dense).eval().requires_grad_(False)
        self.prune_stream = BatchStream(self.train_set, s["batch_size"], s["seed"], "prune")
        self.ft_stream = BatchStream(self.train_set, s["batch_size"], s["seed"], "finetune")
        self.embedded = not s["data"]
        self.timings: dict[str, float] = {}
        self.log_lines: list[str] = []

    def log(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg)
        self.log_lines.append(msg)

    # ---- one training iteration -------------------------------------------------------------------
    def _step(self, model, opt, stream, i: int) -> float:
        from .training import augment, distillation_loss

        s = self.s
        x, y = stream.batch(i)
        if self.embedded and (s["pad"] or s["flip"]):
            x = augment(x, s["pad"], stream.generator(i), flip=s["flip"])
        x, y = x.to(self.device), y.to(self.device)
        with torch.no_grad():
            t = self.teacher(x)
        model.train()
        out = model(x)
        loss = distillation_loss(out, t, y, temperature=s["temperature"], weight=s["distill_weight"],
                                 label_smoothing=s["label_smoothing"])
        if not torch.isfinite(loss):
            raise RunError(f"the loss became {loss.item()} at iteration {i}; lower --lr (now {opt.param_groups[0]['lr']:.2e})")
        opt.zero_grad(set_to_none=False)
        loss.backward()
        return loss.item()

    def _optimizer(self, model, lr: float):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith("_token") or name == "pos_embed" else decay).append(p)
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.s["weight_decay"]},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def _checkpoint(self, phase: str, it: int, model, opt, sched=None, pruner=None) -> None:
        state = {"schema": SCHEMA_VERSION, "phase": phase, "iteration": it, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": None if sched is None else sched.state_dict(),
                 "pruner": None if pruner is None else pruner.state_dict(), "timings": self.timings,
                 "log": self.log_lines,
                 "nvit_config": None if phase != "finetune" else model.config.to_dict()}
        atomic_torch_save(state, self.out / "checkpoint.pt")

    @staticmethod
    def _restore(ck: dict | None, phase: str, model, opt, **more) -> int:
        """Load a checkpoint of `phase` into model, optimizer and `more` (checkpoint key → object);
        returns the iteration to continue from (0 without one)."""
        if ck is None or ck["phase"] != phase:
            return 0
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for key, obj in more.items():
            obj.load_state_dict(ck[key])
        return ck["iteration"]

    def _maybe_stop(self, it_total: int) -> None:
        if self.s["stop_after"] is not None and it_total >= self.s["stop_after"]:
            raise StopRequested(it_total)

    # ---- phases -----------------------------------------------------------------------------------
    def make_pruner(self, model):
        from .latency import LatencyGrid, LatencyTable
        from .pruner import Pruner, Target, TargetUnreachableError

        s = self.s
        table = None
        if s["target_metric"] == "latency" or s["eta"] > 0:
            from .structures import ViTAdapter

            cfg = ViTAdapter(model).nvit_config(ViTAdapter(model).full_masks())
            grid = LatencyGrid.for_model(cfg, points=s["latency_points"])
            t0 = time.time()
            table = LatencyTable.measure(grid, tokens=cfg.num_tokens, batch_size=s["latency_batch"],
                                         device=self.device, progress=s["progress"]).monotonized()
            self.timings["latency_table_s"] = round(time.time() - t0, 2)
        try:
            return Pruner(model, Target(s["target_metric"], float(s["target"])), granularity=s["granularity"],
                          normalize=s["normalize"], eta=s["eta"], latency_table=table,
                          group_size={"embed": s["group_embed"], "head": s["group_heads"], "qk": s["group_qk"],
                                      "v": s["group_v"], "mlp": s["group_mlp"]},
                          ema_momentum=s["ema_momentum"], deterministic=True, criterion=s["criterion"],
                          allocation=s["allocation"])
        except TargetUnreachableError as e:
            raise RunError(str(e)) from None

    def prune_phase(self, ck: dict | None):
        from tqdm import tqdm

        from .pruner import TargetUnreachableError

        s = self.s
        model = copy.deepcopy(self.dense).train()
        pruner = self.make_pruner(model)
        opt = self._optimizer(model, s["lr"])
        planned = max(1, math.ceil(s["prune_epochs"] * self.prune_stream.per_epoch))
        n_units = s["prune_units"] or self._auto_units(pruner, planned)  # from the dense model, also on resume
        self.n_units = n_units
        start = self._restore(ck, "prune", model, opt, pruner=pruner)
        t0 = time.time() - self.timings.get("prune_s", 0.0)
        it = start
        bar = tqdm(total=planned, initial=start, desc="prune", disable=not s["progress"])
        loss_avg = None
        while it < planned or not pruner.done:
            if it >= 50 * planned:
                raise RunError("pruning did not reach the target; raise --prune-units or --prune-epochs")
            loss = self._step(model, opt, self.prune_stream, it)
            loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
            if not pruner.done:
                pruner.accumulate()
            opt.step()
            pruner.apply_masks()
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}", frac=f"{pruner.fraction():.3f}" if it % 10 == 0 else None)
            pruned_now = False
            if it % s["prune_every"] == 0 and not pruner.done:
                try:
                    info = pruner.prune_step(n_units)
                except TargetUnreachableError as e:
                    raise RunError(str(e)) from None
                pruned_now = True
                kinds = ", ".join(f"{k} {v}" for k, v in info.removed.items() if v)
                self.log(f"prune step {info.step} @ it {it}: removed {kinds or 'nothing'}; "
                         f"{s['target_metric']} {info.fraction:.3f} of dense; loss {loss_avg:.4f}")
            if pruned_now or it % s["checkpoint_every"] == 0:
                self.timings["prune_s"] = round(time.time() - t0, 2)
                self._checkpoint("prune", it, model, opt, pruner=pruner)
                self._maybe_stop(it)
        bar.close()
        self.timings["prune_s"] = round(time.time() - t0, 2)
        self.timings["prune_iterations"] = it
        return model, pruner

    def _auto_units(self, pruner, planned: int) -> int:
        """N so that removing N units per step would meet the target two thirds into the phase:
        the alive units times the fraction still to remove, over the steps available."""
        steps = max(1, int(planned * 2 / 3) // self.s["prune_every"])
        to_remove = int(pruner.unit_alive().sum()) * (1.0 - float(self.s["target"]))
        return max(1, math.ceil(to_remove / steps))

    def finetune_phase(self, nv, ck: dict | None):
        from tqdm import tqdm

        from .training import lr_lambda

        s = self.s
        opt = self._optimizer(nv, s["finetune_lr"])
        total = max(1, math.ceil(s["finetune_epochs"] * self.ft_stream.per_epoch)) if s["finetune_epochs"] else 0
        warm = min(total, max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(total, 1), warm, s["min_lr_ratio"]))
        start = self._restore(ck, "finetune", nv, opt, scheduler=sched)
        t0 = time.time() - self.timings.get("finetune_s", 0.0)
        bar = tqdm(total=total, initial=start, desc="fine-tune", disable=not s["progress"])
        loss_avg = None
        prune_its = self.timings.get("prune_iterations", 0)
        for it in range(start, total):
            loss = self._step(nv, opt, self.ft_stream, it)
            loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            if (it + 1) % s["checkpoint_every"] == 0 and it + 1 < total:
                self.timings["finetune_s"] = round(time.time() - t0, 2)
                self._checkpoint("finetune", it + 1, nv, opt, sched)
                self._maybe_stop(prune_its + it + 1)
        bar.close()
        self.timings["finetune_s"] = round(time.time() - t0, 2)
        if loss_avg is not None:
            self.log(f"fine-tuned {total} iterations; final loss {loss_avg:.4f}")
        return nv.eval()


class StopRequested(Exception):
    def __init__(self, it: int):
        super().__init__(f"stopped after {it} iterations as asked (--stop-after); resume with --resume")


def run(s: dict) -> dict:
    from . import io as nvio
    from .cost import count_flops, count_params
    from .latency import measure_model_latency
    from .report import plot_dims, summary_text
    from .training import evaluate

    # Which kernels will run, said before anything is read or written (and an error if the compiled
    # extension exists but cannot load: that would silently cost the whole speedup).
    print(f"nvit.prune: {kernels_line(_kernels(torch.device(s['device'])))}", flush=True)
    out = prepare_out_dir(s)
    if s["resume"]:
        saved = json.loads((out / "run.json").read_text())
        keep = {k: s[k] for k in ("resume", "stop_after", "progress")}
        s = {**saved["settings"], **keep}
    else:
        atomic_write_json(out / "run.json", {"schema": SCHEMA_VERSION, "settings": s, "started": time.time()})
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    torch.manual_seed(s["seed"])
    ck = None
    if s["resume"]:
        ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    r = Run(s, out)
    if ck is not None:
        r.timings.update(ck["timings"])
        r.log_lines = list(ck.get("log", []))
        r.log(f"resuming {out} at {ck['phase']} iteration {ck['iteration']}")
    dev = r.device
    t_start = time.time()
    dense_top1 = evaluate(r.dense, r.test_set, device=dev, progress=s["progress"])
    r.log(f"dense model: top-1 {dense_top1:.2f}% on {len(r.test_set)} test images")

    from .model import NViT, NViTConfig

    if ck is None or ck["phase"] == "prune":
        masked, pruner = r.prune_phase(ck)
        masked.eval()
        masked_top1 = evaluate(masked, r.test_set, device=dev)
        nv = pruner.convert({"source": r.provenance})
        nv.to(dev)
        r.log(f"pruned (masked) top-1 {masked_top1:.2f}%; converted to NViT")
        masks = pruner.masks.state_dict()
        history = pruner.history
        dense_cfg = pruner.dense_config
        r.timings["prune_phase_top1"] = masked_top1
        ck_ft = None
        atomic_torch_save({"masks": masks, "history": history, "dense_config": dense_cfg.to_dict(),
                           "masked_top1": masked_top1}, out / "pruning.pt")
    else:
        saved = torch.load(out / "pruning.pt", map_location="cpu", weights_only=True)
        masks, history = saved["masks"], saved["history"]
        dense_cfg = NViTConfig.from_dict(saved["dense_config"])
        masked_top1 = saved["masked_top1"]
        nv = NViT(NViTConfig.from_dict(ck["nvit_config"])).to(dev)
        ck_ft = ck
    nv = r.finetune_phase(nv, ck_ft)
    top1 = evaluate(nv, r.test_set, device=dev, progress=s["progress"])
    r.log(f"fine-tuned NViT model: top-1 {top1:.2f}%")

    shape = input_shape(r.dense)
    lat = {"dense": math.inf, "pruned": math.inf}
    for _ in range(3):  # interleaved rounds, best median of each: fair under background load
        for name, m in (("dense", r.dense), ("pruned", nv)):
            lat[name] = min(lat[name], measure_model_latency(m, shape, batch_size=s["latency_batch"], device=dev,
                                                             warmup=2, repeats=5))
    cfg = nv.config
    report = {
        "schema": SCHEMA_VERSION,
        "model": r.provenance, "data": r.data_desc,
        "dense": {"params": count_params(dense_cfg), "flops": count_flops(dense_cfg),
                  "latency_s": lat["dense"], "top1": dense_top1},
        "pruned": {"params": count_params(cfg), "flops": count_flops(cfg), "latency_s": lat["pruned"],
                   "top1": top1, "top1_before_finetune": masked_top1},
        "latency": {"batch_size": s["latency_batch"], "device": _device_desc(dev), "dtype": "float32",
                    "statistic": "median"},
        "ratios": {"params": count_params(dense_cfg) / count_params(cfg),
                   "flops": count_flops(dense_cfg) / count_flops(cfg), "speedup": lat["dense"] / lat["pruned"]},
        "architecture": {"embed_dim": cfg.embed_dim, "dense_embed_dim": dense_cfg.embed_dim,
                         "blocks": [dataclasses.asdict(b) for b in cfg.blocks]},
        "prune_steps": history, "units_per_step": getattr(r, "n_units", None),
        "settings": s,
        "timings": {**r.timings, "total_s": round(time.time() - t_start, 2)},
        "kernels": _kernels(dev),
    }
    nvio.save(nv, out / "model", overwrite=True)
    from safetensors.torch import save_file

    atomic_write(out / "masks.safetensors", lambda tmp: save_file({k: v.to(torch.uint8) for k, v in masks.items()}, tmp))
    plot_dims(dense_cfg, cfg, out / "dims.png", title=f"NViT ({s['granularity']}) — {s['target_metric']} "
                                                     f"target {s['target']}")
    atomic_write_json(out / "report.json", report)
    for f in ("checkpoint.pt", "pruning.pt"):  # resume state: the run is complete now
        (out / f).unlink(missing_ok=True)
    text = summary_text(report, out)
    print(text)
    return report


def _device_desc(dev: torch.device) -> str:
    from .latency import device_name

    return f"{dev.type}: {device_name(dev)}, {torch.get_num_threads()} threads" if dev.type == "cpu" else device_name(dev)


def _kernels(dev: torch.device) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    try:
        s = resolve_settings(argv)
        run(s)
        return 0
    except StopRequested as e:
        print(f"nvit.prune: {e}", file=sys.stderr)
        return 0
    except RunError as e:
        print(f"nvit.prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nvit.prune: interrupted; continue with --resume <out>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

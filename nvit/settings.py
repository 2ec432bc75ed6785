"""Every setting of `python -m nvit.prune`, declared once: its flag, default, help and check.

The argparse parser (with defaults in --help), the YAML keys (the names below, '-' or '_'), the
defaults of a run and the checks of a run all derive from ``FLAGS``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml


class RunError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


# Checks: each returns an error message or None.
def positive(v) -> str | None:
    return None if v >= 1 else "must be ≥1"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be ≥0"


def greater_than_zero(v) -> str | None:
    return None if v > 0 else "must be > 0"


def open_fraction(v) -> str | None:
    return None if 0.0 < v < 1.0 else "must be a fraction in (0, 1)"


def descending_fractions(v) -> str | None:
    ok = all(0.0 < t < 1.0 for t in v) and all(a > b for a, b in zip(v, v[1:]))
    return None if ok and v else "must be a fraction in (0, 1), or several in descending order"


def fraction_list(text) -> tuple[float, ...]:
    """"0.6,0.45,0.3" (or one number, or a YAML list) → (0.6, 0.45, 0.3)."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return tuple(float(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a comma-separated list, got {text!r}") from None


def unit_interval(v) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def rate(v) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


@dataclass(frozen=True)
class Flag:
    name: str                      # the settings key; the flag is --name-with-dashes
    default: Any
    help: str
    group: str
    type: Callable | None = None   # None: a boolean switch (--x / --no-x)
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    nargs: str | int | None = None
    hidden: bool = False           # for tests; not in --help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


FLAGS: tuple[Flag, ...] = (
    # input: student, teacher, data
    Flag("model", None, "timm model name (e.g. deit_small_patch16_224; needs --checkpoint) or local-dir:FOLDER "
      "(timm's hub layout: config.json + model.safetensors or pytorch_model.bin)", "input", str),
    Flag("checkpoint", None, "weights for --model NAME (.safetensors, or a torch state dict .pth/.pt)", "input", str),
    Flag("nvit_model", None, "a saved NViT model folder to prune further", "input", str),
    Flag("teacher", None, "distillation teacher: timm name (needs --teacher-checkpoint) or local-dir:FOLDER "
      "(default: the dense model itself)", "input", str),
    Flag("teacher_checkpoint", None, "weights for --teacher NAME", "input", str),
    Flag("hard_teacher", None, "DeiT distilled students: a second teacher (e.g. a CNN) whose hard labels train the "
      "distillation head (the paper's Eq. 9); timm name or local-dir:FOLDER", "input", str),
    Flag("hard_teacher_checkpoint", None, "weights for --hard-teacher NAME", "input", str),
    Flag("distill_heads", "average", "DeiT distilled students: 'average' (one KL on the heads' mean) or 'separate' "
      "(the paper's losses: KL per head, hard labels on the distillation head with --hard-teacher)", "input", str,
      ("average", "separate")),
    Flag("data", None, "an image folder (train/ and val/ or test/ of class folders), or a dataset timm reads "
      "(hfds/NAME, wds/NAME, …, with --data-root); default: the embedded Fashion-MNIST subset", "input", str),
    Flag("data_root", None, "root/cache folder for hfds/… and wds/… datasets", "input", str),
    Flag("embedded_data", None, "without --data: an embedded-format .npz (train_/test_images, train_/test_labels "
      "uint8; scripts/make_fashion_subset.py writes one, e.g. with the whole Fashion-MNIST test split) instead of "
      "the shipped subset", "input", str),
    Flag("train_split", "train", "split to train on (hfds/wds)", "input", str),
    Flag("val_split", "validation", "split to evaluate on (hfds/wds)", "input", str),
    Flag("img_size", None, "input size (default: the model's)", "input", int, check=positive),
    Flag("in_chans", None, "1 (grayscale) or 3 (default: the model's)", "input", int, (1, 3)),
    Flag("config", None, "YAML file of settings (keys: the flag names); flags override it", "input", str),
    # output
    Flag("out", None, "output folder (default: runs/nvit-<time>); must not hold another run", "output", str),
    Flag("resume", None, "continue the interrupted run in this folder (same world size)", "output", str),
    # target and ranking
    Flag("target_metric", "auto", "what --target is a fraction of; auto: latency measured on this device (the "
      "paper's method) when its table takes at most --latency-budget seconds to measure or is cached, else FLOPs",
      "target and ranking", str, ("auto", "latency", "flops", "params")),
    Flag("latency_budget", 60.0, "seconds a latency table may take to measure for --target-metric auto",
      "target and ranking", float, check=non_negative),
    Flag("target", (0.4,), "fraction of the dense model's metric to reach; several, descending (0.6,0.45,0.3), give "
      "one model per target from one pruning run", "target and ranking", fraction_list, check=descending_fractions),
    Flag("granularity", "aligned", "aligned (the paper: a block's heads share dims) or per-head", "target and ranking",
      str, ("aligned", "per-head")),
    Flag("eta", 0.0, "latency-aware term η (measures a latency table when > 0)", "target and ranking", float,
      check=non_negative),
    Flag("normalize", "cost", "rank by saliency per cost saved, or raw", "target and ranking", str, ("cost", "none")),
    Flag("criterion", "hessian", "structure score: Hessian saliency (NViT) or weight magnitude (baseline)",
      "target and ranking", str, ("hessian", "magnitude")),
    Flag("allocation", "global", "one global ranking (NViT) or the same keep ratio in every block (baseline)",
      "target and ranking", str, ("global", "uniform")),
    Flag("round_to", None, "keep every dim a multiple of N: N for all (embedding, QK, V, MLP) or per kind, e.g. "
      "qk=8,v=8,mlp=16; sets those kinds' group sizes, so the ranking honours it", "target and ranking", str),
    Flag("group_embed", 4, "embedding channels removed together", "target and ranking", int, check=positive),
    Flag("group_heads", 1, "heads removed together", "target and ranking", int, check=positive),
    Flag("group_qk", 2, "QK dims removed together", "target and ranking", int, check=positive),
    Flag("group_v", 2, "V dims removed together", "target and ranking", int, check=positive),
    Flag("group_mlp", 8, "MLP channels removed together", "target and ranking", int, check=positive),
    Flag("ema_momentum", 0.9, "EMA of the saliency across prune steps", "target and ranking", float,
      check=unit_interval),
    Flag("latency_points", 5, "latency table grid points per axis of heads, QK, V and MLP (the embedding has 3)",
      "target and ranking", int, check=positive),
    Flag("prune_branches", False, "also rank each block's whole attention and MLP branch (layer skipping, as in UVC); "
      "a removed branch is absent from the converted model", "target and ranking"),
    # one-shot
    Flag("one_shot", False, "prune without training before the cut: saliency from --calibration-batches batches, "
      "re-estimated between --one-shot-steps steps towards the target; then convert and fine-tune "
      "(--finetune-epochs 0: none)", "one-shot"),
    Flag("calibration_batches", 8, "batches of saliency per one-shot step", "one-shot", int, check=positive),
    Flag("one_shot_steps", 4, "steps to reach the target in one-shot mode (geometric in the metric)", "one-shot",
      int, check=positive),
    # schedule
    Flag("prune_every", 10, "iterations between prune steps (K)", "schedule", int, check=positive),
    Flag("prune_units", None, "units removed per prune step (N; default: sized so the target is met two thirds "
      "into the pruning phase)", "schedule", int, check=positive),
    Flag("prune_epochs", 1.5, "epochs of the pruning phase", "schedule", float, check=non_negative),
    Flag("finetune_epochs", 2.5, "epochs of fine-tuning the converted model", "schedule", float, check=non_negative),
    # 1e-4, not the fine-tuning's 5e-4: at a constant 5e-4 the trained model drifts while it is pruned and the
    # pruning phase ended below one-shot pruning (embedded default, FLOPs 0.4: masked 81.67 vs 81.93 %);
    # at 1e-4 it ends above (82.53 %) and the final model is better too (83.73 vs 83.27 %).
    Flag("lr", 1e-4, "learning rate while pruning (constant)", "schedule", float, check=greater_than_zero),
    Flag("finetune_lr", 5e-4, "peak learning rate of the fine-tuning (warmup + cosine)", "schedule", float,
      check=greater_than_zero),
    Flag("min_lr_ratio", 0.02, "final fine-tuning lr as a fraction of the peak", "schedule", float,
      check=unit_interval),
    Flag("weight_decay", 0.05, "AdamW weight decay", "schedule", float, check=non_negative),
    Flag("batch_size", 64, "global batch size (split evenly over the ranks)", "schedule", int, check=positive),
    Flag("temperature", 3.0, "distillation temperature", "schedule", float, check=greater_than_zero),
    Flag("distill_weight", 0.5, "weight of the KL term", "schedule", float, check=unit_interval),
    Flag("label_smoothing", 0.0, "label smoothing of the CE term", "schedule", float, check=unit_interval),
    Flag("drop_path", None, "the student's drop-path (stochastic depth) rate while pruning and fine-tuning, with "
      "timm's linear decay over the blocks (default: the model's own; converted models keep their source's)",
      "schedule", float, check=rate),
    # augmentation and preprocessing
    Flag("augment", "auto", "train augmentation: timm's (random-resized-crop, flip, --aa, --reprob), pad-crop "
      "(pad --pad pixels, random crop, flip: for small images), none; auto: pad-crop for the embedded data, "
      "timm otherwise", "augmentation", str, ("auto", "timm", "pad-crop", "none")),
    Flag("pad", 2, "padding of pad-crop (0: no crop)", "augmentation", int, check=non_negative),
    Flag("flip", True, "random horizontal flip in pad-crop", "augmentation"),
    Flag("scale", (0.08, 1.0), "random-resized-crop area range (timm)", "augmentation", float, nargs=2),
    Flag("ratio", (3 / 4, 4 / 3), "random-resized-crop aspect range (timm)", "augmentation", float, nargs=2),
    Flag("hflip", 0.5, "horizontal flip probability (timm)", "augmentation", float, check=unit_interval),
    Flag("aa", None, "AutoAugment policy (timm, e.g. rand-m9-mstd0.5-inc1)", "augmentation", str),
    Flag("reprob", 0.0, "random erasing probability (timm)", "augmentation", float, check=unit_interval),
    Flag("crop_pct", None, "eval center-crop fraction in (0, 1] (default: the model's pretrained config)",
      "augmentation", float),
    Flag("interpolation", None, "resize interpolation (default: the model's pretrained config)", "augmentation", str),
    Flag("mean", None, "normalisation mean per channel (default: the model's pretrained config)", "augmentation",
      float, nargs="+"),
    Flag("std", None, "normalisation std per channel (default: the model's pretrained config)", "augmentation",
      float, nargs="+"),
    # run
    Flag("device", "cpu", "cpu, cuda (under torchrun: each rank its LOCAL_RANK's GPU) or cuda:i", "run", str),
    Flag("amp", "none", "mixed precision: autocast student and teacher (fp32 master weights; fp16 with a "
      "GradScaler)", "run", str, ("none", "bf16", "fp16")),
    Flag("workers", None, "DataLoader worker processes per rank (default: 0 for the embedded data, else "
      "min(8, cores per rank))", "run", int, check=non_negative),
    Flag("latency_batch", 64, "batch size of the latency measurements", "run", int, check=positive),
    Flag("eval_limit", None, "evaluate on the first N test images", "run", int, check=positive),
    Flag("train_limit", None, "train on the first N images", "run", int, check=positive),
    Flag("seed", 0, "seed of the data order, augmentation and initialisation", "run", int),
    Flag("threads", None, "torch threads per process (default: torch's choice)", "run", int, check=positive),
    Flag("progress", True, "progress bars", "run"),
    Flag("checkpoint_every", 50, "iterations between checkpoints", "run", int, check=positive),
    Flag("stop_after", None, "stop as if interrupted after N iterations (tests)", "run", int, hidden=True),
    Flag("kill_at", None, "end the process at once, as kill -9 would, at latency | prune:N | snapshot | finetune:N "
      "| report (fault-injection tests)", "run", str, hidden=True),
)
DEFAULTS = {f.name: f.default for f in FLAGS}
# Settings that may differ when resuming (all others come from the interrupted run's run.json).
RESUME_OVERRIDES = ("resume", "stop_after", "kill_at", "progress", "workers", "threads")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in FLAGS:
        g = groups.setdefault(f.group, ap.add_argument_group(f.group))
        help_text = argparse.SUPPRESS if f.hidden else f"{f.help} (default: {_show(f.default)})"
        if f.type is None:
            g.add_argument(f.flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            g.add_argument(f.flag, dest=f.name, type=f.type, choices=f.choices, nargs=f.nargs, help=help_text)
    ap.set_defaults(**{f.name: None for f in FLAGS})  # None = not given; defaults come from FLAGS below
    return ap


def _show(v) -> str:
    if isinstance(v, tuple):
        return " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return "none" if v is None else str(v)


def resolve(argv: list[str] | None, prog: str = "python -m nvit.prune", description: str = "") -> dict:
    """Defaults < YAML file < flags; then checked."""
    args = vars(build_parser(prog, description).parse_args(argv))
    s = dict(DEFAULTS)
    if args.get("config"):
        s.update(read_yaml(Path(args["config"])))
    s.update({k: v for k, v in args.items() if v is not None})
    for f in FLAGS:  # multi-value flags are tuples, from the command line or YAML lists alike
        if f.nargs and s[f.name] is not None:
            s[f.name] = tuple(f.type(v) for v in s[f.name])
    s["target"] = fraction_list(s["target"])
    if s["round_to"] is not None:  # --round-to stands for group sizes: one knob, set here
        s.update(round_to_groups(s["round_to"]))
    check(s)
    return s


def read_yaml(p: Path) -> dict:
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
    return y


# The flag of each structure kind's group size; --round-to sets those of the dim kinds (not heads).
GROUP_FLAGS = {"embed": "group_embed", "head": "group_heads", "qk": "group_qk", "v": "group_v", "mlp": "group_mlp"}
ROUNDED_KINDS = {k: f for k, f in GROUP_FLAGS.items() if k != "head"}


def round_to_groups(spec) -> dict:
    """--round-to N (every dim kind) or kind=N,… → the group-size settings it stands for."""
    text = str(spec).strip()
    try:
        if text.isdigit():
            pairs = {k: int(text) for k in ROUNDED_KINDS}
        else:
            pairs = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise RunError(f"--round-to takes N or kind=N,… (kinds: {', '.join(ROUNDED_KINDS)}), got {text!r}") from None
    bad = sorted(set(pairs) - set(ROUNDED_KINDS))
    if bad or any(v < 1 for v in pairs.values()):
        raise RunError(f"--round-to takes N or kind=N,… with N ≥ 1 (kinds: {', '.join(ROUNDED_KINDS)}), got {text!r}")
    return {ROUNDED_KINDS[k]: v for k, v in pairs.items()}


def check(s: dict) -> None:
    """Each flag's own check, then the rules between flags."""
    for f in FLAGS:
        v = s[f.name]
        if v is None:
            continue
        if f.choices is not None and v not in f.choices:
            raise RunError(f"{f.flag} must be one of {', '.join(map(str, f.choices))}, got {v!r}")
        if f.check is not None:
            try:
                why = f.check(v)
            except TypeError:
                why = "must be a number"
            if why:
                raise RunError(f"{f.flag} {why}, got {_show(v).replace(' ', ',')}")
    if s["model"] and s["nvit_model"]:
        raise RunError("give either --model or --nvit-model, not both")
    for who, ck in (("model", "checkpoint"), ("teacher", "teacher_checkpoint"),
                    ("hard_teacher", "hard_teacher_checkpoint")):
        name = s[who]
        if name and not name.startswith("local-dir:") and not s[ck]:
            raise RunError(f"--{who.replace('_', '-')} {name} needs --{ck.replace('_', '-')} FILE "
                           f"(nvit downloads nothing), or give a local-dir:FOLDER")
        if s[ck] and not name:
            raise RunError(f"--{ck.replace('_', '-')} needs --{who.replace('_', '-')} NAME")
    if s["hard_teacher"] and s["distill_heads"] != "separate":
        raise RunError("--hard-teacher trains the distillation head: it needs --distill-heads separate")
    if (s["mean"] is None) != (s["std"] is None):
        raise RunError("give --mean and --std together")
    if s["crop_pct"] is not None and not 0.0 < s["crop_pct"] <= 1.0:
        raise RunError(f"--crop-pct must be in (0, 1], got {s['crop_pct']}")

"""Pretrains the embedded model (nvit.tiny_model.EMBEDDED_MODEL) from scratch on the embedded Fashion-MNIST subset
-- or any NViT architecture given as a config file (e.g. one that `python -m nvit.revit` wrote).

    python -m nvit.pretrain --out nvit/data/fashion_vit.safetensors [--epochs E --lr LR --batch-size B --seed S]
    python -m nvit.pretrain --model-config revit.json --out runs/revit.safetensors

Recipe (DeiT-like, scaled down): AdamW, linear warmup then cosine decay per step, label smoothing, random crop
(zero-padding 2) + horizontal flip done on tensors. Writes the weights as fp16 safetensors (metadata: epochs, seed,
test top-1, versions) and <out>.json (model config, recipe, accuracy), both atomically. The recorded test top-1 is
that of the shipped fp16 weights cast back to fp32, i.e. what `create_embedded_model()` gives.

Reproducible: the model init, the loader order and the augmentation draw from generators seeded by --seed, and
deterministic algorithms are enforced; CPU float reductions depend on the thread count, so identical weights need
the same machine, library versions and --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nvit import engine
from nvit.io import atomic_write
from nvit.datasets import EMBEDDED_MEAN, EMBEDDED_PATH, EMBEDDED_STD, load_embedded
from nvit.loader import pad_crop_flip, train_loader
from nvit.tiny_model import EMBEDDED_MODEL, build_model
from nvit.training import evaluate, lr_lambda  # noqa: F401  (re-exported for callers)


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new one's setting and warns (FutureWarning)."""

    NEW = {"--limit-train": "--train-limit", "--limit-test": "--eval-limit"}

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"nvit.pretrain: {option_string} is deprecated; use {self.NEW[option_string]} (the spelling "
                      f"of nvit.prune)", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nvit.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors (the .json goes beside it)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr as a fraction of the peak")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--pad", type=int, default=2, help="random-crop padding in pixels (0: no crop)")
    ap.add_argument("--no-flip", action="store_true", help="disable the random horizontal flip")
    ap.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate while training")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    # The same spelling as `nvit.prune` (--train-limit, --eval-limit); the old one still works, with a warning.
    ap.add_argument("--train-limit", type=int, default=None, help="train on the first N images (tests)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images (tests)")
    ap.add_argument("--limit-train", type=int, dest="train_limit", action=_Deprecated, help=argparse.SUPPRESS)
    ap.add_argument("--limit-test", type=int, dest="eval_limit", action=_Deprecated, help=argparse.SUPPRESS)
    ap.add_argument("--embed-dim", type=int, default=None, help="model override (tests)")
    ap.add_argument("--depth", type=int, default=None, help="model override (tests)")
    ap.add_argument("--num-heads", type=int, default=None, help="model override (tests)")
    ap.add_argument("--mlp-ratio", type=float, default=None, help="model override (tests)")
    ap.add_argument("--model-config", type=Path, default=None,
                    help="train this NViT architecture (an NViT config.json, e.g. from nvit.revit) instead")
    ap.add_argument("--data", type=Path, default=EMBEDDED_PATH, help="embedded-format .npz dataset")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        ap.error("--epochs and --batch-size must be >= 1 and --lr > 0")
    if args.out.suffix != ".safetensors":
        ap.error(f"--out must end in .safetensors, got {args.out}")
    return args


def main(argv=None) -> dict:
    """Runs the command; returns the json record. Restores torch's global RNG, thread count and determinism flag
    afterwards, so it can be called from Python (tests) without side effects."""
    args = parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            torch.use_deterministic_algorithms(True)
            torch.manual_seed(args.seed)
            return _run(args, argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run(args: argparse.Namespace, argv) -> dict:

    overrides = {k: v for k, v in (("embed_dim", args.embed_dim), ("depth", args.depth),
                                   ("num_heads", args.num_heads), ("mlp_ratio", args.mlp_ratio)) if v is not None}
    train_ds = load_embedded("train", path=args.data, limit=args.train_limit)
    test_ds = load_embedded("test", path=args.data, limit=args.eval_limit)
    if args.model_config is not None:
        config, build = _nvit_architecture(args, train_ds)
    else:
        config = {**EMBEDDED_MODEL, **overrides}
        build = lambda **kw: build_model(**overrides, **kw)  # noqa: E731
    model = build(drop_path_rate=args.drop_path)
    n_params = sum(q.numel() for q in model.parameters())

    # The engine's pieces: deterministic per-sample augmentation in a DataLoader, optimizer groups.
    steps = max(1, len(train_ds) // args.batch_size)
    total = args.epochs * steps
    loader = train_loader(train_ds, global_batch=args.batch_size, seed=args.seed, phase="pretrain",
                          iterations=total, transform=pad_crop_flip(args.pad, not args.no_flip,
                                                                    fill=(0.0 - EMBEDDED_MEAN) / EMBEDDED_STD))
    opt = engine.make_optimizer(model, args.lr, args.weight_decay)
    warmup = min(total, max(1, round(args.warmup_epochs * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, args.min_lr_ratio))

    print(f"nvit.pretrain: {n_params / 1e6:.3f} M params, {len(train_ds)} train / {len(test_ds)} test images, "
          f"{args.epochs} epochs x {steps} steps, threads {torch.get_num_threads()}", flush=True)
    t0 = time.time()
    history = []
    batches = iter(loader)
    for epoch in range(args.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress)
        for _ in bar:
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 5),
                        "elapsed_s": round(time.time() - t0, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    train_time = time.time() - t0

    top1_fp32 = evaluate(model, test_ds, progress=not args.no_progress)
    # Ship fp16 (half the size); record the accuracy of exactly what loading gives back (fp16 -> fp32).
    state16 = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    shipped = build()
    shipped.load_state_dict({k: v.float() for k, v in state16.items()})
    top1 = evaluate(shipped, test_ds, progress=not args.no_progress)

    import safetensors
    import timm
    from safetensors.torch import save_file

    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "no_progress"}
    recipe["data"] = os.path.relpath(args.data, Path.cwd()) if args.data.is_absolute() else str(args.data)
    meta = {"format": "nvit-embedded-vit", "epochs": str(args.epochs), "seed": str(args.seed),
            "test_top1": f"{top1:.2f}", "n_test": str(len(test_ds)), "timm_version": timm.__version__,
            "torch_version": torch.__version__, "dtype": "float16", "model_config": json.dumps(config)}
    info = {
        "model": "nvit.NViT" if args.model_config is not None else "timm.models.vision_transformer.VisionTransformer",
        "config": config,
        "params": n_params,
        "recipe": {**recipe, "optimizer": "AdamW", "schedule": "linear warmup + cosine (per step)",
                   "augmentation": f"random crop (pad {args.pad}) + hflip={not args.no_flip}"},
        "data": {"file": "fashion_mnist_subset.npz", "n_train": len(train_ds), "n_test": len(test_ds),
                 "mean": EMBEDDED_MEAN, "std": EMBEDDED_STD},
        "test_top1": round(top1, 2),
        "test_top1_fp32": round(top1_fp32, 2),
        "train_time_s": round(train_time, 1),
        "history": history,
        "weights_dtype": "float16",
        "versions": {"timm": timm.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
                     "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "command": "python -m nvit.pretrain " + " ".join(map(str, sys.argv[1:] if argv is None else argv)),
    }
    out = args.out
    atomic_write(out, lambda tmp: save_file(state16, tmp, metadata=meta))
    atomic_write(out.with_suffix(".json"),
                  lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    print(f"test top-1 {top1:.2f}% (fp32 before rounding {top1_fp32:.2f}%), trained in {train_time:.0f} s; "
          f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}", flush=True)
    return info


def _nvit_architecture(args, train_ds):
    """(config dict, builder) of an NViT config file, checked against the data; the model is
    initialised as timm initialises a ViT (truncated normal 0.02, zero biases)."""
    from timm.models.vision_transformer import init_weights_vit_timm

    from nvit.model import NViT, NViTConfig

    try:
        cfg = NViTConfig.from_dict(json.loads(args.model_config.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"nvit.pretrain: error: --model-config {args.model_config}: {e}") from None
    x, _ = train_ds[0]
    n_classes = int(max(int(train_ds[i][1]) for i in range(min(len(train_ds), 2000)))) + 1
    if (cfg.in_chans, cfg.img_size) != (x.shape[0], x.shape[-1]) or cfg.num_classes < n_classes:
        raise SystemExit(f"nvit.pretrain: error: --model-config {args.model_config} takes {cfg.in_chans}×{cfg.img_size}² "
                         f"images into {cfg.num_classes} classes; the data has {x.shape[0]}×{x.shape[-1]}² images "
                         f"in {n_classes} classes")
    if args.drop_path:
        raise SystemExit("nvit.pretrain: error: --drop-path is not supported with --model-config")

    def build(drop_path_rate: float = 0.0):
        model = NViT(cfg)
        for name, m in model.named_modules():
            init_weights_vit_timm(m, name)
        for p in (getattr(model, n, None) for n in ("pos_embed", "cls_token")):
            if p is not None:
                torch.nn.init.trunc_normal_(p, std=0.02)
        return model

    return cfg.to_dict(), build


if __name__ == "__main__":
    main()

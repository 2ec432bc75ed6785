"""What a pruning run writes and shows a person: report.json, the saved model, masks, the per-block
dims plot and the closing summary (rank 0 writes; every rank takes part in nothing here but waits)."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from .io import atomic_write, atomic_write_json
from .model import NViTConfig


def finish(r, nv, pruning: dict, *, dense_top1: float, top1: float, t_start: float, kernels: dict) -> dict | None:
    """Measure latency, write the outputs and print the summary (rank 0); returns the report there."""
    from . import io as nvio
    from .cost import count_flops, count_params
    from .inputs import input_shape
    from .latency import device_name, measure_model_latency

    s, out, dev = r.s, r.out, r.device
    if not r.p.main:
        r.p.barrier()  # rank 0 measures and writes
        return None
    dense_cfg = NViTConfig.from_dict(pruning["dense_config"])
    shape = input_shape(r.dense)
    lat = {"dense": math.inf, "pruned": math.inf}
    with r.precision.autocast():  # latency in the precision of the run
        for _ in range(3):  # interleaved rounds, best median of each: fair under background load
            for name, m in (("dense", r.dense), ("pruned", nv)):
                lat[name] = min(lat[name], measure_model_latency(m, shape, batch_size=s["latency_batch"],
                                                                 device=dev, warmup=2, repeats=5))
    cfg = nv.config
    cost = {"dense": (count_params(dense_cfg), count_flops(dense_cfg)), "pruned": (count_params(cfg), count_flops(cfg))}
    dev_desc = (f"{dev.type}: {device_name(dev)}, {torch.get_num_threads()} threads" if dev.type == "cpu"
                else device_name(dev))
    report = {
        "schema": 2,
        "model": r.provenance, "teacher": r.teacher_desc, "data": r.data_desc,
        "dense": {"params": cost["dense"][0], "flops": cost["dense"][1], "latency_s": lat["dense"], "top1": dense_top1},
        "pruned": {"params": cost["pruned"][0], "flops": cost["pruned"][1], "latency_s": lat["pruned"],
                   "top1": top1, "top1_before_finetune": pruning["masked_top1"]},
        "latency": {"batch_size": s["latency_batch"], "device": dev_desc, "dtype": str(r.precision.tensor_dtype)
                    .removeprefix("torch."), "statistic": "median"},
        "precision": {"amp": s["amp"], "master_weights": "float32"},
        "processes": {"world_size": r.p.world, "backend": ("nccl" if dev.type == "cuda" else "gloo")
                      if r.p.distributed else None, "workers_per_rank": r.workers,
                      "global_batch": s["batch_size"]},
        "ratios": {"params": cost["dense"][0] / cost["pruned"][0], "flops": cost["dense"][1] / cost["pruned"][1],
                   "speedup": lat["dense"] / lat["pruned"]},
        "architecture": {"embed_dim": cfg.embed_dim, "dense_embed_dim": dense_cfg.embed_dim,
                         "blocks": [dataclasses.asdict(b) for b in cfg.blocks]},
        "prune_steps": pruning["history"], "units_per_step": getattr(r, "n_units", None),
        "settings": s,
        "timings": {**r.timings, "total_s": round(time.time() - t_start, 2)},
        "kernels": kernels,
    }
    record_preprocessing(nv, r.data_desc)
    nvio.save(nv, out / "model", overwrite=True)
    from safetensors.torch import save_file

    masks = pruning["masks"]
    atomic_write(out / "masks.safetensors", lambda tmp: save_file({k: v.to(torch.uint8) for k, v in masks.items()}, tmp))
    plot_dims(dense_cfg, cfg, out / "dims.png", title=f"NViT ({s['granularity']}) — {s['target_metric']} "
                                                     f"target {s['target']}")
    atomic_write_json(out / "report.json", report)
    for f in ("checkpoint.pt", "pruning.pt"):  # resume state: the run is complete now
        (out / f).unlink(missing_ok=True)
    print(summary_text(report, out))
    r.p.barrier()
    return report


def record_preprocessing(nv, data_desc: dict) -> None:
    """Store the preprocessing the run trained with in the model (its config.json's pretrained_cfg),
    so timm's data config and a later `--nvit-model` run resolve exactly that."""
    if data_desc.get("kind") == "embedded":
        from .datasets import EMBEDDED_MEAN, EMBEDDED_STD

        data = {"mean": [EMBEDDED_MEAN], "std": [EMBEDDED_STD], "crop_pct": 1.0}
    else:
        pre = data_desc.get("preprocessing", {})
        data = {k: pre[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in pre}
    nv.config.data = {**nv.config.data, **data}
    nv.pretrained_cfg = nv.config.pretrained_cfg()


def plot_dims(dense: NViTConfig, pruned: NViTConfig, path: Path, title: str = "") -> None:
    """PNG of heads, QK dims, V dims and MLP width per block, dense vs pruned (like the paper's
    redistribution figures). QK/V are summed over heads (per-head dims can differ); a removed
    attention (MLP) branch is marked ✕ on its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("heads", lambda b: b.heads), ("QK dims (Σ heads)", lambda b: sum(b.qk_dims)),
            ("V dims (Σ heads)", lambda b: sum(b.v_dims)), ("MLP width", lambda b: b.mlp)]
    x = list(range(len(pruned.blocks)))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (name, f) in zip(axes, rows):
        ax.bar(x, [f(b) for b in dense.blocks], color="#d9d9d9", label="dense")
        ax.bar(x, [f(b) for b in pruned.blocks], color="#2b7bba", label="pruned")
        mlp_axis = name.startswith("MLP")
        for i, b in enumerate(pruned.blocks):  # a whole branch removed: marked on its axes
            if (b.has_mlp if mlp_axis else b.has_attn) is False:
                ax.text(i, 0, "✕", ha="center", va="bottom", color="#c0392b", fontsize=12, fontweight="bold")
        ax.set_title(name)
        ax.set_xlabel("block")
        ax.set_xticks(x)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{title}   embedding {pruned.embed_dim}/{dense.embed_dim}".strip())
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def summary_text(report: dict, out: Path) -> str:
    d, p, r = report["dense"], report["pruned"], report["ratios"]
    lat = report["latency"]
    lines = [
        "",
        "nvit.prune — summary",
        f"  {'':10s}{'params':>12s}{'GFLOPs':>10s}{'latency':>12s}{'top-1':>9s}",
        f"  {'dense':10s}{d['params'] / 1e6:>11.3f}M{d['flops'] / 1e9:>10.3f}{d['latency_s'] * 1e3:>10.2f}ms"
        f"{d['top1']:>8.2f}%",
        f"  {'pruned':10s}{p['params'] / 1e6:>11.3f}M{p['flops'] / 1e9:>10.3f}{p['latency_s'] * 1e3:>10.2f}ms"
        f"{p['top1']:>8.2f}%",
        f"  {r['params']:.2f}× fewer params, {r['flops']:.2f}× fewer FLOPs, {r['speedup']:.2f}× faster "
        f"(batch {lat['batch_size']}, {lat['dtype']}, {lat['device']})",
        f"  top-1 change {p['top1'] - d['top1']:+.2f} points (before fine-tuning {p['top1_before_finetune']:.2f}%)",
        "  per block (heads | QK per head | V per head | MLP):",
    ]
    for i, b in enumerate(report["architecture"]["blocks"]):
        if b["qk_dims"]:
            attn = f"{len(b['qk_dims']):2d} | {_dims(b['qk_dims']):>14s} | {_dims(b['v_dims']):>14s}"
        else:
            attn = f"{'attention branch removed':^36s}"
        lines.append(f"    {i:2d}: {attn} | {b['mlp'] if b['mlp'] else 'MLP branch removed'}")
    lines.append(f"  embedding {report['architecture']['embed_dim']}/{report['architecture']['dense_embed_dim']}; "
                 f"took {report['timings'].get('total_s', 0):.0f} s")
    k = report["kernels"]
    lines.append(f"  kernels: saliency {k['saliency']}, attention {k['attention']} (extension {k['extension_state']})")
    lines.append(f"  wrote {out}/report.json, {out}/model/ (nvit.load), {out}/dims.png")
    return "\n".join(lines)


def _dims(ds: list[int]) -> str:
    return str(ds[0]) if len(set(ds)) == 1 else ",".join(map(str, ds))

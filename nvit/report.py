"""What a pruning run writes and shows a person: report.json, the saved model, masks, the per-block
dims plot and the closing summary (rank 0 writes; every rank takes part in nothing here but waits)."""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch

from .io import atomic_write, atomic_write_json
from .model import NViTConfig
from .settings import RunError


def finish(r, models: list[dict], *, dense_top1: float, t_start: float, kernels: dict) -> dict | None:
    """Measure latency, write the outputs and print the summary (rank 0); returns the report there.

    models: one per target, in target order ({"target", "model", "pruning", "top1"}); the last is the
    run's main result ("pruned"). One model is saved to model/, several to model_<target>/."""
    from . import io as nvio
    from .inputs import input_shape
    from .latency import device_name, measure_model_latency

    from .engine import check_agreement, kill_point as engine_kill_point

    s, out, dev = r.settings, r.out, r.device
    for m in models:  # every rank must hold the same final models (promise: ranks agree)
        check_agreement(f"final model of target {m['target']:g}", m["model"].state_dict(), r.procs)
    if not r.procs.main:
        r.procs.barrier()  # rank 0 measures and writes
        return None
    dense_cfg = nvio.config_from_dict(models[-1]["pruning"]["dense_config"])
    widths = r.family.embed_widths  # per stage (Swin), or the one embedding width

    def count_params(cfg):
        return nvio.count("params", cfg)

    def count_flops(cfg):
        return nvio.count("flops", cfg)

    shape = input_shape(r.dense)
    nets = [("dense", r.dense)] + [(m["target"], m["model"]) for m in models]
    lat = {name: math.inf for name, _ in nets}
    with r.precision.autocast():  # latency in the precision of the run
        for _ in range(3):  # interleaved rounds, best median of each: fair under background load
            for name, m in nets:
                lat[name] = min(lat[name], measure_model_latency(m, shape, batch_size=s["latency_batch"],
                                                                 device=dev, warmup=2, repeats=5))
    dense = {"params": count_params(dense_cfg), "flops": count_flops(dense_cfg), "latency_s": lat["dense"],
             "top1": dense_top1}
    metric = s["target_metric"]
    dense_metric = r.metric_policy.value(metric, dense_cfg)
    several = len(models) > 1
    entries = []
    for m in models:
        cfg, t = m["model"].config, m["target"]
        folder = out / (f"model_{t:g}" if several else "model")
        entries.append({
            "target": t, "params": count_params(cfg), "flops": count_flops(cfg), "latency_s": lat[t],
            "top1": m["top1"], "top1_before_finetune": m["pruning"]["masked_top1"], "folder": folder.name,
            "achieved": {"metric": metric, "fraction": r.metric_policy.value(metric, cfg) / dense_metric,
                         "target": t, "tolerance": float(m["pruning"].get("tolerance", 0.0))},
            "ratios": {"params": dense["params"] / count_params(cfg), "flops": dense["flops"] / count_flops(cfg),
                       "speedup": lat["dense"] / lat[t]},
            "architecture": {"embed_dim": cfg.embed_dim, "dense_embed_dim": dense_cfg.embed_dim,
                             "embed_dims": widths(cfg), "dense_embed_dims": widths(dense_cfg),
                             "blocks": [dataclasses.asdict(b) for b in cfg.blocks]},
            "prune_steps": m["pruning"]["history"]})
        record_preprocessing(m["model"], r.data_desc)
        nvio.save(m["model"], folder, overwrite=True)
    main = entries[-1]
    engine_kill_point(s, "report")
    checks = promise_checks(r, models, entries, shape)
    policy = r.metric_policy
    table_check = policy.table_check(r.dense, dense_cfg, models) if policy.table is not None else None
    dev_desc = (f"{dev.type}: {device_name(dev)}, {torch.get_num_threads()} threads" if dev.type == "cpu"
                else device_name(dev))
    report = {
        "schema": 3,
        "model": r.provenance, "teacher": r.teacher_desc, "data": r.data_desc,
        "dense": dense,
        "pruned": {k: main[k] for k in ("params", "flops", "latency_s", "top1", "top1_before_finetune")},
        "models": [{k: v for k, v in e.items() if k != "prune_steps"} for e in entries],
        "latency": {"batch_size": s["latency_batch"], "device": dev_desc, "dtype": str(r.precision.tensor_dtype)
                    .removeprefix("torch."), "statistic": "median"},
        "latency_table_check": table_check,
        "precision": {"amp": s["amp"], "master_weights": "float32"},
        "processes": {"world_size": r.procs.world, "backend": ("nccl" if dev.type == "cuda" else "gloo")
                      if r.procs.distributed else None, "workers_per_rank": r.workers,
                      "global_batch": s["batch_size"]},
        "ratios": main["ratios"],
        "architecture": main["architecture"],
        "prune_steps": main["prune_steps"], "units_per_step": r.book["units_per_step"],
        "skipped_steps": r.book["skipped_steps"],
        "checks": checks,
        "settings": s,
        "timings": {**r.timings, "total_s": round(time.time() - t_start, 2)},
        "kernels": kernels,
    }
    from safetensors.torch import save_file

    for m, e in zip(models, entries):
        masks = m["pruning"]["masks"]
        name = f"masks_{m['target']:g}.safetensors" if several else "masks.safetensors"
        atomic_write(out / name, lambda tmp, masks=masks: save_file({k: v.to(torch.uint8) for k, v in masks.items()}, tmp))
    plot_dims(dense_cfg, [(f"target {m['target']:g}", m["model"].config) for m in models], out / "dims.png", widths,
              title=f"NViT ({s['granularity']}) — {s['target_metric']} target {', '.join(f'{t:g}' for t in s['target'])}")
    failed = [f"{name}: {c['detail']}" for name, c in checks.items() if not c["ok"]]
    if failed:  # the resume state stays: nothing is lost, and the failure can be looked into
        atomic_write_json(out / "report.failed.json", report)
        r.procs.barrier()
        raise RunError("the run does not keep its promises (report.failed.json; resume state kept):\n  "
                       + "\n  ".join(failed))
    atomic_write_json(out / "report.json", report)  # the run is complete from here on
    remove_resume_state(out)
    print(summary_text(report, out))
    r.procs.barrier()
    return report


def remove_resume_state(out: Path) -> None:
    """The files only a resume reads (the checkpoint last: a run killed in between resumes as complete)."""
    shutil.rmtree(out / "snapshots", ignore_errors=True)
    (out / "checkpoint.pt").unlink(missing_ok=True)


def promise_checks(r, models: list[dict], entries: list[dict], shape) -> dict:
    """What the run promises, checked before it says it is done: every model at or below its target and
    below it by at most the cost of the last group removed (a head with its dims, --group-mlp channels, …);
    every saved model, reloaded, has the reported params and FLOPs and computes what the run's model
    computes. (Ranks agree: checked on the final weights before this.)"""
    from . import io as nvio

    checks = {}
    for m, e in zip(models, entries):
        a, t = e["achieved"], e["target"]
        ok = a["fraction"] <= t + 1e-9 and a["fraction"] >= t - a["tolerance"] - 1e-9
        checks[f"target {t:g}"] = {"ok": ok, "detail": f"{a['metric']} {a['fraction']:.5f} of dense for target {t:g} "
                                                      f"(tolerance {a['tolerance']:.5f}: the last removed group's cost)"}
        back = nvio.load(r.out / e["folder"]).to(r.device).eval()
        same_counts = (nvio.count("params", back.config), nvio.count("flops", back.config)) == (e["params"], e["flops"])
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(r.device)
        with torch.no_grad():
            want, got = m["model"].eval()(x), back(x)
        err = float((want - got).abs().max()) / max(float(want.abs().max()), 1e-12)
        checks[f"saved model {e['folder']}"] = {
            "ok": same_counts and err <= 1e-6,
            "detail": f"reloaded: params {nvio.count('params', back.config)} / flops {nvio.count('flops', back.config)} "
                      f"(reported {e['params']} / {e['flops']}), outputs {err:.1e} of scale apart"}
    return checks


def record_preprocessing(nv, data_desc: dict) -> None:
    """Store the preprocessing the run trained with in the model (its config.json's pretrained_cfg),
    so timm's data config and a later `--nvit-model` run resolve exactly that."""
    pre = data_desc.get("preprocessing", {})
    data = {k: pre[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in pre}
    nv.config.data = {**nv.config.data, **data}
    nv.pretrained_cfg = nv.config.pretrained_cfg()


def plot_dims(dense: NViTConfig, pruned: list[tuple[str, NViTConfig]], path: Path, widths, title: str = "") -> None:
    """PNG of heads, QK dims, V dims and MLP width per block, dense (grey bars) vs each pruned model
    (blue bars for one, a line per model for several), like the paper's redistribution figures.
    QK/V are summed over heads (per-head dims can differ); a removed attention (MLP) branch is marked
    ✕ on its axes. widths(config): the embedding width of each stage (its family's embed_widths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("heads", lambda b: b.heads), ("QK dims (Σ heads)", lambda b: sum(b.qk_dims)),
            ("V dims (Σ heads)", lambda b: sum(b.v_dims)), ("MLP width", lambda b: b.mlp)]
    x = list(range(len(dense.blocks)))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (name, f) in zip(axes, rows):
        ax.bar(x, [f(b) for b in dense.blocks], color="#d9d9d9", label="dense")
        for k, (label, cfg) in enumerate(pruned):
            values = [f(b) for b in cfg.blocks]
            if len(pruned) == 1:
                ax.bar(x, values, color="#2b7bba", label="pruned")
            else:
                ax.plot(x, values, marker="o", ms=3, label=label)
        mlp_axis = name.startswith("MLP")
        for label, cfg in pruned:
            for i, b in enumerate(cfg.blocks):  # a whole branch removed: marked on its axes
                if (b.has_mlp if mlp_axis else b.has_attn) is False:
                    ax.text(i, 0, "✕", ha="center", va="bottom", color="#c0392b", fontsize=12, fontweight="bold")
        ax.set_title(name)
        ax.set_xlabel("block")
        ax.set_xticks(x)
    axes[0].legend(loc="lower left", fontsize=8)
    embeds = ", ".join(_widths_text(widths(cfg)) for _, cfg in pruned)
    fig.suptitle(f"{title}   embedding {embeds}/{_widths_text(widths(dense))}".strip())
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _widths_text(widths: list[int]) -> str:
    """128, or 96·192·384 per stage."""
    return "·".join(str(w) for w in widths)


def summary_text(report: dict, out: Path) -> str:
    d, p, r = report["dense"], report["pruned"], report["ratios"]
    lat = report["latency"]
    lines = [
        "",
        "nvit.prune — summary",
        f"  {'':10s}{'params':>12s}{'GFLOPs':>10s}{'latency':>12s}{'top-1':>9s}",
        f"  {'dense':10s}{d['params'] / 1e6:>11.3f}M{d['flops'] / 1e9:>10.3f}{d['latency_s'] * 1e3:>10.2f}ms"
        f"{d['top1']:>8.2f}%",
        *(f"  {_model_name(m, report):10s}{m['params'] / 1e6:>11.3f}M{m['flops'] / 1e9:>10.3f}"
          f"{m['latency_s'] * 1e3:>10.2f}ms{m['top1']:>8.2f}%  ({m['top1_before_finetune']:.2f}% before fine-tuning)"
          for m in report["models"]),
        f"  {'smallest model: ' if len(report['models']) > 1 else ''}"
        f"{r['params']:.2f}× fewer params, {r['flops']:.2f}× fewer FLOPs, {r['speedup']:.2f}× faster "
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
    arch = report["architecture"]
    lines.append(f"  embedding {_widths_text(arch['embed_dims'])}/{_widths_text(arch['dense_embed_dims'])}; "
                 f"took {report['timings'].get('total_s', 0):.0f} s")
    if report.get("latency_table_check"):
        errs = ", ".join(f"{name} {c['error'] * 100:+.1f}%" for name, c in report["latency_table_check"].items())
        lines.append(f"  latency table vs measured blocks: {errs}")
    k = report["kernels"]
    lines.append(f"  kernels: saliency {k['saliency']}, attention {k['attention']} (extension {k['extension_state']})")
    folders = ", ".join(f"{out}/{m['folder']}/" for m in report["models"])
    lines.append(f"  wrote {out}/report.json, {folders} (nvit.load), {out}/dims.png")
    return "\n".join(lines)


def _model_name(m: dict, report: dict) -> str:
    return "pruned" if len(report["models"]) == 1 else f"t={m['target']:g}"


def _dims(ds: list[int]) -> str:
    return str(ds[0]) if len(set(ds)) == 1 else ",".join(map(str, ds))

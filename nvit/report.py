"""What a pruning run shows a person: the per-block dims plot and the closing summary."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_write
from .model import NViTConfig


def plot_dims(dense: NViTConfig, pruned: NViTConfig, path: Path, title: str = "") -> None:
    """PNG of heads, QK dims, V dims and MLP width per block, dense vs pruned (like the paper's
    redistribution figures). QK/V are summed over heads (per-head dims can differ)."""
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
        f"(batch {lat['batch_size']}, {lat['device']})",
        f"  top-1 change {p['top1'] - d['top1']:+.2f} points (before fine-tuning {p['top1_before_finetune']:.2f}%)",
        "  per block (heads | QK per head | V per head | MLP):",
    ]
    for i, b in enumerate(report["architecture"]["blocks"]):
        lines.append(f"    {i:2d}: {len(b['qk_dims']):2d} | {_dims(b['qk_dims']):>14s} | {_dims(b['v_dims']):>14s}"
                     f" | {b['mlp']}")
    lines.append(f"  embedding {report['architecture']['embed_dim']}/{report['architecture']['dense_embed_dim']}; "
                 f"took {report['timings'].get('total_s', 0):.0f} s")
    k = report["kernels"]
    lines.append(f"  kernels: saliency {k['saliency']}, attention {k['attention']} (extension {k['extension_state']})")
    lines.append(f"  wrote {out}/report.json, {out}/model/ (nvit.load), {out}/dims.png")
    return "\n".join(lines)


def _dims(ds: list[int]) -> str:
    return str(ds[0]) if len(set(ds)) == 1 else ",".join(map(str, ds))

"""`python -m nvit.revit`: new ViT architectures from NViT's redistribution rule (ReViT).

    python -m nvit.revit --embed-dim 176 --depth 12 --out revit_t.json               # the paper's rule
    python -m nvit.revit --embed-dim 192 --depth 12 --from runs/deit_s --flops 2.5e9 --out mine.json
    python -m nvit.revit --embed-dim 128 --depth 6 --uniform --flops 1.2e8 --out deit_like.json

Pruning finds where a ViT needs its width: the paper's Table 6 turns its findings into a rule --
heads, per-head QK and MLP width scale with the embedding width and double in the middle half of the
blocks, V stays 64 -- and trains such models from scratch (ReViT). Without --from the paper's rule is
applied; with --from (a prune run's folder or report.json, or a saved NViT model) the same kind of
rule is fitted to the dims that run found: per block, heads / EMB, QK per head / EMB and MLP / EMB as
functions of relative depth (V per head as it is), read at each new block's relative depth and scaled
by the new embedding width. --uniform gives the DeiT rule (H = EMB/64, QK = V = 64, MLP = 4·EMB) for
comparisons. --flops scales heads, QK and MLP by one factor so the model has about that many FLOPs
(FlopCounterMode's convention: 2 × multiply-adds). The output is an NViT config (config.json of
nvit.save); `python -m nvit.pretrain --model-config FILE` trains it from scratch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model import BlockConfig, NViTConfig

__all__ = ["paper_rule", "uniform_rule", "fitted_rule", "scale_to_flops", "main"]


def _round_to(x: float, n: int) -> int:
    return max(n, int(x // n) * n)


def paper_rule(embed: int, depth: int) -> list[tuple[int, int, int, int]]:
    """(heads, QK per head, V per head, MLP) per block by the paper's Table 6 as its code applies it:
    ε = 2 in the middle half of the blocks, else 1; H = round(ε·EMB/100), QK = ε·EMB/20 (down to a
    multiple of 8), V = 64, MLP = 3ε·EMB; the first and last blocks have 10 heads of the middle QK."""
    out = []
    for i in range(depth):
        ends = i in (0, depth - 1)
        eps = 2 if depth // 4 <= i < depth - depth // 4 else 1
        heads = 10 if ends else max(1, round(eps * embed / 100))
        qk = _round_to((2 if ends else eps) * embed / 20, 8)
        out.append((heads, qk, 64, 3 * eps * embed))
    return out


def uniform_rule(embed: int, depth: int) -> list[tuple[int, int, int, int]]:
    """DeiT: H = EMB/64 heads of 64 QK and V dims, MLP = 4·EMB, in every block."""
    heads = max(1, round(embed / 64))
    return [(heads, 64, 64, 4 * embed)] * depth


def fitted_rule(source: NViTConfig, embed: int, depth: int) -> list[tuple[int, int, int, int]]:
    """The source's per-block heads/EMB, QK-per-head/EMB, V per head and MLP/EMB, linearly
    interpolated over relative depth, at each new block's relative depth, times the new width."""
    src, E = source.blocks, source.embed_dim

    def profile(f):
        pts = [f(b) for b in src]

        def at(t: float) -> float:  # t in [0, 1]
            if len(pts) == 1:
                return pts[0]
            x = t * (len(pts) - 1)
            i = min(int(x), len(pts) - 2)
            return pts[i] + (x - i) * (pts[i + 1] - pts[i])
        return at

    heads = profile(lambda b: b.heads / E)
    qk = profile(lambda b: (sum(b.qk_dims) / b.heads) / E if b.heads else 0.0)
    v = profile(lambda b: sum(b.v_dims) / b.heads if b.heads else 0.0)
    mlp = profile(lambda b: b.mlp / E)
    out = []
    for i in range(depth):
        t = i / (depth - 1) if depth > 1 else 0.5
        out.append((max(1, round(heads(t) * embed)), max(1, round(qk(t) * embed)), max(1, round(v(t))),
                    max(1, round(mlp(t) * embed))))
    return out


def build_config(dims: list[tuple[int, int, int, int]], embed: int, base: dict) -> NViTConfig:
    blocks = [BlockConfig([q] * h, [v] * h, m, [q ** -0.5] * h) for h, q, v, m in dims]
    return NViTConfig(embed_dim=embed, blocks=blocks, **base)


def scale_to_flops(dims, embed: int, base: dict, flops: float) -> list[tuple[int, int, int, int]]:
    """Heads, QK and MLP times one factor s (found by bisection) so the model's FLOPs come closest to
    `flops` from below (V per head stays: the paper keeps it fixed)."""
    from .cost import count_flops

    def scaled(s):
        return [(max(1, round(h * s)), max(1, round(q * s)), v, max(1, round(m * s))) for h, q, v, m in dims]

    def f(s):
        return count_flops(build_config(scaled(s), embed, base))

    lo, hi = 1e-3, 1.0
    while f(hi) < flops and hi < 1e3:
        hi *= 2
    if f(lo) > flops:
        raise ValueError(f"nvit: --flops {flops:.3g} is below the smallest model of this width and depth "
                         f"({f(lo):.3g})")
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) <= flops else (lo, mid)
    return scaled(lo)


def read_source(path: Path) -> NViTConfig:
    """The pruned architecture of a prune run (folder or report.json) or of a saved NViT model."""
    if path.is_dir() and (path / "report.json").is_file():
        path = path / "report.json"
    if path.is_file() and path.name == "report.json":
        rep = json.loads(path.read_text())
        folder = path.parent / rep.get("models", [{"folder": "model"}])[-1]["folder"]
        path = folder
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.is_file():
        raise ValueError(f"nvit: --from {path}: expected a prune run's folder, its report.json, or a saved NViT model")
    from .io import load_config

    cfg = load_config(path)
    if not isinstance(cfg, NViTConfig):  # ReViT's rules give one embedding width to every block
        raise ValueError(f"nvit: --from {path}: a {cfg.family} model (one embedding width per stage); the ReViT "
                         f"rules fit single-stream ViTs only")
    return cfg


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m nvit.revit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embed-dim", type=int, required=True)
    ap.add_argument("--depth", type=int, required=True)
    rule = ap.add_mutually_exclusive_group()
    rule.add_argument("--from", dest="source", type=Path, help="fit the rule to this prune run or NViT model")
    rule.add_argument("--uniform", action="store_true", help="the DeiT rule instead (for comparisons)")
    ap.add_argument("--flops", type=float, help="scale heads, QK and MLP to about this many FLOPs")
    ap.add_argument("--img-size", type=int, help="default: the --from model's, else 224")
    ap.add_argument("--patch-size", type=int, help="default: the --from model's, else 16")
    ap.add_argument("--in-chans", type=int, help="default: the --from model's, else 3")
    ap.add_argument("--num-classes", type=int, help="default: the --from model's, else 1000")
    ap.add_argument("--out", type=Path, required=True, help="the config file to write (JSON)")
    a = ap.parse_args(argv)
    if a.embed_dim < 1 or a.depth < 1:
        ap.error("--embed-dim and --depth must be ≥ 1")
    if a.flops is not None and a.flops <= 0:
        ap.error("--flops must be > 0")
    return a


def make(a) -> NViTConfig:
    source = read_source(a.source) if a.source else None
    base = {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000}
    if source is not None:
        base = {k: getattr(source, k) for k in base} | {k: getattr(source, k) for k in (
            "qkv_bias", "proj_bias", "class_token", "global_pool", "fc_norm", "final_norm", "norm_eps", "data")}
    for k in ("img_size", "patch_size", "in_chans", "num_classes"):
        if getattr(a, k) is not None:
            base[k] = getattr(a, k)
    rule = "fitted" if source else "uniform" if a.uniform else "paper"
    dims = (fitted_rule(source, a.embed_dim, a.depth) if source else
            uniform_rule(a.embed_dim, a.depth) if a.uniform else paper_rule(a.embed_dim, a.depth))
    if a.flops is not None:
        dims = scale_to_flops(dims, a.embed_dim, base, a.flops)
    base["provenance"] = {"revit": {"rule": rule, "from": str(a.source) if a.source else None, "flops": a.flops}}
    return build_config(dims, a.embed_dim, base)


def main(argv=None) -> int:
    from .cost import count_flops, count_params
    from .io import atomic_write_json

    a = parse_args(argv)
    try:
        cfg = make(a)
    except (ValueError, OSError) as e:
        print(f"nvit.revit: error: {str(e).removeprefix('nvit: ')}", file=sys.stderr)
        return 2
    atomic_write_json(a.out, cfg.to_dict())
    rule = cfg.provenance["revit"]["rule"]
    print(f"nvit.revit: {rule} rule, embedding {cfg.embed_dim}, {len(cfg.blocks)} blocks: "
          f"{count_params(cfg) / 1e6:.3f} M params, {count_flops(cfg) / 1e9:.4g} GFLOPs; wrote {a.out}")
    for i, b in enumerate(cfg.blocks):
        print(f"  {i:2d}: {b.heads:3d} heads × QK {b.qk_dims[0]:3d} / V {b.v_dims[0]:3d}, MLP {b.mlp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

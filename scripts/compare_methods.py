"""Evidence that the method works: on the embedded task, at the same FLOPs budget and the same
fine-tuning budget, NViT's global Hessian pruning (both granularities) against uniform pruning (the
same keep ratio in every block, units chosen by weight magnitude) and global magnitude pruning.

    python scripts/compare_methods.py --out runs/compare [--target 0.4] [extra nvit.prune flags]

Writes <out>/<method>/ (a full nvit.prune run each) and <out>/table.md + table.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvit.prune import RunError, resolve_settings, run
from nvit.io import atomic_write_json, atomic_write_text

METHODS = {
    "hessian-aligned": ["--granularity", "aligned"],
    "hessian-per-head": ["--granularity", "per-head"],
    "uniform-magnitude": ["--granularity", "aligned", "--allocation", "uniform", "--criterion", "magnitude"],
    "global-magnitude": ["--granularity", "aligned", "--criterion", "magnitude"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="0.4", help="FLOPs fraction (default 0.4: 2.5× fewer FLOPs)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out)
    rows = []
    for name in args.methods.split(","):
        if name not in METHODS:
            ap.error(f"unknown method {name!r}")
        d = out / name
        if (d / "report.json").is_file():
            report = json.loads((d / "report.json").read_text())  # done in an earlier call: reuse
        else:
            try:
                s = resolve_settings(["--out", str(d), "--target-metric", "flops", "--target", args.target,
                                      *METHODS[name], *extra])
                report = run(s)
            except RunError as e:
                print(f"{name}: error: {e}", file=sys.stderr)
                return 2
        rows.append({"method": name, "dense_top1": report["dense"]["top1"], "top1": report["pruned"]["top1"],
                     "flops_reduction": report["ratios"]["flops"], "params_reduction": report["ratios"]["params"],
                     "speedup": report["ratios"]["speedup"], "prune_s": report["timings"].get("prune_s"),
                     "finetune_s": report["timings"].get("finetune_s")})
    lines = ["| method | top-1 | Δ vs dense | FLOPs ↓ | params ↓ | measured speedup |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['top1']:.2f} | {r['top1'] - r['dense_top1']:+.2f} | "
                     f"{r['flops_reduction']:.2f}× | {r['params_reduction']:.2f}× | {r['speedup']:.2f}× |")
    lines.append(f"\nDense top-1: {rows[0]['dense_top1']:.2f}. Same FLOPs target ({args.target}), same schedule "
                 f"and distillation for every method; extra flags: {' '.join(extra) or 'none'}.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "table.json", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evidence that the method works: on the embedded task, at the same FLOPs budget and the same
fine-tuning budget, NViT's global Hessian pruning (both granularities, iterative and one-shot, with
and without whole-branch removal) against uniform pruning (the same keep ratio in every block, units
chosen by weight magnitude) and global magnitude pruning -- over several seeds, with top-1 right
after pruning (before any training of the pruned model: it separates criteria far more clearly than
fine-tuned accuracy on a small task) and after fine-tuning, as mean ± standard deviation.

    python scripts/compare_methods.py --out runs/compare [--target 0.4] [--seeds 0,1,2] [extra nvit.prune flags]

The whole Fashion-MNIST test split (10 000 images) instead of the shipped 1 500:

    apt-get install dataset-fashion-mnist
    python scripts/make_fashion_subset.py --test-per-class 1000 --out runs/fmnist-fulltest.npz
    python scripts/compare_methods.py --out runs/compare --embedded-data runs/fmnist-fulltest.npz

Writes <out>/<method>/seed<k>/ (a full nvit.prune run each; finished runs are reused) and
<out>/table.md + table.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from nvit.io import atomic_write_json, atomic_write_text
from nvit.prune import RunError, resolve_settings, run

METHODS = {
    "hessian-aligned": ["--granularity", "aligned"],
    "hessian-per-head": ["--granularity", "per-head"],
    "hessian-one-shot": ["--granularity", "aligned", "--one-shot"],
    "hessian-branches": ["--granularity", "aligned", "--prune-branches"],
    "global-magnitude": ["--granularity", "aligned", "--criterion", "magnitude"],
    "uniform-magnitude": ["--granularity", "aligned", "--allocation", "uniform", "--criterion", "magnitude"],
}


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="0.4", help="FLOPs fraction (default 0.4: 2.5× fewer FLOPs)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data order and augmentation)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}")
    runs: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            d = out / name / f"seed{seed}"
            if (d / "report.json").is_file():
                report = json.loads((d / "report.json").read_text())  # done in an earlier call: reuse
            else:
                try:
                    s = resolve_settings(["--out", str(d), "--target-metric", "flops", "--target", args.target,
                                          "--seed", str(seed), "--no-progress", *METHODS[name], *extra])
                    report = run(s)
                except RunError as e:
                    print(f"{name} seed {seed}: error: {e}", file=sys.stderr)
                    return 2
            runs.setdefault(name, []).append(report)
    rows = []
    for name, reports in runs.items():
        rows.append({
            "method": name, "seeds": seeds, "dense_top1": reports[0]["dense"]["top1"],
            "top1_after_pruning": [r["pruned"]["top1_before_finetune"] for r in reports],
            "top1": [r["pruned"]["top1"] for r in reports],
            "flops_reduction": statistics.mean(r["ratios"]["flops"] for r in reports),
            "speedup": statistics.mean(r["ratios"]["speedup"] for r in reports),
            "n_test": reports[0]["data"].get("n_test")})
    lines = ["| method | top-1 right after pruning | top-1 after fine-tuning | Δ vs dense | FLOPs ↓ | measured speedup |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_stat(r['top1_after_pruning'])} | {_stat(r['top1'])} | "
                     f"{statistics.mean(r['top1']) - r['dense_top1']:+.2f} | {r['flops_reduction']:.2f}× | "
                     f"{r['speedup']:.2f}× |")
    lines.append(f"\nDense top-1: {rows[0]['dense_top1']:.2f} on {rows[0]['n_test']} test images. Mean ± standard "
                 f"deviation over seeds {', '.join(map(str, seeds))} (data order and augmentation). Same FLOPs "
                 f"target ({args.target}), schedule and distillation for every method; extra flags: "
                 f"{' '.join(extra) or 'none'}.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "table.json", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

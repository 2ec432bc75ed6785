"""Are the structure kinds comparable in one pool? Predicted vs measured loss increase per unit of cost.

NViT ranks heads, QK dims, V dims, MLP channels, embedding channels (and whole branches) together by
I_S / ΔC_S, where I_S = (dL/dm_S)² is the squared gate derivative. Under the usual Fisher
approximation removing S raises the loss by about ½·I_S with I_S the per-sample squared gate
derivative averaged over samples (the gradient term averages out near a minimum), so one pool is
fair only if measured/predicted is similar for every kind. This script measures it: it accumulates
the saliency per sample (batch 1) on calibration images of the embedded task, then for each kind
removes that kind's lowest-ranked units in small cumulative steps (alone, from the dense model) and
measures the real loss increase on the test split, next to the predicted ½·ΣI. (Training uses
mini-batch saliency, which is this per-sample one scaled by about 1/batch for every kind alike.)

    python scripts/calibrate_saliency.py [--samples 512] [--steps 3] [--frac 0.02] [--branches]

Prints one table (per kind and step: FLOPs removed, predicted and measured ΔL, their ratio, measured ΔL
per 1 % of FLOPs) and writes it as JSON with --out.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nvit.cost import count_flops
from nvit.datasets import load_embedded
from nvit.pruner import Pruner, Target, _Group
from nvit.tiny_model import create_embedded_model
from nvit.spec import KIND_NAMES


def mean_loss(model, x, y, batch=250) -> float:
    model.eval()
    with torch.no_grad():
        return float(sum(F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum")
                         for i in range(0, len(y), batch)) / len(y))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512, help="calibration images (one backward each)")
    ap.add_argument("--steps", type=int, default=3, help="cumulative removal steps per kind")
    ap.add_argument("--frac", type=float, default=0.02, help="FLOPs removed per step, as a fraction of dense")
    ap.add_argument("--branches", action="store_true", help="include whole attention / MLP branches")
    ap.add_argument("--granularity", default="per-head", choices=("aligned", "per-head"))
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    dense = create_embedded_model(pretrained=True)
    train, test = load_embedded("train"), load_embedded("test")
    xt, yt = test.tensors
    base = mean_loss(dense, xt, yt)

    model = copy.deepcopy(dense)
    pruner = Pruner(model, Target("flops", 0.1), granularity=args.granularity, branches=args.branches)
    g = torch.Generator().manual_seed(0)
    model.eval()  # the saliency of the trained model as it is (no dropout in it anyway)
    for _ in range(args.samples):
        idx = torch.randint(0, len(train), (1,), generator=g)
        x, y = train.tensors[0][idx], train.tensors[1][idx]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()
    sal = pruner.step_scores().clone()  # per-sample (Σ w·g)² per unit, averaged over the samples
    dc, _ = pruner._rank_terms()         # FLOPs saved per unit, fraction of dense
    U, dense_flops = pruner.units, count_flops(pruner.dense_config)
    rank = sal / dc.clamp_min(1e-12)
    full = pruner.masks.clone()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for k, name in enumerate(KIND_NAMES):
        units = (U.kind == k).nonzero().flatten()
        if units.numel() == 0:
            continue
        order = units[torch.argsort(rank[units])]
        model.load_state_dict(weights)  # each kind alone, from the dense weights
        pruner.set_masks(full)
        removed, acc_pred = [], 0.0
        i = 0
        for step in range(1, args.steps + 1):
            goal = step * args.frac
            while i < len(order) and (1 - count_flops(pruner.config()) / dense_flops) < goal:
                u = int(order[i])
                i += 1
                unit = _Group([u], k, int(U.block[u]), int(U.head[u]))
                if not pruner._allowed(unit):  # the pruner's guards (last head, dim, channel …)
                    continue
                pruner._remove(u)
                removed.append(u)
                acc_pred += 0.5 * float(sal[u])
            if not removed or (rows and rows[-1]["kind"] == name and rows[-1]["units"] == len(removed)):
                break  # nothing new this step (a kind with few, large units)
            pruner.set_masks(pruner.masks)
            flops_cut = 1 - count_flops(pruner.config()) / dense_flops
            measured = mean_loss(model, xt, yt) - base
            rows.append({"kind": name, "step": step, "units": len(removed), "flops_removed": round(flops_cut, 4),
                         "predicted_dloss": acc_pred, "measured_dloss": measured,
                         "measured_over_predicted": measured / acc_pred if acc_pred > 0 else float("nan"),
                         "measured_dloss_per_1pct_flops": measured / (100 * flops_cut)})
            if i >= len(order):
                break
    model.load_state_dict(weights)
    pruner.set_masks(full)

    print(f"dense test loss {base:.4f} ({len(yt)} images); per-sample saliency from {args.samples} images; "
          f"granularity {args.granularity}")
    print(f"{'kind':12s}{'step':>5s}{'units':>7s}{'FLOPs cut':>11s}{'pred ΔL':>11s}{'meas ΔL':>11s}"
          f"{'meas/pred':>11s}{'ΔL per 1%':>11s}")
    for r in rows:
        print(f"{r['kind']:12s}{r['step']:>5d}{r['units']:>7d}{r['flops_removed']:>11.3f}{r['predicted_dloss']:>11.4f}"
              f"{r['measured_dloss']:>11.4f}{r['measured_over_predicted']:>11.2f}{r['measured_dloss_per_1pct_flops']:>11.4f}")
    first = {r["kind"]: r for r in rows if r["step"] == 1}
    by_pred = sorted(first, key=lambda k: first[k]["predicted_dloss"] / first[k]["flops_removed"])
    by_meas = sorted(first, key=lambda k: first[k]["measured_dloss"] / first[k]["flops_removed"])
    print("kinds, cheapest first (ΔL per FLOP, first step):")
    print("  predicted: " + " < ".join(by_pred))
    print("  measured:  " + " < ".join(by_meas))
    ratios = {}
    for r in rows:
        ratios.setdefault(r["kind"], []).append(r["measured_over_predicted"])
    spread = {k: sum(v) / len(v) for k, v in ratios.items()}
    print("mean measured/predicted per kind: " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items())
          + f"  (max/min {max(spread.values()) / min(spread.values()):.1f}×: 1× = perfectly comparable kinds)")
    if args.out:
        from nvit.io import atomic_write_json

        atomic_write_json(args.out, {"dense_loss": base, "rows": rows, "args": vars(args) | {"out": str(args.out)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

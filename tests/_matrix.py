"""The CLI's covering test matrix: the axes users combine, the combinations refused by design, the
cells a pairwise covering array picks, and how one cell runs and checks its promises.

One table (AXES) declares every axis of `python -m nvit.prune` that the matrix covers; `cells()` picks
the cells so that every pair of values of any two axes is in at least one cell (allpairspy), skipping
the pairs that cannot meet (IMPOSSIBLE: e.g. an interruption "between targets" needs several targets);
`cells(full=True)` is the whole product (the slow-marked run on request). REFUSED declares the
combinations nvit refuses by design: such a cell must exit 2 with its message before any work.

Each cell runs a tiny model (2 blocks, 16–32 wide) for a few iterations and checks the run's promises:
exit 0, every target met within its tolerance (the report's own checks, and counted again here),
every saved model reloads and computes the reported model's outputs, and -- for an interrupted cell --
the run killed at the cell's interruption point (`--kill-at`, as kill -9 would) and resumed ends with
weights bit-identical to the uninterrupted run's. Two ranks run under torchrun (gloo); the ranks'
masks and weights are compared by the run itself (exit 3 if they differ).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from itertools import product
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AXES = OrderedDict(
    family=["vit-droppath", "deit-distilled", "eva", "swin"],
    interrupt=["none", "prune", "between-targets", "finetune", "report"],
    metric=["latency", "flops", "params"],
    precision=["none", "bf16", "fp16"],
    world=[1, 2],
    mode=["iterative", "one-shot"],
    targets=["one", "several"],
    granularity=["aligned", "per-head"],
    branches=[False, True],
    round_to=[None, 4],
    drop_path=[None, 0.2],
    data=["embedded", "folder"],
)
# The cheapest value of an axis: after the covering array is drawn, a cell takes it wherever every pair
# its other value covered is covered by another cell too (fewer torchrun launches and resumes).
CHEAP = {"world": 1, "interrupt": "none", "precision": "none", "mode": "one-shot", "targets": "one"}

# several: two close ones, then a far one. A tiny model's measured latency is mostly fixed costs, so its
# latency targets are higher (on a loaded machine the smallest model the guards allow measures up to ~0.8).
TARGETS = {"one": (0.6,), "several": (0.8, 0.7995, 0.6)}
LATENCY_TARGETS = {"one": (0.9,), "several": (0.95, 0.9495, 0.9)}


def targets(c: dict) -> tuple[float, ...]:
    return (LATENCY_TARGETS if c["metric"] == "latency" else TARGETS)[c["targets"]]

# Combinations refused by design: (predicate, the message the run must stop with, exit 2, before any work).
REFUSED = [
    (lambda c: c["metric"] == "latency" and c["family"] in ("eva", "swin"), "the latency table measures ViT blocks"),
]

# Pairs that cannot meet in one cell (not refusals: the combination has no meaning).
IMPOSSIBLE = [
    lambda c: c.get("interrupt") == "between-targets" and c.get("targets") == "one",
]

# Where each interruption point kills the run (--kill-at): after the 2nd training iteration (one-shot:
# after its 1st step), right after the first earlier target's snapshot, after the 1st fine-tuning
# iteration, after the models are saved and before report.json is written.
KILL_AT = {"prune": {"iterative": "prune:2", "one-shot": "prune:1"}, "between-targets": "snapshot",
           "finetune": "finetune:1", "report": "report"}


def _possible(values: list) -> bool:
    c = dict(zip(AXES, values))
    return not any(rule(c) for rule in IMPOSSIBLE)


def cells(full: bool = False) -> list[dict]:
    """The cells to run: pairwise covering (default) or the whole product, each a dict axis → value."""
    if full:
        chosen = [dict(zip(AXES, v)) for v in product(*AXES.values()) if _possible(list(v))]
    else:
        from allpairspy import AllPairs

        drawn = [dict(zip(AXES, v)) for v in AllPairs(list(AXES.values()), filter_func=_possible)]
        chosen = cheapened(completed(drawn))
    return chosen


def uncovered(chosen: list[dict]) -> list[tuple]:
    """The pairs (axis a, value, axis b, value) no cell of `chosen` holds, impossible ones aside."""
    from itertools import combinations

    out = []
    for a, b in combinations(AXES, 2):
        for va, vb in product(AXES[a], AXES[b]):
            if not any(rule({a: va, b: vb}) for rule in IMPOSSIBLE) and \
                    not any(c[a] == va and c[b] == vb for c in chosen):
                out.append((a, va, b, vb))
    return out


def completed(chosen: list[dict]) -> list[dict]:
    """`chosen` plus a cell for each pair it misses (allpairspy's constraint handling can leave some):
    the pair, and the cheapest value of every other axis."""
    for a, va, b, vb in uncovered(chosen):
        if any(c[a] == va and c[b] == vb for c in chosen):
            continue  # an added cell covered it
        cell = {k: CHEAP.get(k, vs[0]) for k, vs in AXES.items()} | {a: va, b: vb}
        for k, vs in AXES.items():  # make it possible, changing the other axes only
            for v in vs:
                if _possible(list(cell.values())) or k in (a, b):
                    break
                cell[k] = v
        chosen.append(cell)
    return chosen


def cheapened(chosen: list[dict]) -> list[dict]:
    """`chosen` with CHEAP values put in wherever coverage of every pair survives the change."""
    for axis, cheap in CHEAP.items():
        for c in chosen:
            trial = {**c, axis: cheap}
            if c[axis] == cheap or not _possible(list(trial.values())):
                continue
            others = [o for o in AXES if o != axis]
            if all(any(d is not c and d[axis] == c[axis] and d[o] == c[o] for d in chosen) for o in others):
                c[axis] = cheap
    return chosen


def cell_id(c: dict) -> str:
    return "-".join(f"{v}" if not isinstance(v, bool) else (k if v else f"no{k}") for k, v in c.items())


def refusal(c: dict) -> str | None:
    return next((msg for rule, msg in REFUSED if rule(c)), None)


# ------------------------------------------------------------------------------------------------
# Inputs: a tiny model of the family as a timm local-dir folder, and the data
# ------------------------------------------------------------------------------------------------
def family_model(family: str, data: str) -> tuple[str, dict]:
    """(timm architecture, model_args) of a tiny model of `family` for `data` (embedded: 1×28×28, 10
    classes; folder: 3×32×32, 3 classes)."""
    gray = data == "embedded"
    img, chans, classes = (28, 1, 10) if gray else (32, 3, 3)
    common = dict(img_size=img, in_chans=chans, num_classes=classes)
    if family == "vit-droppath":  # drop-path and dropout on: the stochastic layers a resume must replay
        return "vit_tiny_patch16_224", dict(common, patch_size=7 if gray else 8, embed_dim=16, depth=2, num_heads=2,
                                            mlp_ratio=2.0, drop_path_rate=0.1, proj_drop_rate=0.1)
    if family == "deit-distilled":
        return "deit_tiny_distilled_patch16_224", dict(common, patch_size=7 if gray else 8, embed_dim=16, depth=2,
                                                       num_heads=2, mlp_ratio=2.0)
    if family == "eva":
        return "eva02_tiny_patch14_224", dict(common, patch_size=7 if gray else 8, embed_dim=32, depth=2,
                                              num_heads=2, mlp_ratio=2.0)
    if family == "swin":  # two stages; timm's default drop_path_rate for Swin is 0.1
        return "swin_tiny_patch4_window7_224", dict(common, patch_size=2 if gray else 4, window_size=7 if gray else 4,
                                                    embed_dim=8, depths=(2, 2), num_heads=(1, 2), mlp_ratio=2.0)
    raise ValueError(family)


def local_dir(root: Path, family: str, data: str) -> Path:
    """The family's tiny model in timm's hub layout (config.json + model.safetensors), random weights."""
    import timm

    folder = root / f"{family}-{data}"
    if (folder / "config.json").is_file():
        return folder
    arch, args = family_model(family, data)
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **args)
    folder.mkdir(parents=True)
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    gray = data == "embedded"
    pre = {"input_size": [args["in_chans"], args["img_size"], args["img_size"]], "crop_pct": 1.0,
           "interpolation": "bilinear", "num_classes": args["num_classes"],
           **({"mean": [0.2857], "std": [0.3521]} if gray else {})}
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": args["num_classes"],
                                                    "model_args": args, "pretrained_cfg": pre}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def image_folder(root: Path) -> Path:
    """train/ and val/ of random 32-px RGB PNGs, 3 classes (made once per root)."""
    from test_prune_cli import _image_folder

    folder = root / "images"
    return folder if folder.is_dir() else _image_folder(folder, size=32, classes=3, train=11)


# ------------------------------------------------------------------------------------------------
# Running a cell
# ------------------------------------------------------------------------------------------------
SIZES = ["--train-limit", "32", "--eval-limit", "12", "--batch-size", "8", "--prune-epochs", "1",
         "--finetune-epochs", "0.5", "--prune-every", "1", "--checkpoint-every", "1", "--latency-batch", "32",
         "--latency-points", "2", "--calibration-batches", "1", "--one-shot-steps", "2", "--no-progress"]


def arguments(c: dict, root: Path, out: Path) -> list[str]:
    """The command line of cell `c` (without the interruption)."""
    args = ["--model", f"local-dir:{local_dir(root, c['family'], c['data'])}", "--out", str(out), *SIZES,
            "--target-metric", c["metric"], "--target", ",".join(f"{t:g}" for t in targets(c)),
            "--amp", c["precision"], "--granularity", c["granularity"]]
    if c["data"] == "folder":
        args += ["--data", str(image_folder(root)), "--workers", "1"]
    if c["mode"] == "one-shot":
        args += ["--one-shot"]
    if c["branches"]:
        args += ["--prune-branches"]
    if c["round_to"]:
        args += ["--round-to", str(c["round_to"])]
    if c["drop_path"] is not None:
        args += ["--drop-path", str(c["drop_path"])]
    if c["world"] > 1:
        args += ["--threads", "1"]
    return args


def kill_flag(c: dict) -> list[str]:
    point = KILL_AT.get(c["interrupt"])
    if point is None:
        return []
    return ["--kill-at", point[c["mode"]] if isinstance(point, dict) else point]


def run(args: list[str], world: int, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m nvit.prune ARGS` (world 1) or the same under torchrun with `world` ranks on gloo."""
    if world == 1:
        cmd = [sys.executable, "-m", "nvit.prune", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "nvit.prune", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def model_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved model's weights: model folder name → state dict."""
    return {d.name: load_file(str(d / "model.safetensors")) for d in sorted(out.glob("model*")) if d.is_dir()}


def check_report(out: Path, c: dict) -> dict:
    """The promises a finished run makes, counted again from its files."""
    import nvit

    report = json.loads((out / "report.json").read_text())
    assert [m["target"] for m in report["models"]] == list(targets(c))
    assert all(v["ok"] for v in report["checks"].values()), report["checks"]
    for m in report["models"]:
        a = m["achieved"]
        assert a["metric"] == c["metric"] and a["fraction"] <= m["target"] + 1e-9, a
        assert a["fraction"] >= m["target"] - a["tolerance"] - 1e-9, a
        back = nvit.load(out / m["folder"])
        assert nvit.io.count("params", back.config) == m["params"]
        assert nvit.io.count("flops", back.config) == m["flops"]
    assert report["processes"]["world_size"] == c["world"]
    assert report["precision"]["amp"] == c["precision"]
    assert report["units_per_step"] is not None or c["mode"] == "one-shot"
    if c["metric"] == "latency":
        assert report["latency_table_check"], "a latency run reports its table's check"
    return report

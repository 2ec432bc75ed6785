"""pytest collects bench/bench_*.py as test modules (`pytest bench/ --benchmark-only`), the benchmarks
can `import roofline` from this folder, and the run ends with a table of each benchmark's claim and
figure (the ratios in extra_info), so the conclusions are on the terminal, not only microseconds.

A benchmark that passes without reporting any claim's figure (a finite number under one of CLAIMS'
keys) fails: its ratio logic did not run. Quick mode (quickmode.py, what CI runs):
`NVIT_BENCH_QUICK=1 pytest bench/ --benchmark-disable`, which prints a count instead of the table."""
from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from quickmode import QUICK  # noqa: E402  (this folder is on sys.path from here on)


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# The figure each benchmark reports, the claim it tests and its target: (extra_info key, claim, target).
CLAIMS = (
    ("fraction_of_roofline", "saliency pass: fraction of the copy roofline", ">= 0.70"),
    ("speedup_vs_eager", "saliency pass: speedup vs eager PyTorch", "> 1"),
    ("speedup_vs_padded", "uneven attention: speedup vs padding + SDPA", "> 1"),
    ("time_vs_flop_prop_sdpa_only", "uneven attention: time / FLOP-proportional SDPA time", "<= 1.2"),
    ("speedup_vs_dense_swin", "window attention: speedup vs the dense Swin block (SDPA + bias/mask)", "> 1"),
    ("speedup_vs_flops", "converted NViT: speedup / FLOPs reduction", ">= 0.85"),
    ("ort_speedup_vs_flops", "ONNX Runtime: NViT speedup / FLOPs reduction (uneven)", ">= 0.9"),
    ("ort_padded_speedup_vs_flops", "ONNX Runtime: NViT speedup / FLOPs reduction (pad 8)", ">= 0.9"),
    ("prune_overhead", "prune step: extra time vs a plain timm training step", "<= 0.03"),
    ("prune_step_ms", "Pruner.prune_step on DeiT-B's units, ms", "<= 50"),
    ("images_per_s", "data path: training images/s", "grows with workers"),
    ("speedup_vs_0_workers", "data path: speedup of workers over 0", "> 1"),
)


def pytest_report_header(config):
    if QUICK:
        return ("nvit bench: QUICK mode (NVIT_BENCH_QUICK): shrunk models and batches, one round -- not the claims' "
                "figures")
    return None


# (test name, extra_info) of every benchmark that passed, in run order. Read from the fixture itself rather
# than pytest-benchmark's session, which keeps nothing under --benchmark-disable.
_REPORTED: list[tuple[str, dict]] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a failed or skipped benchmark raises here: nothing to check
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None:
        info = dict(getattr(bench, "extra_info", {}) or {})
        figures = [info[k] for k, _, _ in CLAIMS if k in info]
        if not any(isinstance(v, (int, float)) and math.isfinite(v) for v in figures):
            raise AssertionError(f"nvit bench: {item.name} reported no finite claim figure "
                                 f"(extra_info keys: {sorted(info)})")
        _REPORTED.append((item.name, info))
    return result


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if QUICK:  # figures of shrunk models against the full sizes' targets would only mislead
        if _REPORTED:
            terminalreporter.write_sep("=", f"nvit: {len(_REPORTED)} benchmarks ran and reported their claims' "
                                            "figures (QUICK mode: not comparable to the targets)")
        return
    rows = []
    for name, info in _REPORTED:
        for key, claim, target in CLAIMS:
            if key in info:
                v = info[key]
                rows.append((name, claim, f"{v:.3f}" if isinstance(v, float) else str(v), target))
    if not rows:
        return
    w = [max(len(r[i]) for r in rows + [("benchmark", "claim", "figure", "target")]) for i in range(4)]
    tr = terminalreporter
    tr.write_sep("=", "nvit: claims and figures")
    tr.write_line("  ".join(h.ljust(w[i]) for i, h in enumerate(("benchmark", "claim", "figure", "target"))))
    for r in rows:
        tr.write_line("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))

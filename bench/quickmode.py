"""Quick mode: every benchmark once, at shrunk sizes, so CI can run the whole folder in a few minutes.

    NVIT_BENCH_QUICK=1 pytest bench/ --benchmark-disable

Each benchmark runs the same code as in a full run (model building, synthetic masks, conversion, every
backend and baseline, the ratios in extra_info and the checks), on smaller models and batches with one
timing round; --benchmark-disable makes pytest-benchmark call the timed function once instead of
calibrating. The figures of such a run are not the claims' figures (README): only the full
``pytest bench/ --benchmark-only`` measures those.
"""
from __future__ import annotations

import os

QUICK = os.environ.get("NVIT_BENCH_QUICK", "").strip() not in ("", "0")


def pick(full, quick):
    """`full` normally, `quick` in quick mode."""
    return quick if QUICK else full

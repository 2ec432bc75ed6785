"""Fault injection: a run killed with SIGKILL at a random moment of each phase -- while it prunes, while
it fine-tunes, while it writes its report -- or ended as abruptly while its latency table is measured
(`--kill-at latency`: a tiny model's table takes a fraction of a second, too short to aim a signal at),
and resumed ends with the weights of the uninterrupted run, bit for bit. (Failed writes and damaged checkpoints:
test_combinations.py; kills at fixed points in every combination: test_cli_matrix.py.)"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from nvit.prune import main

pytestmark = pytest.mark.slow

ARGS = ["--train-limit", "48", "--eval-limit", "40", "--batch-size", "8", "--prune-epochs", "1",
        "--finetune-epochs", "3", "--prune-every", "2", "--checkpoint-every", "2", "--target-metric", "latency",
        "--target", "0.9", "--latency-points", "2", "--latency-batch", "32", "--no-progress", "--threads", "1"]

# phase → (the line after which the kill comes, the longest random delay after it, in seconds; or the
# --kill-at point)
PHASES = {
    "latency table": "latency",
    "pruning": ("prune step 1 ", 0.5),
    "fine-tuning": ("pruned (masked)", 1.0),
    "report": ("fine-tuned NViT model", 0.5),
}
SEED = int(os.environ.get("NVIT_FAULT_SEED", "0"))


def _weights(out):
    return {d.name: load_file(str(d / "model.safetensors")) for d in sorted(out.glob("model*")) if d.is_dir()}


def _killed_run(args: list[str], marker: str | None, delay: float, env: dict) -> tuple[str, int]:
    """Start the run, SIGKILL it `delay` s after it prints a line starting with `marker` (None: it ends
    itself, --kill-at); (the output it printed, its exit status)."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "nvit.prune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    seen = []
    timer = None
    for line in proc.stdout:
        seen.append(line)
        if timer is None and marker is not None and line.startswith(marker):
            timer = threading.Timer(delay, lambda: proc.send_signal(signal.SIGKILL))
            timer.start()
    rc = proc.wait(timeout=600)
    if timer is not None:
        timer.cancel()
    return "".join(seen), rc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One latency cache for every run here: the killed runs measure (or load) the uninterrupted run's table."""
    d = tmp_path_factory.mktemp("latency-cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("NVIT_CACHE_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def uninterrupted(tiny_nvit, tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("faults") / "full"
    assert main(["--nvit-model", str(tiny_nvit), "--out", str(out), *ARGS]) == 0
    return _weights(out)


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_then_resume_gives_the_same_weights(phase, tiny_nvit, tmp_path, uninterrupted, cache):
    how = PHASES[phase]
    marker, longest = (None, 0.0) if isinstance(how, str) else how
    delay = random.Random(f"{SEED}-{phase}").uniform(0.0, longest)
    out = tmp_path / "run"
    # Killed while measuring, a run has saved no table, and its resume takes the table any new run would
    # take (here the cached one of the uninterrupted run); so that the killed run measures at all, its own
    # cache is empty.
    env = {"NVIT_CACHE_DIR": str(tmp_path / "own-cache")} if phase == "latency table" else {}
    kill_at = ["--kill-at", how] if isinstance(how, str) else []
    text, rc = _killed_run(["--nvit-model", str(tiny_nvit), "--out", str(out), *ARGS, *kill_at], marker, delay, env)
    where = (f"killed {delay:.2f} s after {marker!r} (NVIT_FAULT_SEED={SEED})" if marker else f"--kill-at {how}") + \
        f"; last output: {text[-600:]}"
    if rc == 0:  # the run finished before the kill landed (a fast machine): nothing to recover
        pytest.skip(f"the run ended before the kill: {where}")
    assert rc == (137 if kill_at else -signal.SIGKILL), where
    if phase == "latency table":
        assert not (out / "latency_table.json").exists(), f"the kill came after the table was measured; {where}"
    assert main(["--resume", str(out), "--no-progress", "--threads", "1"]) == 0, where
    got = _weights(out)
    assert got.keys() == uninterrupted.keys(), where
    for name in got:
        differ = [k for k in got[name] if not torch.equal(got[name][k], uninterrupted[name][k])]
        assert not differ, f"{name}: {differ[:5]} differ; {where}"

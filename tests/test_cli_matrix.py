"""The CLI's covering test matrix (tests/_matrix.py declares it): every pair of values of any two axes --
world size × precision × metric × mode × targets × family × granularity × branches × --round-to × data ×
interruption -- runs in at least one cell, and each cell checks the run's promises (see _matrix.py).

The whole product (tens of thousands of cells) runs on request: NVIT_MATRIX=full pytest -m slow
tests/test_cli_matrix.py (a cell takes seconds; select with -k)."""
from __future__ import annotations

import os

import pytest
import torch

import _matrix as mx
from nvit.prune import main

pytestmark = pytest.mark.matrix


@pytest.fixture(scope="module")
def root(tmp_path_factory, monkeypatch_module):
    """Models, images and the latency cache the cells share (one table per setting, so the uninterrupted
    and the killed run of a cell rank by the same measured table)."""
    d = tmp_path_factory.mktemp("matrix")
    monkeypatch_module.setenv("NVIT_CACHE_DIR", str(d / "cache"))
    return d


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def launch(args: list[str], world: int) -> int:
    """A run that is not killed: in this process (one rank, no start-up cost) or under torchrun."""
    if world == 1:
        return main(args)
    r = mx.run(args, world)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return 0


def check_cell(c: dict, root, tmp_path) -> None:
    full = tmp_path / "full"
    args = mx.arguments(c, root, full) + ["--threads", "1"]
    why = mx.refusal(c)
    if why:  # refused by design: exit 2 with the reason, before any data is read or anything measured
        r = mx.run(args, c["world"])
        assert r.returncode != 0 and why in r.stderr, r.stderr[-2000:]
        if c["world"] == 1:
            assert r.returncode == 2
        assert not (full / "checkpoint.pt").exists() and not (full / "latency_table.json").exists()
        return
    assert launch(args, c["world"]) == 0
    mx.check_report(full, c)
    if c["interrupt"] == "none":
        return
    part = tmp_path / "part"
    killed = mx.run(mx.arguments(c, root, part) + ["--threads", "1"] + mx.kill_flag(c), c["world"])
    assert killed.returncode != 0, "the run was to be killed at " + " ".join(mx.kill_flag(c))
    assert not (part / "report.json").exists()
    assert launch(["--resume", str(part), "--no-progress", "--threads", "1"], c["world"]) == 0
    mx.check_report(part, c)
    a, b = mx.model_weights(full), mx.model_weights(part)
    assert a.keys() == b.keys() and a
    for name in a:  # bit for bit: the resumed run trained exactly what the uninterrupted one trained
        assert a[name].keys() == b[name].keys()
        differ = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not differ, f"{name}: resumed weights differ in {differ[:5]}"


@pytest.mark.parametrize("c", mx.cells(), ids=mx.cell_id)
def test_cell(c, root, tmp_path):
    check_cell(c, root, tmp_path)


FULL = os.environ.get("NVIT_MATRIX") == "full"


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="the whole product runs on request: NVIT_MATRIX=full")
@pytest.mark.parametrize("c", mx.cells(full=True) if FULL else [], ids=mx.cell_id)
def test_full_product_cell(c, root, tmp_path):
    check_cell(c, root, tmp_path)


def test_matrix_covers_every_pair():
    """The generator's promise: every pair of values of two axes meets in a cell (impossible pairs aside)."""
    assert not mx.uncovered(mx.cells())

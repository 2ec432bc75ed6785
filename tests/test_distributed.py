"""Several processes (torchrun, gloo on CPU): the ranks agree, and a 2-rank run is the 1-rank run.

Each case launches `python -m torch.distributed.run --standalone --nproc-per-node 2 -m nvit.prune`
on a tiny saved NViT model and a few dozen embedded images (tens of seconds on 2 cores)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nvit import engine
from nvit.prune import main

pytestmark = pytest.mark.slow
# Per-rank batch 4 (global 8); the tiny model, few iterations, one thread per rank.
SMALL = ["--train-limit", "48", "--eval-limit", "40", "--batch-size", "8", "--prune-epochs", "1",
         "--finetune-epochs", "1", "--prune-every", "2", "--latency-batch", "2", "--no-progress",
         "--checkpoint-every", "2", "--threads", "1", "--target", "0.5", "--target-metric", "flops", "--granularity", "per-head"]


def _torchrun(args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "nvit.prune", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _masks(out):
    return load_file(str(out / "masks.safetensors"))


@pytest.fixture(scope="module")
def two_rank_run(tiny_nvit, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = _torchrun(["--nvit-model", tiny_nvit, "--out", out, *SMALL])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_two_ranks_complete_and_agree(two_rank_run):
    out, r = two_rank_run
    rep = json.loads((out / "report.json").read_text())
    assert rep["processes"]["world_size"] == 2 and rep["processes"]["backend"] == "gloo"
    assert rep["pruned"]["flops"] <= 0.5 * rep["dense"]["flops"]
    # Rank 0 alone prints the summary; the ranks' masks and weights were compared after every prune step
    # and after each phase (a disagreement stops the run with exit status 3).
    assert r.stdout.count("nvit.prune — summary") == 1


def test_two_ranks_prune_what_one_rank_prunes(two_rank_run, tiny_nvit, tmp_path):
    """The global batch and every sample's augmentation are the same for 1 rank × 8 and 2 ranks × 4, and
    DDP averages the ranks' gradients, so the saliency and the prune decisions are the same. (The
    averaged gradients differ from the 1-rank ones only in float summation order; on this model that
    never flips a ranking, so the masks are compared exactly.)"""
    out2, _ = two_rank_run
    out1 = tmp_path / "one"
    assert main(list(map(str, ["--nvit-model", tiny_nvit, "--out", out1, *SMALL]))) == 0
    m1, m2 = _masks(out1), _masks(out2)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    r1, r2 = (json.loads((o / "report.json").read_text()) for o in (out1, out2))
    assert r1["architecture"] == r2["architecture"]
    assert r1["dense"]["top1"] == r2["dense"]["top1"]  # the sharded evaluation sums to the same count


def test_resume_under_torchrun_and_world_size_check(two_rank_run, tiny_nvit, tmp_path):
    out = tmp_path / "resumed"
    r = _torchrun(["--nvit-model", tiny_nvit, "--out", out, *SMALL, "--stop-after", "4"])
    assert r.returncode == 0 and (out / "checkpoint.pt").is_file(), r.stderr[-3000:]
    # Another world size is refused, with the reason.
    assert main(["--resume", str(out)]) == 2
    r = _torchrun(["--resume", out])
    assert r.returncode == 0, r.stderr[-3000:]
    m_resumed, m_straight = _masks(out), _masks(two_rank_run[0])
    assert all(torch.equal(m_resumed[k], m_straight[k]) for k in m_straight)


def _disagree(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    p = engine.Processes(rank=rank, world=world)
    masks = {"mlp": torch.ones(8, dtype=torch.bool)}
    engine.check_agreement("masks", masks, p)  # equal: passes
    if rank == 1:
        masks["mlp"][3] = False
    try:
        engine.check_agreement("masks", masks, p)
        results.put((rank, "no error"))
    except engine.RanksDisagree as e:
        results.put((rank, str(e)))
    dist.destroy_process_group()


def test_forced_mask_disagreement_is_caught():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_disagree, args=(r, 2, port, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for pr in procs:
        pr.join(timeout=60)
    assert set(got) == {0, 1}
    assert all("ranks disagree on the masks" in v and "rank(s) [1]" in v for v in got.values()), got

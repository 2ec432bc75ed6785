"""Regression tests of the combination bugs (issue "every promise holds in every combination"): each
failed before its fix. The covering matrix (test_cli_matrix.py) runs the combinations; these pin the
individual causes down."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nvit import engine
from nvit.prune import main
from test_prune_cli import FAST


def _run(args):
    return main(list(map(str, args)))


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- item 1: bf16 + latency: the report's table check timed an fp32 model on a bf16 input ------------
def test_blocks_latency_in_the_tables_dtype_of_an_fp32_model():
    from _vit_factory import tiny_vit
    from nvit.latency import measure_blocks_latency

    m = tiny_vit()  # fp32 master weights, as a mixed-precision run holds them
    t = measure_blocks_latency(m, tokens=17, batch_size=2, dtype=torch.bfloat16, repeats=1)
    assert t > 0 and next(m.parameters()).dtype == torch.float32  # the model itself is left as it was


def test_bf16_latency_run_reports_its_table_check(tiny_nvit, tmp_path, monkeypatch):
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["--nvit-model", tiny_nvit, "--out", out, *FAST, "--amp", "bf16", "--target-metric", "latency",
            "--target", 0.9, "--latency-points", 2, "--latency-batch", 32]
    assert _run(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["latency_table_check"]) == {"dense", "target 0.9"}
    assert r["latency"]["dtype"] == "bfloat16"


# ---- item 3: one prune step passing two targets ended pruning and crashed on the missing snapshot -----
def test_one_step_passing_two_targets_gives_both_models(tiny_nvit, tmp_path):
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--target", "0.6,0.5996,0.4",
                 "--prune-units", 200, "--target-metric", "flops"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert [m["target"] for m in r["models"]] == [0.6, 0.5996, 0.4]
    for m in r["models"]:
        assert m["achieved"]["fraction"] <= m["target"]
        assert (out / m["folder"] / "model.safetensors").is_file()


# ---- item 4: one-shot ended above its target and said nothing -------------------------------------------
def test_one_shot_one_step_meets_its_target(tiny_nvit, tmp_path):
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--one-shot", "--one-shot-steps", 1,
                 "--target-metric", "flops", "--target", 0.4]) == 0
    r = json.loads((out / "report.json").read_text())
    a = r["models"][0]["achieved"]
    assert a["fraction"] <= 0.4 and a["fraction"] >= 0.4 - a["tolerance"]
    assert r["pruned"]["flops"] <= 0.4 * r["dense"]["flops"]


# ---- items 5 and 7: a resumed run measured a new latency table and lost its counters ------------------
def test_resume_keeps_the_latency_table_and_the_counters(tiny_nvit, tmp_path, monkeypatch):
    """Resumed in the fine-tuning phase with another --threads and an empty latency cache: the run ranks,
    stops and reports on the table it started with (no new measurement), and its report has the
    uninterrupted run's counters, table check and weights."""
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--nvit-model", tiny_nvit, *FAST, "--target-metric", "latency", "--target", 0.9,
              "--latency-points", 2, "--latency-batch", 32, "--threads", 1]
    assert _run([*common, "--out", tmp_path / "full"]) == 0
    pruned_at = json.loads((tmp_path / "full" / "report.json").read_text())["timings"]["prune_iterations"]
    part = tmp_path / "part"
    assert _run([*common, "--out", part, "--stop-after", pruned_at + 2]) == 0
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ck["phase"] == "finetune" and ck["book"]["units_per_step"]
    table = (part / "latency_table.json").read_text()
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert _run(["--resume", part, "--no-progress", "--threads", 1]) == 0
    assert not (tmp_path / "empty-cache").exists()  # nothing measured again
    assert (part / "latency_table.json").read_text() == table
    a, b = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "full", part))
    assert b["units_per_step"] == a["units_per_step"] and b["skipped_steps"] == a["skipped_steps"]
    assert set(b["latency_table_check"]) == set(a["latency_table_check"])
    assert b["models"][0]["achieved"] == a["models"][0]["achieved"]
    assert _same_weights(_weights(tmp_path / "full" / "model"), _weights(part / "model"))


# ---- item 6: non-finite gradients -----------------------------------------------------------------------
def test_fp16_one_shot_scales_the_loss_and_retries_an_overflow():
    """One-shot backpropagates without an optimizer: fp16 scales the loss, unscales the gradients, and a
    batch that overflows is retried at half the scale until its gradients are finite (and true)."""
    p = torch.nn.Parameter(torch.ones(4))
    prec = engine.Precision("fp16", torch.device("cpu"))
    tries = 0
    while True:
        tries += 1
        p.grad = None
        loss = (p.half() * 1000.0).float().sum()  # d/dp = 1000; ×65536 overflows fp16's gradient
        if prec.scaled_gradients(loss, [p]):
            break
        assert tries < 30
    assert tries > 1 and torch.equal(p.grad, torch.full((4,), 1000.0))


def test_non_finite_gradients_skip_the_step_and_feed_no_saliency(tiny_nvit, tmp_path, monkeypatch):
    """The first three iterations' gradients are not finite (loss finite): each step is skipped (no
    weight update, no saliency), the first prune step is postponed until a finite one accumulated, and
    the run ends with finite weights and the count in its report. (Before: the non-finite scores ranked
    the units, the optimizer poisoned the weights, or step_scores raised "no saliency accumulated yet".)"""
    from nvit.phases import Run

    step = Run.step

    def poisoned(self, model, raw, opt, x, y, phase, it):
        value = step(self, model, raw, opt, x, y, phase, it)
        if phase == "prune" and it < 3:
            next(p for p in raw.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return value

    monkeypatch.setattr(Run, "step", poisoned)
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--target", 0.5]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in _weights(out / "model").values())


# ---- item 9: a grayscale model's own normalisation ----------------------------------------------------
def test_grayscale_model_keeps_its_recorded_normalisation():
    from timm.models.vision_transformer import VisionTransformer

    from nvit.datasets import EMBEDDED_MEAN, EMBEDDED_STD
    from nvit.inputs import data_config, grayscale_normalisation
    from nvit.settings import DEFAULTS

    m = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=1)
    assert grayscale_normalisation(m) == ((EMBEDDED_MEAN,), (EMBEDDED_STD,))  # ImageNet's RGB stats: not the model's
    m.pretrained_cfg = {"mean": (0.5,), "std": (0.25,)}  # e.g. from a local-dir config.json
    cfg = data_config(dict(DEFAULTS), m)
    assert cfg["mean"] == (0.5,) and cfg["std"] == (0.25,)
    cfg = data_config({**DEFAULTS, "mean": (0.1,), "std": (0.2,)}, m)  # a flag overrides the model
    assert cfg["mean"] == (0.1,) and cfg["std"] == (0.2,)


def test_embedded_data_normalised_as_the_model_records(tiny_nvit):
    import nvit
    from nvit.datasets import load_embedded
    from nvit.inputs import load_data
    from nvit.settings import DEFAULTS

    m = nvit.load(tiny_nvit)
    m.config.data = {**m.config.data, "mean": [0.5], "std": [0.25]}
    _, test, _, desc = load_data({**DEFAULTS, "eval_limit": 4, "train_limit": 4}, m)
    want = load_embedded("test", limit=4, mean=0.5, std=0.25)
    assert torch.equal(test.tensors[0], want.tensors[0])
    assert desc["preprocessing"]["mean"] == [0.5]


# ---- faults: a failed write, a damaged checkpoint --------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one(tiny_nvit, tmp_path, monkeypatch):
    """Disk full while a checkpoint is written: a clear error (exit 2), the previous checkpoint intact,
    and --resume finishes the run with the uninterrupted run's weights."""
    import nvit.io as nvio

    common = ["--nvit-model", tiny_nvit, "--target", 0.5, *FAST, "--threads", 1]
    assert _run([*common, "--out", tmp_path / "full"]) == 0
    part = tmp_path / "part"
    writes = {"n": 0}
    real = nvio.atomic_write

    def disk_full(path, write):
        if str(path).endswith("checkpoint.pt"):
            writes["n"] += 1
            if writes["n"] == 3:
                def partial(tmp):
                    with open(tmp, "wb") as f:
                        f.write(b"\0" * 100)
                    raise OSError(28, "No space left on device")
                return real(path, partial)
        return real(path, write)

    monkeypatch.setattr(nvio, "atomic_write", disk_full)
    monkeypatch.setattr(engine, "atomic_write", disk_full)
    assert _run([*common, "--out", part]) == 2
    ck = torch.load(part / "checkpoint.pt", weights_only=True)  # the 2nd one, whole
    assert ck["iteration"] == 4 and not list(part.glob(".checkpoint.pt.*"))
    monkeypatch.setattr(engine, "atomic_write", real)
    monkeypatch.setattr(nvio, "atomic_write", real)
    assert _run(["--resume", part, "--no-progress", "--threads", 1]) == 0
    assert _same_weights(_weights(tmp_path / "full" / "model"), _weights(part / "model"))


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_damaged_checkpoint_is_a_clear_error(tiny_nvit, tmp_path, capsys, damage):
    part = tmp_path / "part"
    assert _run(["--nvit-model", tiny_nvit, "--target", 0.5, *FAST, "--out", part, "--stop-after", 4]) == 0
    ck = part / "checkpoint.pt"
    if damage == "truncated":
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    else:
        torch.save({"weights": torch.zeros(2)}, ck)
    capsys.readouterr()
    assert _run(["--resume", part, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "Traceback" not in err


# ---- item 2: dropout / drop-path drew from an unsaved global RNG: a resume with workers diverged -------
def test_resume_is_exact_with_drop_path_dropout_and_workers(tmp_path):
    """A timm ViT with drop-path and dropout on an image folder read by a DataLoader worker, interrupted
    in the pruning phase and resumed: the same weights, bit for bit, as the uninterrupted run."""
    import _matrix as mx

    model = mx.local_dir(tmp_path, "vit-droppath", "folder")
    common = ["--model", f"local-dir:{model}", "--data", mx.image_folder(tmp_path), "--workers", 1,
              "--target", 0.6, *FAST, "--threads", 1]
    assert _run([*common, "--out", tmp_path / "full"]) == 0
    part = tmp_path / "part"
    assert _run([*common, "--out", part, "--stop-after", 4]) == 0
    assert torch.load(part / "checkpoint.pt", weights_only=True)["phase"] == "prune"
    assert _run(["--resume", part, "--no-progress", "--threads", 1]) == 0
    assert _same_weights(_weights(tmp_path / "full" / "model"), _weights(part / "model"))


# ---- item 10: converted models lost drop-path; one flag sets it for both phases -------------------------
def test_drop_path_flag_sets_the_students_rate_for_both_phases(tiny_nvit, tmp_path):
    import nvit

    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--target", 0.5, "--drop-path", 0.3]) == 0
    back = nvit.load(out / "model")
    assert back.config.drop_path_rates == pytest.approx([0.0, 0.3])  # timm's linear decay over 2 blocks
    assert json.loads((out / "report.json").read_text())["settings"]["drop_path"] == 0.3

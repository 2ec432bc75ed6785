"""`python -m nvit.prune` end to end on tiny models and a few dozen images (seconds per run)."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nvit
from nvit.prune import main
from nvit.training import evaluate

FAST = ["--train-limit", "48", "--eval-limit", "40", "--batch-size", "8", "--prune-epochs", "1", "--target-metric", "flops",
        "--finetune-epochs", "1", "--prune-every", "2", "--latency-batch", "2", "--no-progress",
        "--checkpoint-every", "2"]


def _run(args):
    return main(list(map(str, args)))


def test_smoke_report_and_saved_model(tiny_nvit, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, "--target", 0.5, "--granularity", "per-head", *FAST]) == 0
    text = capsys.readouterr().out
    assert "summary" in text and "fewer FLOPs" in text
    for f in ("report.json", "model/config.json", "model/model.safetensors", "dims.png", "masks.safetensors",
              "run.json"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint.pt").exists()
    r = json.loads((out / "report.json").read_text())
    for side in ("dense", "pruned"):
        for k in ("params", "flops", "latency_s", "top1"):
            assert isinstance(r[side][k], (int, float)) and math.isfinite(r[side][k]), (side, k)
    assert r["pruned"]["flops"] <= 0.5 * r["dense"]["flops"]
    assert r["latency"]["batch_size"] == 2 and r["latency"]["device"].startswith("cpu")
    assert len(r["architecture"]["blocks"]) == 2 and r["settings"]["granularity"] == "per-head"
    assert r["prune_steps"] and set(r["timings"]) >= {"prune_s", "finetune_s", "total_s"}
    # the saved model reproduces the reported accuracy on the same data
    from nvit.datasets import load_embedded

    model = nvit.load(out / "model")
    assert evaluate(model, load_embedded("test", limit=40)) == pytest.approx(r["pruned"]["top1"])


def _image_folder(root, *, size, classes, train, val=4):
    """train/ and val/ folders of random RGB images, one folder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(d / f"{i}.png")
    return root


def _timm_run(tmp_path, name, *, size, classes, train, flags):
    """A random-init timm model (depth 2) saved as a checkpoint, pruned by the CLI on a random image
    folder; (0 or the exit status, the report or None, the run's folder)."""
    import timm

    root = _image_folder(tmp_path / "data", size=size, classes=classes, train=train)
    model = timm.create_model(name, pretrained=False, img_size=size, num_classes=classes, depth=2)
    ck = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
    out = tmp_path / "run"
    rc = _run(["--model", name, "--checkpoint", ck, "--img-size", size, "--data", root, "--out", out, *FAST, *flags])
    return rc, json.loads((out / "report.json").read_text()) if rc == 0 else None, out


def test_timm_model_on_image_folder(tmp_path):
    rc, r, _ = _timm_run(tmp_path, "vit_tiny_patch16_224", size=32, classes=3, train=12,
                         flags=["--target", 0.6, "--target-metric", "params"])
    assert rc == 0
    assert r["data"]["kind"] == "image-folder" and r["model"]["model"] == "vit_tiny_patch16_224"
    assert r["pruned"]["params"] <= 0.6 * r["dense"]["params"]


def test_eva02_model_end_to_end(tmp_path):
    """EVA-02 (rotary pairs, SwiGLU) through the CLI: pruned, converted, saved and reloaded."""
    rc, r, out = _timm_run(tmp_path, "eva02_tiny_patch14_224", size=28, classes=2, train=8,
                           flags=["--target", 0.6, "--target-metric", "flops", "--granularity", "per-head"])
    assert rc == 0
    assert r["pruned"]["flops"] <= 0.6 * r["dense"]["flops"]
    back = nvit.load(out / "model")
    assert back.config.family == "eva" and back.config.rope_dim == 64


def test_resume_reaches_the_same_masks(tiny_nvit, tmp_path):
    """Interrupted in the pruning phase, resumed, interrupted again in the fine-tuning phase and resumed
    again: the same masks, architecture and accuracy as the uninterrupted run."""
    common = ["--nvit-model", tiny_nvit, "--target", 0.5, *FAST]
    assert _run([*common, "--out", tmp_path / "full"]) == 0
    part = tmp_path / "part"
    assert _run([*common, "--out", part, "--stop-after", 4]) == 0  # interrupted after the 2nd prune step
    assert (part / "checkpoint.pt").is_file() and not (part / "report.json").exists()
    assert torch.load(part / "checkpoint.pt", weights_only=True)["phase"] == "prune"
    assert _run(["--resume", part, "--no-progress", "--stop-after", 9]) == 0  # 6 prune iterations + 3 fine-tune ones
    assert torch.load(part / "checkpoint.pt", weights_only=True)["phase"] == "finetune"
    assert not (part / "report.json").exists()
    assert _run(["--resume", part, "--no-progress"]) == 0
    assert (part / "report.json").is_file()
    a, b = load_file(str(tmp_path / "full" / "masks.safetensors")), load_file(str(part / "masks.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "full", part))
    assert ra["architecture"] == rb["architecture"] and ra["pruned"]["top1"] == rb["pruned"]["top1"]


def test_several_targets_from_one_run_and_resume(tiny_nvit, tmp_path):
    from nvit.datasets import load_embedded

    common = ["--nvit-model", tiny_nvit, "--target", "0.7,0.5", *FAST]
    full = tmp_path / "full"
    assert _run([*common, "--out", full]) == 0
    r = json.loads((full / "report.json").read_text())
    assert [m["target"] for m in r["models"]] == [0.7, 0.5] and r["pruned"]["top1"] == r["models"][-1]["top1"]
    test = load_embedded("test", limit=40)
    for m in r["models"]:
        assert m["flops"] <= m["target"] * r["dense"]["flops"] and m["folder"] == f"model_{m['target']:g}"
        assert evaluate(nvit.load(full / m["folder"]), test) == pytest.approx(m["top1"])
        assert (full / f"masks_{m['target']:g}.safetensors").is_file()
    assert r["models"][0]["flops"] > r["models"][1]["flops"]
    assert (full / "dims.png").is_file() and not (full / "snapshots").exists() and not (full / "model").exists()
    # interrupted in the pruning phase, and in the first model's fine-tuning: the same models
    its = r["timings"]["prune_iterations"]
    for stop in (4, its + 4):
        part = tmp_path / f"part{stop}"
        assert _run([*common, "--out", part, "--stop-after", stop]) == 0
        assert not (part / "report.json").exists()
        ck = torch.load(part / "checkpoint.pt", weights_only=True)
        assert (ck["phase"], ck.get("target")) == (("prune", None) if stop == 4 else ("finetune", 0.7))
        assert _run(["--resume", part, "--no-progress"]) == 0
        rp = json.loads((part / "report.json").read_text())
        assert [m["architecture"] for m in rp["models"]] == [m["architecture"] for m in r["models"]]
        assert [m["top1"] for m in rp["models"]] == [m["top1"] for m in r["models"]]


def test_several_targets_one_shot(tiny_nvit, tmp_path):
    out = tmp_path / "os"
    assert _run(["--nvit-model", tiny_nvit, "--one-shot", "--target", "0.8,0.6,0.4", "--out", out, *FAST]) == 0
    r = json.loads((out / "report.json").read_text())
    assert [m["target"] for m in r["models"]] == [0.8, 0.6, 0.4]
    assert all(m["flops"] <= m["target"] * r["dense"]["flops"] for m in r["models"])


@pytest.mark.parametrize("extra, fixed_cost, metric, said", [
    (["--target", 0.8], 0.0, "latency", "measured on this device"),
    (["--target", 0.8, "--latency-budget", 0], 0.0, "flops", "--latency-budget"),
    (["--target", 0.3], 1e-3, "flops", "fixed costs dominate"),  # a fixed cost per timed module: unreachable
])
def test_auto_metric_is_latency_when_quick_and_reachable(extra, fixed_cost, metric, said, tiny_nvit, tmp_path, capsys,
                                                        monkeypatch):
    import nvit.latency as lat

    # Timings that do not depend on the machine's load: a fixed cost plus 1 ns per parameter timed.
    monkeypatch.setattr(lat, "_time_block", lambda module, x, **kw: fixed_cost + 1e-9 * sum(
        p.numel() for p in module.parameters()))
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--target-metric", "auto", "--latency-points", 2,
                 *extra]) == 0
    assert said in capsys.readouterr().out
    r = json.loads((out / "report.json").read_text())
    assert r["settings"]["target_metric"] == metric
    assert json.loads((out / "run.json").read_text())["settings"]["target_metric"] == metric  # resume keeps it
    check = r["latency_table_check"]
    if metric == "latency":
        assert set(check) == {"dense", "target 0.8"}
        assert all(c["predicted_s"] > 0 and c["measured_s"] > 0 and math.isfinite(c["error"]) for c in check.values())
    elif "--latency-budget" in extra:
        assert check is None


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_vit_xyz", "--checkpoint", "x.pt"], "unknown timm model"),
    (["--model", "vit_tiny_patch16_224", "--checkpoint", "missing.safetensors"], "not found"),
    (["--model", "vit_tiny_patch16_224"], "needs --checkpoint"),
    (["--data", "no/such/folder"], "not a folder"),
    (["--target", "1.5"], "fraction in (0, 1)"),
    (["--target", "0"], "fraction in (0, 1)"),
    (["--target-metric", "params", "--target", "0.0001"], "unreachable"),
    (["--batch-size", "0"], "batch-size"),
])
def test_errors_are_clear_and_write_nothing(args, message, tiny_nvit, tmp_path, capsys):
    out = tmp_path / "run"
    base = [] if "--model" in args else ["--nvit-model", tiny_nvit]
    assert _run([*base, "--out", out, *FAST, *args]) == 2  # the case's flags win
    assert message in capsys.readouterr().err
    assert not (out / "report.json").exists()


def test_nan_loss_stops_with_a_message(tiny_nvit, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--lr", "1e30"]) == 2
    assert "lower --lr" in capsys.readouterr().err
    assert not (out / "report.json").exists()


def test_out_dir_holding_another_run_is_refused(tiny_nvit, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST]) == 2
    assert "another nvit run" in capsys.readouterr().err


def test_yaml_config_and_unknown_keys(tiny_nvit, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target: 0.7\ngranularity: per-head\nbogus: 1\n")
    assert _run(["--config", cfg, "--nvit-model", tiny_nvit, "--out", tmp_path / "r", *FAST]) == 2
    assert "unknown settings ['bogus']" in capsys.readouterr().err
    from nvit.prune import resolve_settings

    cfg.write_text("target: 0.7\ngranularity: per-head\n")
    s = resolve_settings(["--config", str(cfg), "--granularity", "aligned"])
    assert s["target"] == (0.7,) and s["granularity"] == "aligned"  # flags override the file


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "nvit.prune", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--target-metric" in r.stdout


def test_unsupported_model_refused_before_data_or_evaluation(tmp_path, capsys):
    """A model nvit cannot prune exactly is named before any data is read or the dense model is
    evaluated (exit 2)."""
    import timm

    ck = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=10).state_dict().items()},
              str(ck))
    out = tmp_path / "run"
    assert _run(["--model", "resnet18", "--checkpoint", ck, "--data", tmp_path / "no-such-data", "--out", out,
                 *FAST]) == 2
    captured = capsys.readouterr()
    assert "nvit prunes timm VisionTransformer" in captured.err and "ResNet" in captured.err
    assert "dense model: top-1" not in captured.out + captured.err


def test_branch_pruning_from_the_cli(tiny_nvit, tmp_path):
    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, "--prune-branches", *FAST, "--target", 0.3]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["settings"]["prune_branches"] is True
    assert all({"attn_branch", "mlp_branch"} <= set(h["removed"]) for h in r["prune_steps"])
    assert r["pruned"]["flops"] <= 0.3 * r["dense"]["flops"] and (out / "dims.png").is_file()


def test_one_shot_prunes_without_training(tiny_nvit, tmp_path):
    """--one-shot --finetune-epochs 0: no weight is updated, so the saved model is exactly the dense
    model cut by the saved masks; the target is reached in --one-shot-steps steps."""
    from nvit.structures import Masks, Adapter

    out = tmp_path / "run"
    assert _run(["--nvit-model", tiny_nvit, "--out", out, *FAST, "--one-shot", "--calibration-batches", 2,
                 "--one-shot-steps", 3, "--finetune-epochs", 0, "--target", 0.5]) == 0
    r = json.loads((out / "report.json").read_text())
    assert len(r["prune_steps"]) == 3 and r["pruned"]["flops"] <= 0.5 * r["dense"]["flops"]
    assert r["pruned"]["top1"] == r["pruned"]["top1_before_finetune"] and "one_shot_s" in r["timings"]
    dense = nvit.load(tiny_nvit)
    a = Adapter(dense)
    masks = Masks.from_state_dict(load_file(str(out / "masks.safetensors")))
    a.install_norms(masks)
    a.apply_masks(masks)
    expect = a.convert(masks)
    got = nvit.load(out / "model")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(got(x), expect(x), atol=1e-5)

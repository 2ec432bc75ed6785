"""nvit.prune's inputs and precision: local-dir models, other teachers, DeiT's two-head losses, any
timm head layout, webdataset shards through timm's reader, --amp (bf16 end to end; fp16 saliency from
unscaled gradients)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from nvit import engine
from nvit.prune import main

FAST = ["--train-limit", "48", "--eval-limit", "40", "--batch-size", "8", "--prune-epochs", "1", "--target-metric", "flops",
        "--finetune-epochs", "1", "--prune-every", "2", "--latency-batch", "2", "--no-progress",
        "--checkpoint-every", "2", "--target", "0.5"]
TINY_VIT = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=24, depth=2, num_heads=3,
                mlp_ratio=2.0)


def _run(args):
    return main(list(map(str, args)))


def _local_dir(tmp_path, name, architecture, args, weights_from=None):
    """A folder in timm's hub layout: config.json (architecture, model_args, pretrained cfg) + weights."""
    import timm

    folder = tmp_path / name
    folder.mkdir()
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, **args)
    cfg = {"architecture": architecture, "num_classes": args["num_classes"], "model_args": args,
           "pretrained_cfg": {"input_size": [args["in_chans"], 28, 28], "mean": [0.2857], "std": [0.3521],
                              "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": args["num_classes"]}}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def test_local_dir_model_with_a_separate_teacher(tmp_path):
    student = _local_dir(tmp_path, "student", "vit_tiny_patch16_224", TINY_VIT)
    teacher = _local_dir(tmp_path, "teacher", "vit_tiny_patch16_224", {**TINY_VIT, "embed_dim": 48, "depth": 3})
    out = tmp_path / "run"
    assert _run(["--model", f"local-dir:{student}", "--teacher", f"local-dir:{teacher}", "--out", out, *FAST]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["model"] == {"source": "timm-local-dir", "model": f"local-dir:{student}", "weights": "model.safetensors"}
    assert r["teacher"]["soft"]["model"] == f"local-dir:{teacher}"
    assert r["pruned"]["flops"] <= 0.5 * r["dense"]["flops"]


def test_bad_local_dir_and_teacher_errors(tmp_path, capsys):
    assert _run(["--model", f"local-dir:{tmp_path}", "--out", tmp_path / "x", *FAST]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert _run(["--teacher", "resnet18", "--out", tmp_path / "y", *FAST]) == 2
    assert "needs --teacher-checkpoint" in capsys.readouterr().err
    wrong = _local_dir(tmp_path, "rgb", "vit_tiny_patch16_224", {**TINY_VIT, "in_chans": 3})
    assert _run(["--teacher", f"local-dir:{wrong}", "--out", tmp_path / "z", *FAST]) == 2
    assert "cannot take the student's 1×28×28 images" in capsys.readouterr().err
    assert not (tmp_path / "z" / "checkpoint.pt").exists()


def test_classifier_width_from_any_head_layout(tmp_path):
    """Swin's classifier is head.fc (not head): the class count still comes from the checkpoint."""
    from nvit.inputs import shape_overrides
    import timm

    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                          embed_dim=24, num_heads=(1, 1, 1, 1))
    assert shape_overrides("swin_tiny_patch4_window7_224", m.state_dict(), {})["num_classes"] == 5
    v = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=7, depth=2)
    kw = shape_overrides("deit_tiny_distilled_patch16_224", v.state_dict(), {})
    assert kw["num_classes"] == 7 and kw["depth"] == 2


def test_deit_distilled_student_with_the_papers_losses(tmp_path):
    """--distill-heads separate: KL per head to the dense model, hard labels from a second teacher on the
    distillation head."""
    args = {**TINY_VIT, "class_token": True}
    student = _local_dir(tmp_path, "deit", "deit_tiny_distilled_patch16_224", args)
    cnn = _local_dir(tmp_path, "hard", "vit_tiny_patch16_224", TINY_VIT)  # any classifier will do as hard teacher
    out = tmp_path / "run"
    assert _run(["--model", f"local-dir:{student}", "--distill-heads", "separate", "--hard-teacher",
                 f"local-dir:{cnn}", "--out", out, *FAST]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["teacher"]["hard"]["model"] == f"local-dir:{cnn}"


def test_paper_losses_per_head():
    torch.manual_seed(0)
    s_cls, s_dist, t_cls, t_dist, hard = (torch.randn(4, 5) for _ in range(5))
    y = torch.tensor([0, 1, 2, 3])
    loss = engine.distillation_loss((s_cls, s_dist), (t_cls, t_dist), y, temperature=2.0, weight=0.5)
    want = ((0.5 * torch.nn.functional.cross_entropy(s_cls, y) + 0.5 * engine.kl_soft(s_cls, t_cls, 2.0))
            + engine.kl_soft(s_dist, t_dist, 2.0)) / 2
    assert torch.allclose(loss, want)
    loss_h = engine.distillation_loss((s_cls, s_dist), (t_cls, t_dist), y, temperature=2.0, weight=0.5,
                                      hard_teacher=hard)
    want_h = ((0.5 * torch.nn.functional.cross_entropy(s_cls, y) + 0.5 * engine.kl_soft(s_cls, t_cls, 2.0))
              + torch.nn.functional.cross_entropy(s_dist, hard.argmax(-1))) / 2
    assert torch.allclose(loss_h, want_h)


def test_amp_bf16_end_to_end(tmp_path):
    out = tmp_path / "run"
    student = _local_dir(tmp_path, "student", "vit_tiny_patch16_224", TINY_VIT)
    assert _run(["--model", f"local-dir:{student}", "--amp", "bf16", "--out", out, *FAST]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["precision"]["amp"] == "bf16" and r["latency"]["dtype"] == "bfloat16"


def _saliency_after_one_step(precision, scale_loss=1.0):
    from nvit.pruner import Pruner, Target
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(**TINY_VIT)
    pruner = Pruner(m, Target("flops", 0.5))
    opt = engine.make_optimizer(m, 1e-3, 0.0)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with precision.autocast():
        loss = torch.nn.functional.cross_entropy(m(x), y) * scale_loss
    opt.zero_grad()
    precision.backward(loss)
    finite = precision.unscale(opt)
    if finite:
        pruner.accumulate()
    return pruner.scores.clone(), finite


def test_fp16_saliency_comes_from_unscaled_gradients():
    """With a GradScaler the saliency must equal the one from true gradients (a scaled gradient would
    multiply every score by scale²), and a step whose gradients overflow adds nothing."""
    cpu = torch.device("cpu")
    ref, _ = _saliency_after_one_step(engine.Precision("none", cpu))
    fp16 = engine.Precision("fp16", cpu)
    fp16.autocast = engine.Precision("none", cpu).autocast  # same forward numerics: isolate the scaling
    got, finite = _saliency_after_one_step(fp16)
    assert finite and fp16.scaler.get_scale() > 1
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-12)
    over, finite = _saliency_after_one_step(fp16, scale_loss=float("inf"))
    assert not finite and torch.count_nonzero(over) == 0


def _wds_shards(root, split, n_shards, per_shard, size=32):
    """webdataset shards (tar files of <key>.png + <key>.cls) and timm's _info.json for `split`."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(split))
    names = []
    for s in range(n_shards):
        name = f"{split}-{s:04d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"{s:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    info_path = root / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"name": "toy", "splits": {}}
    info["splits"][split] = {"name": split, "num_samples": n_shards * per_shard, "filenames": names,
                             "shard_lengths": [per_shard] * n_shards}
    info_path.write_text(json.dumps(info))


def test_webdataset_shards_through_timms_reader(tmp_path):
    pytest.importorskip("webdataset", reason="timm's wds/ reader needs the webdataset package")
    root = tmp_path / "shards"
    root.mkdir()
    _wds_shards(root, "train", 2, 24)
    _wds_shards(root, "validation", 1, 12)
    student = _local_dir(tmp_path, "rgb", "vit_tiny_patch16_224", {**TINY_VIT, "in_chans": 3, "img_size": 32,
                                                                    "num_classes": 3})
    out = tmp_path / "run"
    assert _run(["--model", f"local-dir:{student}", "--data", "wds/toy", "--data-root", root, "--workers", 0,
                 "--out", out, *FAST]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["data"]["kind"] == "timm-streaming" and r["data"]["n_train"] == 48
    assert 0 <= r["pruned"]["top1"] <= 100


def test_embedded_data_from_another_file(tmp_path, capsys):
    """--embedded-data: the embedded task's tensors from another npz (e.g. the whole Fashion-MNIST test split)."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 48), ("test", 24))}
    arrays |= {f"{s}_labels": rng.integers(0, 10, n, dtype=np.uint8) for s, n in (("train", 48), ("test", 24))}
    arrays["class_names"] = np.array([str(c) for c in range(10)])
    npz = tmp_path / "other.npz"
    np.savez_compressed(npz, **arrays)
    student = _local_dir(tmp_path, "student", "vit_tiny_patch16_224", TINY_VIT)
    out = tmp_path / "run"
    assert _run(["--model", f"local-dir:{student}", "--embedded-data", npz, "--out", out, *FAST,
                 "--eval-limit", 1000]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["data"]["name"] == str(npz) and r["data"]["n_test"] == 24
    assert _run(["--model", f"local-dir:{student}", "--embedded-data", tmp_path / "none.npz", "--out",
                 tmp_path / "x", *FAST]) == 2
    assert "no such file" in capsys.readouterr().err

"""A timm Swin checkpoint through the CLI: pruned, converted, fine-tuned, saved and read back (nvit.load
and timm's local-dir: scheme)."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import nvit
from nvit.model_swin import NViTSwin
from test_prune_cli import FAST, _image_folder, _run


SWIN = "swin_tiny_patch4_window7_224"  # a Swin-T entrypoint; the CLI reads the stages' shapes from the checkpoint


def _swin_inputs(tmp_path, size, train, **shape):
    """A random image folder and a random-init Swin checkpoint of that (smaller) shape: the CLI's
    --model/--checkpoint/--img-size/--data arguments."""
    root = _image_folder(tmp_path / "data", size=size, classes=2, train=train)
    torch.manual_seed(0)
    dense = timm.create_model(SWIN, pretrained=False, img_size=size, num_classes=2, window_size=4, **shape)
    ck = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(ck))
    return ["--model", SWIN, "--checkpoint", ck, "--img-size", size, "--data", root]


def test_swin_checkpoint_end_to_end(tmp_path):
    """A Swin checkpoint pruned, converted, fine-tuned and reported by the CLI; saved, reloaded by nvit and timm."""
    inputs = _swin_inputs(tmp_path, 40, 8, depths=(2, 2), num_heads=(1, 2), embed_dim=16, mlp_ratio=2.0)
    out = tmp_path / "run"
    rc = _run([*inputs, "--out", out, *FAST, "--target", 0.6, "--granularity", "per-head"])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert r["pruned"]["flops"] <= 0.6 * r["dense"]["flops"]
    assert r["architecture"]["dense_embed_dims"] == [16, 32] and len(r["architecture"]["embed_dims"]) == 2
    back = nvit.load(out / "model")
    assert isinstance(back, NViTSwin) and back.config.family == "swin" and len(back.config.embed_dims) == 2
    via_timm = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(back(x), via_timm(x))


def test_swin_latency_target_refused_before_measuring(tmp_path, capsys):
    """The latency table measures ViT blocks: a Swin run asking for latency stops with the reason (exit 2)."""
    inputs = _swin_inputs(tmp_path, 32, 4, depths=(2,), num_heads=(1,), embed_dim=8)
    rc = _run([*inputs, "--out", tmp_path / "run", *FAST, "--target-metric", "latency"])
    assert rc == 2 and "measures ViT blocks, not swin" in capsys.readouterr().err


def test_swin_resume_and_reprune(tmp_path):
    """Per-stage masks survive an interrupted pruning phase (--resume reaches the masks of an
    uninterrupted run), and the saved NViT-Swin model prunes again (--nvit-model)."""
    from safetensors.torch import load_file

    inputs = _swin_inputs(tmp_path, 40, 8, depths=(2, 2), num_heads=(2, 2), embed_dim=16, mlp_ratio=2.0)
    root = inputs[-1]
    common = [*inputs, *FAST,
              "--target", 0.5, "--prune-units", 30, "--group-embed", 2]
    assert _run([*common, "--out", tmp_path / "full"]) == 0
    part = tmp_path / "part"
    assert _run([*common, "--out", part, "--stop-after", 3]) == 0  # interrupted after the first prune step
    assert (part / "checkpoint.pt").is_file() and not (part / "report.json").exists()
    assert _run(["--resume", part, "--no-progress"]) == 0
    again = tmp_path / "again"
    assert _run(["--nvit-model", tmp_path / "full" / "model", "--data", root, "--out", again, *FAST,
                 "--target", 0.7, "--granularity", "per-head"]) == 0
    assert isinstance(nvit.load(again / "model"), NViTSwin)
    a, b = load_file(str(tmp_path / "full" / "masks.safetensors")), load_file(str(part / "masks.safetensors"))
    assert a.keys() == b.keys() and {"embed.0", "embed.1"} <= set(a)
    same = all(torch.equal(a[k], b[k]) for k in a)
    if not same and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        pytest.xfail("open bug: with torch 2.4 (timm 1.0.16) the resumed Swin run's loss departs from the "
                     "uninterrupted run's right after the restore and one V mask ends different; reruns are "
                     "identical, and torch 2.14 (with either timm) resumes exactly; cause not found yet")
    assert same

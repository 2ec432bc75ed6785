"""nvit.export: ONNX and torch.export programs of NViT models, verified against the PyTorch model."""
import pytest
import torch

import nvit
from nvit import export as E
from nvit.deploy import attention_groups, exportable
from nvit.structures import Adapter
from _vit_factory import random_masks, tiny_vit

onnx_ready = pytest.mark.skipif(any(__import__("importlib").util.find_spec(p) is None for p in E.ONNX_PACKAGES),
                                reason='ONNX export needs pip install ".[export]"')


def _nvit(gran="per-head", branches=False, variant="layerscale_nobias", seed=1):
    m = tiny_vit(variant, depth=3)
    a = Adapter(m)
    return a.convert(random_masks(a, gran, seed, branches=branches)).eval()


@pytest.mark.parametrize("gran, branches", [("per-head", False), ("aligned", False), ("per-head", True)])
@pytest.mark.parametrize("pad", [None, 8])
def test_standard_ops_attention_is_exact(gran, branches, pad):
    nv = _nvit(gran, branches)
    e = exportable(nv, pad)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (e(x) - nv(x)).abs().max() <= 1e-5
    groups = attention_groups(e)
    if pad:
        assert all(g.qk % pad == 0 and g.v % pad == 0 for gs in groups for g in gs)
    if branches:
        assert groups[0] == []  # block 0 lost its attention branch


@onnx_ready
@pytest.mark.parametrize("gran, branches", [("per-head", False), ("aligned", False), ("per-head", True)])
def test_onnx_round_trip_dynamic_batch(gran, branches, tmp_path):
    import onnxruntime as ort

    nv = _nvit(gran, branches)
    nvit.save(nv, tmp_path / "m")
    assert E.main([str(tmp_path / "m"), "--format", "onnx"]) == 0  # verifies itself at batch 2 and 5
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 7):  # and other batch sizes run too
        x = torch.randn(b, 3, 16, 16)
        out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            assert E.relative_error(nv(x), out) <= 1e-4


def test_pt2_round_trip_fixed_and_dynamic_batch(tmp_path):
    nv = _nvit("per-head", True)
    nvit.save(nv, tmp_path / "m")
    assert E.main([str(tmp_path / "m"), "--format", "pt2", "--batch", "3", "--out", str(tmp_path / "b3.pt2")]) == 0
    assert E.main([str(tmp_path / "m"), "--format", "pt2", "--pad-heads", "4"]) == 0
    back = torch.export.load(str(tmp_path / "m" / "model.pt2")).module()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert E.relative_error(nv(x), back(x)) <= 1e-4


@pytest.mark.slow
def test_a_prune_run_folder_and_fp16(tmp_path, tiny_nvit):
    from nvit.prune import main as prune

    run = tmp_path / "run"
    assert prune([*map(str, ["--nvit-model", tiny_nvit, "--out", run, "--train-limit", 32, "--eval-limit", 20,
                             "--batch-size", 8, "--prune-epochs", 1, "--finetune-epochs", 0, "--prune-every", 2,
                             "--latency-batch", 2, "--no-progress", "--target", 0.5])]) == 0
    assert E.main([str(run), "--format", "pt2", "--dtype", "fp16"]) == 0
    assert (run / "model" / "model.pt2").is_file()


def test_failed_verification_writes_nothing(tmp_path, monkeypatch, capsys):
    nv = _nvit()
    nvit.save(nv, tmp_path / "m")
    monkeypatch.setattr(E, "relative_error", lambda ref, out: 0.5)  # as if the runtime computed garbage
    assert E.main([str(tmp_path / "m"), "--format", "pt2"]) == 2
    err = capsys.readouterr().err
    assert "differ from PyTorch's by 5.00e-01" in err and "nothing written" in err
    assert not (tmp_path / "m" / "model.pt2").exists() and not list((tmp_path / "m").glob(".*tmp"))


def test_clear_errors(tmp_path, monkeypatch, capsys):
    assert E.main([str(tmp_path), "--format", "onnx"]) == 2
    assert "neither a saved NViT model nor a prune run" in capsys.readouterr().err
    nvit.save(_nvit(), tmp_path / "m")
    monkeypatch.setattr(E, "ONNX_PACKAGES", ("onnx", "no_such_package_xyz"))
    assert E.main([str(tmp_path / "m"), "--format", "onnx"]) == 2
    assert 'no_such_package_xyz: pip install "nvit[export]"' in capsys.readouterr().err


@pytest.mark.slow
@onnx_ready
def test_deit_small_exports_to_onnx(tmp_path):
    """A DeiT-S-sized NViT model (timm's DeiT-S, random weights, random uneven masks), at batch 1."""
    import timm

    torch.manual_seed(0)
    a = Adapter(timm.create_model("deit_small_patch16_224", pretrained=False, depth=4))
    nv = a.convert(random_masks(a, "per-head", 0)).eval()
    err = E.export(nv, tmp_path / "deit_s.onnx", fmt="onnx", batch="1", log=lambda *_: None)
    assert err <= 1e-4 and (tmp_path / "deit_s.onnx").stat().st_size > 10e6

"""NViT-Swin models exported with standard operators only (one SDPA per group of equal-dims heads, the
relative position bias and shifted-window mask as its attn_mask): equal to the PyTorch model, and
through ONNX Runtime and torch.export with a dynamic batch."""
import pytest
import torch

import nvit
from nvit import export as E
from nvit.deploy import attention_groups, exportable
from nvit.structures import Adapter
from _vit_factory import random_masks
from test_swin import ODD, PADDED, RECT, _image, tiny_swin

onnx_ready = pytest.mark.skipif(any(__import__("importlib").util.find_spec(p) is None for p in E.ONNX_PACKAGES),
                                reason='ONNX export needs pip install ".[export]"')


def _nvit_swin(cfg=ODD, gran="per-head", branches=False, seed=1):
    a = Adapter(tiny_swin(cfg, seed=seed))
    return a.convert(random_masks(a, gran, seed, branches=branches)).eval()


@pytest.mark.parametrize("cfg", [ODD, PADDED, RECT], ids=["odd", "padded", "rect"])
@pytest.mark.parametrize("gran, branches", [("per-head", False), ("aligned", False), ("per-head", True)])
@pytest.mark.parametrize("pad", [None, 8])
def test_standard_ops_window_attention_is_exact(cfg, gran, branches, pad):
    nv = _nvit_swin(cfg, gran, branches)
    e = exportable(nv, pad)
    x = _image(cfg, 3)
    with torch.no_grad():
        assert E.relative_error(nv(x), e(x)) <= 1e-5
    groups = attention_groups(e)
    assert len(groups) == len(nv.config.blocks)
    if branches:
        assert groups[0] == []


@pytest.mark.slow
@onnx_ready
def test_swin_onnx_round_trip_dynamic_batch(tmp_path):
    import onnxruntime as ort

    nv = _nvit_swin()
    nvit.save(nv, tmp_path / "m")
    assert E.main([str(tmp_path / "m"), "--format", "onnx"]) == 0  # verifies itself at batch 2 and 5
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = _image(ODD, b, seed=b)
        out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            assert E.relative_error(nv(x), out) <= 1e-4


def test_swin_pt2_round_trip_dynamic_batch(tmp_path):
    nv = _nvit_swin(PADDED, branches=True)
    nvit.save(nv, tmp_path / "m")
    assert E.main([str(tmp_path / "m"), "--format", "pt2", "--pad-heads", "4"]) == 0
    back = torch.export.load(str(tmp_path / "m" / "model.pt2")).module()
    x = _image(PADDED, 4)
    with torch.no_grad():
        assert E.relative_error(nv(x), back(x)) <= 1e-4


@pytest.mark.slow
@onnx_ready
def test_swin_t_exports_to_onnx(tmp_path):
    """Swin-T as timm builds it (random weights, random uneven per-head masks), at batch 1 (~1 min)."""
    import timm

    torch.manual_seed(0)
    a = Adapter(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False))
    nv = a.convert(random_masks(a, "per-head", 0)).eval()
    err = E.export(nv, tmp_path / "swin_t.onnx", fmt="onnx", batch="1", log=lambda *_: None)
    assert err <= 1e-4 and (tmp_path / "swin_t.onnx").stat().st_size > 10e6

"""nvit.save / nvit.load: same outputs back; corrupt or mismatched files are refused clearly."""
import json

import pytest
import torch

import nvit
from nvit.io import ModelFileError
from nvit.structures import Adapter
from _vit_factory import random_masks, tiny_vit


@pytest.fixture()
def saved(tmp_path):
    a = Adapter(tiny_vit("distilled"))
    nv = a.convert(random_masks(a, "per-head", 0))
    path = nvit.save(nv, tmp_path / "m")
    return nv, path


def test_roundtrip_same_outputs(saved):
    nv, path = saved
    back = nvit.load(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(nv(x), back(x))
    assert back.config == nv.config
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temp folder left


def test_refuses_to_overwrite(saved):
    nv, path = saved
    with pytest.raises(FileExistsError):
        nvit.save(nv, path)
    nvit.save(nv, path, overwrite=True)


def test_missing_and_corrupt_files(saved, tmp_path):
    nv, path = saved
    with pytest.raises(ModelFileError, match="not a saved NViT model"):
        nvit.load(tmp_path / "nothing")
    (path / "config.json").write_text("{ not json")
    with pytest.raises(ModelFileError, match="corrupt"):
        nvit.load(path)


def test_truncated_weights(saved):
    nv, path = saved
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="corrupt"):
        nvit.load(path)


def test_config_weights_mismatch(saved):
    nv, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_args"]["config"]["blocks"][0]["mlp"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="does not match"):
        nvit.load(path)


def test_wrong_format_marker(saved):
    nv, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["format"] = "something-else"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="not an nvit model config"):
        nvit.load(path)


def test_save_takes_only_nvit_models(tmp_path):
    with pytest.raises(TypeError, match="NViT model"):
        nvit.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_timm_builds_a_saved_nvit_model(tmp_path):
    """`import nvit` registers the family: timm's local-dir: scheme (and create_model("nvit", …) with a
    file overlay) builds the saved model, and timm's data config resolves its preprocessing."""
    import json

    import timm
    from timm.data import resolve_data_config

    import nvit

    nv = _model()
    nv.config.data = {"mean": [0.25, 0.5, 0.75], "std": [0.1, 0.2, 0.3], "crop_pct": 1.0}
    nvit.save(nv, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architecture"] == "nvit" and cfg["pretrained_cfg"]["mean"] == [0.25, 0.5, 0.75]
    x = torch.randn(2, nv.config.in_chans, nv.config.img_size, nv.config.img_size)
    with torch.no_grad():
        ref = nv.eval()(x)
        for m in (timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True),
                  timm.create_model("nvit", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "m")))):
            assert torch.equal(m.eval()(x), ref)
            dc = resolve_data_config(model=m)
            assert tuple(dc["mean"]) == (0.25, 0.5, 0.75) and dc["crop_pct"] == 1.0
            assert tuple(dc["input_size"]) == (nv.config.in_chans, nv.config.img_size, nv.config.img_size)


def test_format_version_1_folders_still_load(tmp_path):
    import json

    import nvit

    nv = _model()
    nvit.save(nv, tmp_path / "m")
    f = tmp_path / "m" / "config.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps({"format": d["format"], "format_version": 1, "config": d["model_args"]["config"]}))
    assert nvit.load(tmp_path / "m").config == nv.config


def _model():
    a = Adapter(tiny_vit("plain"))
    return a.convert(random_masks(a, "per-head", 0))

"""nvit.save / nvit.load: same outputs back; corrupt or mismatched files are refused clearly."""
import json

import pytest
import torch

import nvit
from nvit.io import ModelFileError
from nvit.structures import ViTAdapter
from _vit_factory import random_masks, tiny_vit


@pytest.fixture()
def saved(tmp_path):
    a = ViTAdapter(tiny_vit("distilled"))
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
    cfg["config"]["blocks"][0]["mlp"] += 1
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

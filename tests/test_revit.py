"""`python -m nvit.revit`: the paper's redistribution rule, the rule fitted to a pruning run, FLOPs
scaling, and `nvit.pretrain --model-config` training what it writes."""
import json
import math

import pytest
from safetensors.torch import load_file

import nvit
from nvit.cost import count_flops
from nvit.model import BlockConfig, NViT, NViTConfig
from nvit.datasets import load_embedded
from nvit.revit import fitted_rule, main, paper_rule, uniform_rule
from nvit.training import evaluate


def test_paper_rule_reproduces_the_reference_code():
    """ReViT-T and ReViT-S as ../shared/NVIT_METHOD.md computes them from the paper's code."""
    t = paper_rule(176, 12)
    assert [h for h, *_ in t] == [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10]
    assert [q for _, q, *_ in t] == [16, 8, 8] + [16] * 6 + [8, 8, 16]
    assert [m for *_, m in t] == [528] * 3 + [1056] * 6 + [528] * 3
    s = paper_rule(384, 12)
    assert [h for h, *_ in s] == [10, 4, 4] + [8] * 6 + [4, 4, 10]
    assert [q for _, q, *_ in s] == [32, 16, 16] + [32] * 6 + [16, 16, 32]
    assert all(v == 64 for _, _, v, _ in s) and [m for *_, m in s] == [1152] * 3 + [2304] * 6 + [1152] * 3
    assert uniform_rule(384, 12) == [(6, 64, 64, 1536)] * 12


def test_fitted_rule_reproduces_its_source_and_scales_with_width():
    src = NViTConfig(28, 4, 1, 10, 64, [BlockConfig([8] * h, [6] * h, m, [0.3] * h)
                                         for h, m in ((2, 100), (4, 300), (3, 200), (1, 50))])
    same = fitted_rule(src, 64, 4)
    assert same == [(2, 8, 6, 100), (4, 8, 6, 300), (3, 8, 6, 200), (1, 8, 6, 50)]
    wide = fitted_rule(src, 128, 4)
    assert wide == [(4, 16, 6, 200), (8, 16, 6, 600), (6, 16, 6, 400), (2, 16, 6, 100)]  # V per head kept
    deep = fitted_rule(src, 64, 7)  # read at relative depth: the ends are the source's ends
    assert deep[0] == same[0] and deep[-1] == same[-1] and len(deep) == 7


def test_cli_flops_budget_and_from_a_saved_model(tmp_path, capsys):
    base = ["--img-size", 28, "--patch-size", 4, "--in-chans", 1, "--num-classes", 10]
    out = tmp_path / "revit.json"
    assert main(list(map(str, ["--embed-dim", 128, "--depth", 6, "--flops", 1.2e8, *base, "--out", out]))) == 0
    cfg = NViTConfig.from_dict(json.loads(out.read_text()))
    assert 0.97 * 1.2e8 <= count_flops(cfg) <= 1.2e8
    assert cfg.provenance["revit"]["rule"] == "paper" and all(b.v_dims[0] == 64 for b in cfg.blocks)
    # a saved (pruned) NViT model as the source: its image size and classes carry over
    src = NViT(NViTConfig(28, 4, 1, 10, 64, [BlockConfig([8] * 2, [6] * 2, 100, [0.3] * 2)] * 3))
    nvit.save(src, tmp_path / "m")
    fitted = tmp_path / "fitted.json"
    assert main(list(map(str, ["--embed-dim", 96, "--depth", 3, "--from", tmp_path / "m", "--out", fitted]))) == 0
    f = NViTConfig.from_dict(json.loads(fitted.read_text()))
    assert (f.img_size, f.in_chans, f.num_classes) == (28, 1, 10) and f.blocks[0].heads == 3
    assert main(list(map(str, ["--embed-dim", 96, "--depth", 3, "--from", tmp_path / "nothing", "--out", fitted]))) == 2
    assert "expected a prune run's folder" in capsys.readouterr().err
    assert main(list(map(str, ["--embed-dim", 128, "--depth", 6, "--flops", 10, *base, "--out", out]))) == 2


def test_pretrain_trains_a_revit_config(tmp_path):
    from nvit.pretrain import main as pretrain

    cfg = tmp_path / "cfg" / "revit.json"
    cfg.parent.mkdir()
    assert main(list(map(str, ["--embed-dim", 32, "--depth", 4, "--img-size", 28, "--patch-size", 7, "--in-chans", 1,
                               "--num-classes", 10, "--flops", 2e6, "--out", cfg]))) == 0
    info = pretrain(["--model-config", str(cfg), "--out", str(tmp_path / "w.safetensors"), "--epochs", "1",
                     "--train-limit", "64", "--eval-limit", "32", "--batch-size", "16", "--no-progress"])
    assert info["model"] == "nvit.NViT" and info["config"] == json.loads(cfg.read_text())  # exactly what revit wrote
    assert info["history"][0]["train_loss"] > 0 and math.isfinite(info["history"][0]["train_loss"])
    # The weights it writes are that architecture's, and give the test top-1 it records (on the same images).
    model = NViT(NViTConfig.from_dict(info["config"]))
    assert info["params"] == sum(p.numel() for p in model.parameters())
    model.load_state_dict({k: v.float() for k, v in load_file(str(tmp_path / "w.safetensors")).items()})  # strict
    assert evaluate(model, load_embedded("test", limit=32)) == pytest.approx(info["test_top1"], abs=0.005)
    assert json.loads((tmp_path / "w.json").read_text())["test_top1"] == info["test_top1"]
    wrong = json.loads(cfg.read_text()) | {"in_chans": 3}
    cfg.write_text(json.dumps(wrong))
    with pytest.raises(SystemExit, match="takes 3×28"):
        pretrain(["--model-config", str(cfg), "--out", str(tmp_path / "x.safetensors"), "--epochs", "1",
                  "--train-limit", "8", "--no-progress"])

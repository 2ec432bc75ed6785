"""The pretraining command (on a tiny model, in seconds) and the shipped embedded checkpoint."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from nvit import pretrain
from nvit.datasets import load_embedded
from nvit.tiny_model import EMBEDDED_MODEL, WEIGHTS_PATH, build_model, create_embedded_model, load_weights

TINY = dict(embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
TINY_ARGS = ["--epochs", "1", "--train-limit", "48", "--eval-limit", "40", "--batch-size", "16",
             "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--mlp-ratio", "2", "--threads", "1",
             "--warmup-epochs", "0.5", "--no-progress"]


def _run(path, seed):
    return pretrain.main(["--out", str(path), "--seed", str(seed), *TINY_ARGS])


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_tiny_pretrain_writes_loadable_and_reproducible_weights(tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    info = _run(tmp_path / "a.safetensors", seed=7)
    # No leaked global state: thread count, determinism flag and the global RNG are restored.
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), rng_state)
    _run(tmp_path / "b.safetensors", seed=7)
    _run(tmp_path / "c.safetensors", seed=8)

    a, meta = _tensors(tmp_path / "a.safetensors")
    b, _ = _tensors(tmp_path / "b.safetensors")
    c, _ = _tensors(tmp_path / "c.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed -> same weights
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values())
    assert meta["epochs"] == "1" and meta["seed"] == "7" and meta["dtype"] == "float16"
    assert json.loads(meta["model_config"])["embed_dim"] == 16

    record = json.loads((tmp_path / "a.json").read_text())
    assert record == json.loads(json.dumps(info))
    assert record["config"] == {**EMBEDDED_MODEL, **TINY}
    assert record["data"]["n_train"] == 48 and record["data"]["n_test"] == 40
    assert 0.0 <= record["test_top1"] <= 100.0 and meta["test_top1"] == f"{record['test_top1']:.2f}"
    assert len(record["history"]) == 1 and math.isfinite(record["history"][0]["train_loss"])
    assert not list(tmp_path.glob("*.tmp"))

    model = build_model(**TINY)
    load_weights(model, tmp_path / "a.safetensors")
    assert model.pos_embed.dtype == torch.float32
    # The recorded accuracy is that of the loaded (fp16 -> fp32) weights.
    assert pretrain.evaluate(model, load_embedded("test", limit=40)) == pytest.approx(record["test_top1"], abs=0.01)
    with pytest.raises(ValueError, match="do not match"):
        load_weights(build_model(**{**TINY, "embed_dim": 32}), tmp_path / "a.safetensors")


def test_pad_crop_flip():
    from nvit.loader import pad_crop_flip

    x = torch.randn(6, 1, 28, 28)
    bg = (0.0 - pretrain.EMBEDDED_MEAN) / pretrain.EMBEDDED_STD

    def draw(f, seed):
        torch.manual_seed(seed)
        return torch.stack([f(x[i]) for i in range(6)])

    assert torch.equal(draw(pad_crop_flip(0, False, bg), 0), x)
    y = draw(pad_crop_flip(2, False, bg), 1)
    assert y.shape == x.shape
    # Every output is a 28x28 window of the padded input (padding = normalised black).
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), value=bg)
    for i in range(6):
        assert any(torch.equal(y[i, 0], xp[i, 0, dy:dy + 28, dx:dx + 28]) for dy in range(5) for dx in range(5))
    f = draw(pad_crop_flip(0, True, bg), 2)
    flipped = [torch.equal(f[i], x[i].flip(-1)) for i in range(6)]
    assert all(flipped[i] or torch.equal(f[i], x[i]) for i in range(6)) and 0 < sum(flipped) < 6
    assert torch.equal(draw(pad_crop_flip(2, False, bg), 1), y)  # the seed fixes the draws


def test_lr_schedule_warmup_then_cosine():
    f = pretrain.lr_lambda(total_steps=100, warmup_steps=10, min_ratio=0.01)
    vals = [f(s) for s in range(101)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(vals[:10], vals[1:10]))
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))
    assert vals[100] == pytest.approx(0.01)


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--out", str(tmp_path / "w.pt")])
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--out", str(tmp_path / "w.safetensors"), "--epochs", "0"])


@pytest.mark.skipif(not WEIGHTS_PATH.is_file(), reason="shipped checkpoint not built yet")
def test_shipped_checkpoint_reaches_recorded_accuracy():
    record = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    assert record["config"] == EMBEDDED_MODEL
    model = create_embedded_model()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == record["params"]
    n = 500
    top1 = pretrain.evaluate(model, load_embedded("test", limit=n))
    # record["test_top1"] is over the whole test split; a 500-image slice differs by sampling: its standard error
    # is sqrt(p(1-p)/n * (1 - n/N)) ~ 1.5 points at p ~ 0.77, so allow 5 points (over 3 sigma).
    assert abs(top1 - record["test_top1"]) < 5.0, (top1, record["test_top1"])
    assert record["test_top1"] > 70.0  # well above chance (10 %): the shipped model did learn the task


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nvit.pretrain"):
        create_embedded_model(weights=tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupt"):
        create_embedded_model(weights=bad)
    m = create_embedded_model(pretrained=False)
    assert m.training and m.patch_embed.num_patches == 49 and m.num_prefix_tokens == 1
    with pytest.raises(TypeError, match="embed_dimm"):
        build_model(embed_dimm=8)


def test_old_limit_spelling_still_works_with_a_warning(tmp_path):
    """--train-limit / --eval-limit as in nvit.prune; the old --limit-train / --limit-test are deprecated aliases."""
    out = ["--out", str(tmp_path / "w.safetensors")]
    new = pretrain.parse_args([*out, "--train-limit", "48", "--eval-limit", "40"])
    assert (new.train_limit, new.eval_limit) == (48, 40)
    with pytest.warns(FutureWarning, match="--limit-train is deprecated; use --train-limit"):
        old = pretrain.parse_args([*out, "--limit-train", "48", "--limit-test", "40"])
    assert (old.train_limit, old.eval_limit) == (48, 40)

"""Save and load converted models (NViT, NViT-Swin) without pickle: a directory with config.json and
model.safetensors. config.json's "architecture" names which converted model it is (timm's hub layout,
so timm.create_model("local-dir:…") builds it through nvit.timm_family's entrypoints)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import NViT, NViTConfig
from .model_swin import NViTSwin, NViTSwinConfig

FORMAT = "nvit-model"
FORMAT_VERSION = 2  # 2: timm's hub layout (architecture, model_args, pretrained_cfg); 1 is still read
CONFIG, WEIGHTS = "config.json", "model.safetensors"
# architecture name (config.json, timm entrypoint) → (model class, config class)
ARCHITECTURES = {"nvit": (NViT, NViTConfig), "nvit_swin": (NViTSwin, NViTSwinConfig)}


class ModelFileError(ValueError):
    """A saved model directory is missing, corrupt or does not match its config."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Produce `path` atomically: `write(tmp)` fills a temp file in the same folder, which is then
    renamed over `path`, so readers never see a half-written file (and a failure leaves none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be read by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def architecture_of(config) -> str:
    for name, (_, cfg_cls) in ARCHITECTURES.items():
        if isinstance(config, cfg_cls):
            return name
    raise TypeError(f"nvit: {type(config).__name__} is not the config of a converted model")


def config_from_dict(d: dict, architecture: str | None = None):
    """The config a dict describes (Config.to_dict's output); without `architecture`, told apart by its
    keys (a Swin config has per-stage embed_dims)."""
    if architecture is None:
        architecture = "nvit_swin" if "embed_dims" in d else "nvit"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"nvit: unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[architecture][1].from_dict(d)


def build(config) -> nn.Module:
    """An (untrained) converted model of this architecture: NViT or NViTSwin."""
    return ARCHITECTURES[architecture_of(config)][0](config)


def build_from_dict(d: dict) -> nn.Module:
    return build(config_from_dict(d))


def count(metric: str, config) -> int:
    """Params or FLOPs ("params" | "flops") of a converted architecture, whichever it is (nvit.cost for
    NViT, nvit.model_swin for NViT-Swin)."""
    from . import cost, model_swin

    mod = model_swin if isinstance(config, NViTSwinConfig) else cost
    return mod.count_flops(config) if metric == "flops" else mod.count_params(config)


def save(model: NViT | NViTSwin, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` to directory `path` (built in a temp folder beside it, then renamed into place)."""
    if not isinstance(model, tuple(m for m, _ in ARCHITECTURES.values())):
        raise TypeError(f"nvit.save takes an NViT model (NViT or NViTSwin, from Pruner.convert or nvit.load), got "
                        f"{type(model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"nvit: {path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp.chmod(0o755)  # mkdtemp makes a private folder; a saved model is meant to be shared
        c = model.config
        # timm's hub layout, so timm's local-dir: scheme and data config read the folder as it is.
        cfg = {"architecture": architecture_of(c), "num_classes": c.num_classes, "num_features": c.out_dim,
               "model_args": {"config": c.to_dict()}, "pretrained_cfg": c.pretrained_cfg(),
               "format": FORMAT, "format_version": FORMAT_VERSION}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_config(path: str | os.PathLike) -> NViTConfig | NViTSwinConfig:
    path = Path(path)
    f = path / CONFIG
    if not f.is_file():
        raise ModelFileError(f"nvit: {path} is not a saved NViT model (no {CONFIG})")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"nvit: {f} is corrupt: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ModelFileError(f"nvit: {f} is not an nvit model config (format != {FORMAT!r})")
    version = d.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ModelFileError(f"nvit: {f} has format_version {version}; this nvit reads 1 to {FORMAT_VERSION}")
    try:  # format 1 predates other architectures: NViT
        if version == 1:
            return NViTConfig.from_dict(d["config"])
        return config_from_dict(d["model_args"]["config"], d.get("architecture", "nvit"))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"nvit: {f} holds an invalid config: {e}") from None


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> NViT | NViTSwin:
    """Load a model written by :func:`save`; corrupt or mismatched files raise ModelFileError."""
    path = Path(path)
    cfg = load_config(path)
    wf = path / WEIGHTS
    if not wf.is_file():
        raise ModelFileError(f"nvit: {path} has no {WEIGHTS}")
    try:
        tensors = load_file(str(wf), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"nvit: {wf} is corrupt: {e}") from None
    model = build(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ModelFileError(f"nvit: {wf} does not match {CONFIG}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
    model.load_state_dict(tensors)
    return model.to(map_location).eval()

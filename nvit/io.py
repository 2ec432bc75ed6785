"""Save and load NViT models without pickle: a directory with config.json and model.safetensors."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import NViT, NViTConfig

FORMAT = "nvit-model"
FORMAT_VERSION = 2  # 2: timm's hub layout (architecture, model_args, pretrained_cfg); 1 is still read
CONFIG, WEIGHTS = "config.json", "model.safetensors"


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


def save(model: NViT, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` to directory `path` (built in a temp folder beside it, then renamed into place)."""
    if not isinstance(model, NViT):
        raise TypeError(f"nvit.save takes an NViT model (from Pruner.convert or nvit.load), got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"nvit: {path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp.chmod(0o755)  # mkdtemp makes a private folder; a saved model is meant to be shared
        c = model.config
        # timm's hub layout, so timm's local-dir: scheme and data config read the folder as it is.
        cfg = {"architecture": "nvit", "num_classes": c.num_classes, "num_features": c.embed_dim,
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


def load_config(path: str | os.PathLike) -> NViTConfig:
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
    try:
        return NViTConfig.from_dict(d["config"] if version == 1 else d["model_args"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"nvit: {f} holds an invalid config: {e}") from None


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> NViT:
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
    model = NViT(cfg)
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

"""NViT as a timm model family: ``import nvit`` registers ``nvit`` and ``nvit_swin`` with timm's model
registry, so

    timm.create_model("local-dir:runs/demo/model", pretrained=True)     # a saved folder (timm's scheme)
    timm.create_model("nvit", pretrained=True, pretrained_cfg_overlay=dict(file="runs/demo/model"))

build the saved model, and timm.data.resolve_data_config(model=…) finds its preprocessing (the folder's
config.json is in timm's hub layout: architecture, model_args, pretrained_cfg).
"""
from __future__ import annotations

from pathlib import Path

from timm.models import register_model


def _weights_folder(pretrained_cfg: dict | None, overlay: dict | None) -> Path | None:
    for cfg in (overlay or {}, pretrained_cfg or {}):
        f = cfg.get("file")
        if f:
            p = Path(f)
            return p if p.is_dir() else p.parent
    return None


def _create(architecture: str, pretrained: bool, config: dict | None, pretrained_cfg: dict | None,
            pretrained_cfg_overlay: dict | None, **kwargs):
    """A converted model: `config` as a dict (config.json's model_args), or read from the saved folder
    that pretrained_cfg(_overlay)["file"] names; pretrained=True loads its weights."""
    from . import io

    kwargs.pop("cache_dir", None)  # timm passes it to every entrypoint; a local folder needs none
    folder = _weights_folder(pretrained_cfg, pretrained_cfg_overlay)
    if pretrained:
        if folder is None:
            raise ValueError("nvit: pretrained=True needs a saved folder: timm.create_model('local-dir:FOLDER', "
                             "pretrained=True) or pretrained_cfg_overlay=dict(file=FOLDER)")
        model = io.load(folder)
    else:
        if config is None:
            if folder is None:
                raise ValueError("nvit: give config=NViTConfig dict, or a saved folder via pretrained_cfg_overlay")
            config = io.load_config(folder).to_dict()
        model = io.build(io.config_from_dict(config, architecture))
    if kwargs.get("num_classes") not in (None, model.config.num_classes):
        raise ValueError(f"nvit: the saved model has {model.config.num_classes} classes; re-heading an NViT model "
                         f"through create_model(num_classes=…) is not supported")
    return model


@register_model
def nvit(pretrained: bool = False, config: dict | None = None, pretrained_cfg: dict | None = None,
         pretrained_cfg_overlay: dict | None = None, **kwargs):
    """An NViT model (see _create)."""
    return _create("nvit", pretrained, config, pretrained_cfg, pretrained_cfg_overlay, **kwargs)


@register_model
def nvit_swin(pretrained: bool = False, config: dict | None = None, pretrained_cfg: dict | None = None,
              pretrained_cfg_overlay: dict | None = None, **kwargs):
    """An NViT-Swin model (see _create)."""
    return _create("nvit_swin", pretrained, config, pretrained_cfg, pretrained_cfg_overlay, **kwargs)

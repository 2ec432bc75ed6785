"""nvit: global, latency-aware Hessian pruning of Vision Transformers (NViT, CVPR 2023).

The public names below load on first use. Importing nvit registers the NViT family with timm
(``timm.create_model("local-dir:SAVED_FOLDER", pretrained=True)``; see nvit/timm_family.py).
"""
import importlib

from . import timm_family  # noqa: F401  (timm.create_model("nvit" / "local-dir:…") builds NViT models)

_EXPORTS = {
    "load": "io", "save": "io",
    "BlockConfig": "model", "NViT": "model", "NViTConfig": "model", "set_drop_path": "model",
    "NViTSwin": "model_swin", "NViTSwinConfig": "model_swin",
    "Pruner": "pruner", "Target": "pruner", "TargetUnreachableError": "pruner", "NoSaliencyError": "pruner",
    "Masks": "structures", "UnsupportedModelError": "structures", "Adapter": "structures",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nvit' has no attribute {name!r}")

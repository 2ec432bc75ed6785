"""nvit: global, latency-aware Hessian pruning of Vision Transformers (NViT, CVPR 2023).

The public names below load on first use, so `import nvit.model` (or nvit.datasets) stays light.
"""
import importlib

_EXPORTS = {
    "load": "io", "save": "io",
    "BlockConfig": "model", "NViT": "model", "NViTConfig": "model",
    "Pruner": "pruner", "Target": "pruner", "TargetUnreachableError": "pruner",
    "Masks": "structures", "UnsupportedModelError": "structures", "ViTAdapter": "structures",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nvit' has no attribute {name!r}")

"""The model families nvit prunes: one module each, declaring its structures (see nvit.spec).

A new family is one module with a :class:`~nvit.spec.Family` subclass, added to FAMILIES (or passed
to :func:`family_of` by the caller)."""
from __future__ import annotations

import torch.nn as nn

from ..spec import Family, UnsupportedModelError
from .eva import EvaFamily
from .swin import SwinFamily
from .vit import ViTFamily

FAMILIES: list[type[Family]] = [ViTFamily, EvaFamily, SwinFamily]


def family_of(model: nn.Module, families: list[type[Family]] | None = None) -> Family:
    """The family declaration of `model`, checked: an UnsupportedModelError names every module it
    cannot prune exactly (raised before any data is read)."""
    for cls in families or FAMILIES:
        if cls.matches(model):
            fam = cls(model)
            bad = fam.problems()
            if bad:
                raise UnsupportedModelError("nvit cannot prune these modules exactly: " + "; ".join(bad))
            return fam
    names = ", ".join(c.name for c in families or FAMILIES)
    raise UnsupportedModelError(
        f"nvit prunes timm VisionTransformer (vit_*, deit_*), timm Eva (eva02_*), timm SwinTransformer (swin_*) and "
        f"NViT models (families: "
        f"{names}); got {type(model).__name__}")

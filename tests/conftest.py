"""Fixtures shared by the CLI test modules."""
import pytest
import torch

import nvit
from nvit.structures import Adapter


@pytest.fixture(scope="session")
def tiny_nvit(tmp_path_factory):
    """A tiny 1×28×28 model saved as an NViT model (so the CLI runs on the embedded data)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=24, depth=2,
                          num_heads=3, mlp_ratio=2).eval()
    a = Adapter(m)
    path = tmp_path_factory.mktemp("models") / "tiny"
    nvit.save(a.convert(a.full_masks()), path)
    return path

"""nvit's embedded default model: a small DeiT-style timm VisionTransformer pretrained on the embedded
Fashion-MNIST subset (nvit/data/fashion_vit.safetensors, made by `python -m nvit.pretrain`)."""
from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "fashion_vit.safetensors"

# timm VisionTransformer kwargs. 28/4 = 7x7 patches + class token = 50 tokens; head dim 128/4 = 32; ~1.2 M params.
EMBEDDED_MODEL: dict = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    qkv_bias=True,
    class_token=True,
    global_pool="token",
)


def build_model(**overrides) -> VisionTransformer:
    """EMBEDDED_MODEL with overrides, randomly initialised (uses the global torch RNG)."""
    unknown = set(overrides) - set(VisionTransformer.__init__.__code__.co_varnames)
    if unknown:
        raise TypeError(f"unknown VisionTransformer arguments {sorted(unknown)}")
    return VisionTransformer(**{**EMBEDDED_MODEL, **overrides})


def load_weights(model: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Loads a safetensors state dict (any float dtype, cast to the model's dtype) strictly; returns its metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights {path} not found; make them with "
                                f"`python -m nvit.pretrain --out {path}` (see nvit/data/README.md)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a bad header / truncated file
        raise ValueError(f"weights {path} are corrupt or not a safetensors file ({type(e).__name__}: {e})") from e
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"weights {path} do not match the model: shape mismatch for {bad[:5]}")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return meta


def create_embedded_model(pretrained: bool = True, weights: str | Path | None = None) -> VisionTransformer:
    """The embedded model; with pretrained=True it loads the shipped fp16 weights as fp32 and is in eval mode."""
    model = build_model()
    if pretrained:
        load_weights(model, weights if weights is not None else WEIGHTS_PATH)
        model.eval()
    return model

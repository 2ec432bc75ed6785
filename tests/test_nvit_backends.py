"""A converted NViT model (uneven per-head dims) gives the same outputs through every attention backend."""
import os
import subprocess
import sys

import pytest
import torch

from nvit.structures import Adapter
from nvit_kernels import dispatch
from nvit_kernels.dispatch import use_backend
from _vit_factory import random_masks, tiny_vit


def _converted(seed=0, embed_dim=24, depth=2, img_size=16):
    model = tiny_vit("plain", embed_dim=embed_dim, depth=depth, num_heads=3, img_size=img_size, seed=seed)
    a = Adapter(model)
    M = random_masks(a, "per-head", seed)
    a.install_norms(M)
    a.apply_masks(M)
    nv = a.convert(M)
    assert len({d for b in nv.config.blocks for d in b.qk_dims}) > 1  # really uneven
    return model, nv


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_nvit_model_same_outputs_per_backend(backend):
    masked, nv = _converted()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = masked(x)
        with use_backend(backend):
            out = nv(x)
    assert (out - ref).abs().max().item() <= 1e-5


def test_nvit_model_trains_through_the_op():
    _, nv = _converted(1)
    nv.train()
    x = torch.randn(2, 3, 16, 16)
    grads = {}
    for backend in ("cpp", "reference"):
        nv.zero_grad()
        with use_backend(backend):
            nv(x).square().sum().backward()
        grads[backend] = nv.blocks[0].attn.qkv.weight.grad.clone()
    assert torch.allclose(grads["cpp"], grads["reference"], rtol=1e-4, atol=1e-5)


def _triton_check():
    masked, nv = _converted(2, embed_dim=12, depth=1, img_size=8)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), use_backend("triton"):
        err = (nv(x) - masked(x)).abs().max().item()
    assert err <= 1e-5, err
    print("ok", err)


@pytest.mark.skipif(not dispatch.triton_status()[0], reason=dispatch.triton_status()[1])
def test_nvit_model_through_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_nvit_backends as t; t._triton_check()"
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

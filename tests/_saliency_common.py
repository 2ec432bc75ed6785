"""Shared cases and checks of the saliency tests (test_saliency.py, test_saliency_triton.py)."""
from __future__ import annotations

import torch

from nvit_kernels.saliency import saliency_reference
import timm

from nvit.model import BlockConfig, NViT, NViTConfig
from nvit.structures import Adapter
from nvit_kernels.saliency import TensorMap


def _ids(n: int, lo: int, hi: int, g: torch.Generator, none_frac: float = 0.2) -> torch.Tensor:
    """n unit ids in [lo, hi) with about none_frac of them -1."""
    m = torch.randint(lo, hi, (n,), generator=g, dtype=torch.int32)
    m[torch.rand(n, generator=g) < none_frac] = -1
    return m


def odd_maps(seed: int = 0, big: bool = True) -> tuple[list[TensorMap], list[tuple[int, ...]], int]:
    """Awkward shapes and maps: non-powers of two, single rows/columns, 1-element tensors, many small
    tensors, several row and column maps on one tensor, unit sums spanning tensors, elements feeding
    several units. Returns (maps, original shapes, num_units)."""
    g = torch.Generator().manual_seed(seed)
    U = 53
    spec: list[tuple[tuple[int, ...], int, int, int, int]] = [
        # (original shape, rows, cols, n row maps, n col maps)
        ((7, 13), 7, 13, 1, 1),
        ((1,), 1, 1, 1, 1),
        ((1, 1, 1), 1, 1, 0, 1),
        ((37,), 37, 1, 1, 0),         # column vector: row map
        ((37, 1), 37, 1, 1, 1),       # column vector with a column map (1 id)
        ((1, 1, 45), 1, 45, 0, 1),    # token-like: one row, column map
        ((3, 5, 7), 15, 7, 2, 1),     # 3-D parameter, two row maps
        ((33, 2, 3, 3), 33, 18, 1, 2),  # conv-like
        ((197, 19), 197, 19, 0, 1),   # N = 197 rows
        ((2, 4099), 2, 4099, 1, 1),   # column block split on the CPU, partial column tiles on GPUs
        ((9,), 9, 1, 0, 0),           # feeds no unit
    ]
    if big:
        spec += [((70, 4100), 70, 4100, 1, 1), ((140_001,), 140_001, 1, 1, 1), ((300, 1000), 300, 1000, 1, 1)]
    spec += [((3, 5), 3, 5, 1, 1)] * 40  # many small tensors
    maps, shapes = [], []
    for shape, R, C, nr, nc in spec:
        rm = [_ids(R, 0, U, g) for _ in range(nr)]
        cm = [_ids(C, 0, U, g) for _ in range(nc)]
        maps.append(TensorMap(R, C, rm, cm))
        shapes.append(shape)
    return maps, shapes, U


def mini_vit_maps(granularity: str = "aligned", blocks: int = 12):
    """A tiny distilled NViT with 12 blocks (the embedding units span all of them), uneven dims and
    LayerScale for per-head; maps as the ViT family declares them."""
    if granularity == "aligned":
        b = [BlockConfig([4, 4], [3, 3], 11, [0.5, 0.5]) for _ in range(blocks)]
    else:
        b = [BlockConfig([2, 5, 3], [3, 1, 2], 7 + i, [0.5] * 3) for i in range(blocks)]
    cfg = NViTConfig(img_size=4, patch_size=2, in_chans=3, num_classes=7, embed_dim=10, blocks=b, dist_token=True,
                     layer_scale=granularity != "aligned")
    named, ui = Adapter(NViT(cfg)).saliency_maps(granularity)
    return [m for _, m in named], ui.num_units


def deit_case(name: str = "tiny", granularity: str = "aligned"):
    """The maps of DeiT-{tiny,small,base} at 224²."""
    model = timm.create_model(f"deit_{name}_patch16_224")
    named, ui = Adapter(model).saliency_maps(granularity)
    return [m for _, m in named], ui.num_units


def make_tensors(maps, dtype=torch.float32, seed=0, shapes=None, device="cpu"):
    """Random weights and grads for `maps` (original shapes when given, else [rows, cols]); grads are
    scaled down like real ones so the products are not all of one size."""
    g = torch.Generator().manual_seed(seed)
    ws, gs = [], []
    for i, m in enumerate(maps):
        shape = shapes[i] if shapes is not None else (m.rows, m.cols)
        ws.append(torch.randn(shape, generator=g).to(dtype).to(device))
        gs.append((torch.randn(shape, generator=g) * 1e-2).to(dtype).to(device))
    return ws, gs


def abs_sums(weights, grads, maps, num_units) -> torch.Tensor:
    """float64 Σ|w·g| per unit: the scale of a unit's rounding error."""
    acc = torch.zeros(num_units + 1, dtype=torch.float64)
    for w, gr, tm in zip(weights, grads, maps):
        p = (w.detach().double().cpu() * gr.detach().double().cpu()).abs().reshape(tm.rows, tm.cols)
        for m, s in [(m, p.sum(1)) for m in tm.row_maps] + [(m, p.sum(0)) for m in tm.col_maps]:
            m = m.long()
            acc.index_add_(0, torch.where(m < 0, num_units, m), s)
    return acc[:num_units]


def assert_scores_close(scores, expected, weights, grads, maps, num_units, rel=3e-5, calls=1, scale=None):
    """|ŝ² − s²| within (2|s| + δ)·δ, δ = rel·Σ|w·g| (·calls): fp32 sums of n terms err ≲ n^½·ε·Σ|w·g|.
    `scale`: abs_sums(...) when the caller already has it."""
    scores = scores.detach().double().cpu()
    expected = expected.double().cpu()
    if scale is None:
        scale = abs_sums(weights, grads, maps, num_units)
    delta = rel * scale * calls + 1e-30
    s = expected.sqrt()
    tol = (2 * s + delta) * delta + 1e-6 * expected.abs()
    err = (scores - expected).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())}/{num_units} units off; worst unit {int((err / tol).argmax())}: "
                           f"got {scores[(err / tol).argmax()].item()} want {expected[(err / tol).argmax()].item()}")


def reference(weights, grads, maps, num_units):
    return saliency_reference(weights, grads, maps, num_units)

"""Adding a model family is one declaration: a toy transformer (separate q/k/v Linears, a token
embedding instead of patches, its own cost formula) defined in this file alone is scored, pruned by
the Pruner and converted exactly -- nothing in nvit knows it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nvit import Pruner, Target
from nvit.model import BlockConfig
from nvit.spec import ATTN_BRANCH, EMBED, HEAD, MLP, MLP_BRANCH, QK, V, BlockDims, Dims, Family, Slice
from nvit.structures import Adapter, KeptLayerNorm
from _gates import (assert_saliency_equals_gate_derivatives, attn_out_gate, loss_with_hooks, make_gates,
                    per_column, times, times_input)
from _vit_factory import random_masks
from _pruning import prune_until_done

FEATURES, TOKENS, CLASSES = 7, 5, 3


@dataclass
class ToyConfig:
    embed_dim: int
    blocks: list[BlockConfig]
    family: str = "toy"
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in self.blocks]

    def to_dict(self) -> dict:
        return asdict(self)


class ToyBlock(nn.Module):
    def __init__(self, D: int, c: BlockConfig):
        super().__init__()
        self.c = c
        if c.has_attn:
            self.norm1 = nn.LayerNorm(D)
            self.q, self.k = nn.Linear(D, sum(c.qk_dims)), nn.Linear(D, sum(c.qk_dims))
            self.v = nn.Linear(D, sum(c.v_dims))
            self.o = nn.Linear(sum(c.v_dims), D)
        if c.has_mlp:
            self.norm2 = nn.LayerNorm(D)
            self.fc1, self.fc2 = nn.Linear(D, c.mlp), nn.Linear(c.mlp, D)

    def forward(self, x):
        c = self.c
        if c.has_attn:
            h = self.norm1(x)
            qs, ks, vs = (t.split(d, -1) for t, d in ((self.q(h), c.qk_dims), (self.k(h), c.qk_dims), (self.v(h), c.v_dims)))
            heads = [F.softmax(q @ k.transpose(-1, -2) * s, -1) @ v for q, k, v, s in zip(qs, ks, vs, c.scales)]
            x = x + self.o(torch.cat(heads, -1))
        if c.has_mlp:
            x = x + self.fc2(F.relu(self.fc1(self.norm2(x))))
        return x


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Linear(FEATURES, cfg.embed_dim)
        self.blocks = nn.ModuleList(ToyBlock(cfg.embed_dim, b) for b in cfg.blocks)
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(1))


class ToyFamily(Family):
    """The toy's structures: everything nvit needs to score, prune, cost and convert it."""

    name = "toy"

    @classmethod
    def matches(cls, model):
        return isinstance(model, Toy)

    def dims(self):
        return Dims(self.model.config.embed_dim,
                    [BlockDims(list(b.qk_dims), list(b.v_dims), b.mlp) for b in self.model.config.blocks])

    def slices(self, dims):
        D = torch.arange(dims.embed)
        out = [Slice(n, 0, EMBED, -1, D, writes=True) for n in ("embed.weight", "embed.bias", "norm.weight", "norm.bias")]
        out.append(Slice("head.weight", -1, EMBED, -1, D))
        for b, bd in enumerate(dims.blocks):
            p = f"blocks.{b}."
            qh = torch.cat([torch.full((n,), h) for h, n in enumerate(bd.qk_units)])
            qd = torch.cat([torch.arange(n) for n in bd.qk_units])
            vh = torch.cat([torch.full((n,), h) for h, n in enumerate(bd.v_dims)])
            vd = torch.cat([torch.arange(n) for n in bd.v_dims])
            M, zero = torch.arange(bd.mlp), torch.zeros(dims.embed, dtype=torch.long)
            for n in ("weight", "bias"):
                out += [Slice(p + "q." + n, 0, QK, b, qd, qh, writes=True), Slice(p + "q." + n, 0, HEAD, b, qh),
                        Slice(p + "k." + n, 0, QK, b, qd, qh), Slice(p + "k." + n, 0, HEAD, b, qh),
                        Slice(p + "v." + n, 0, V, b, vd, vh), Slice(p + "v." + n, 0, HEAD, b, vh),
                        Slice(p + "fc1." + n, 0, MLP, b, M),
                        Slice(p + "norm1." + n, 0, EMBED, -1, D, writes=True),
                        Slice(p + "norm2." + n, 0, EMBED, -1, D, writes=True)]
                for w, branch in (("o", ATTN_BRANCH), ("fc2", MLP_BRANCH)):
                    out += [Slice(p + w + "." + n, 0, EMBED, -1, D, writes=True),
                            Slice(p + w + "." + n, 0, branch, b, zero, writes=True)]
            out += [Slice(p + "o.weight", -1, HEAD, b, vh, writes=True), Slice(p + "o.weight", -1, V, b, vd, vh, writes=True),
                    Slice(p + "fc2.weight", -1, MLP, b, M, writes=True)]
            out += [Slice(p + n + ".weight", -1, EMBED, -1, D) for n in ("q", "k", "v", "fc1")]
        return out

    def embed_norms(self):
        return [(b, n) for b in self.model.blocks for n in ("norm1", "norm2")] + [(self.model, "norm")]

    def scales(self):
        return [list(b.scales) for b in self.model.config.blocks]

    def config(self, masks, provenance=None):
        blocks = []
        for b, c in enumerate(self.model.config.blocks):
            alive = masks.heads[b].nonzero().flatten().tolist()
            blocks.append(BlockConfig([int(masks.qk[b][h].sum()) for h in alive], [int(masks.v[b][h].sum()) for h in alive],
                                      int(masks.mlp[b].sum()), [c.scales[h] for h in alive]))
        return ToyConfig(int(masks.embed.sum()), blocks, provenance=provenance or {})

    def build(self, config):
        return Toy(config)

    def cost(self, metric, config):
        D = config.embed_dim
        stem = (FEATURES + 1) * D + 2 * D + (D + 1) * CLASSES
        if metric == "flops":
            stem = 2 * TOKENS * FEATURES * D + 2 * D * CLASSES
        return float(stem + sum(self.block_cost(metric, config, b) for b in config.blocks))

    def block_cost(self, metric, config, b):
        D, Sq, Sv = config.embed_dim, sum(b.qk_dims), sum(b.v_dims)
        if metric == "flops":
            attn = 2 * TOKENS * D * (2 * Sq + Sv) + 2 * TOKENS * Sv * D + 2 * TOKENS * TOKENS * (Sq + Sv)
            mlp = 4 * TOKENS * D * b.mlp
        else:
            attn = (D + 1) * (2 * Sq + Sv) + (Sv + 1) * D + 2 * D
            mlp = (D + 1) * b.mlp + (b.mlp + 1) * D + 2 * D
        return float((attn if b.has_attn else 0) + (mlp if b.has_mlp else 0))


def toy(seed=0) -> Toy:
    torch.manual_seed(seed)
    cfg = ToyConfig(12, [BlockConfig([3, 2], [2, 4], 9, [0.6, 0.7]), BlockConfig([2, 2, 3], [3, 1, 2], 6, [0.5] * 3)])
    m = Toy(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3).add_(1.0 if p.dim() == 1 and p.numel() == 12 else 0.0)
    return m.double().eval()


def _gated_loss(model, a, gates, x, y):
    """Loss with the gates (_gates.make_gates) inserted by hooks: the embedding's on the embedding, each
    LayerNorm and each branch's output; a branch's on its output; QK on q's output; head and V on o's
    input; MLP on fc2's input."""
    ge = gates["embed"][-1]
    hooks = [model.embed.register_forward_hook(times(ge)), model.norm.register_forward_hook(times(ge))]
    for b, (blk, bd) in enumerate(zip(model.blocks, a.dims.blocks)):
        gb = gates[b]
        hooks += [blk.norm1.register_forward_hook(times(ge)), blk.norm2.register_forward_hook(times(ge)),
                  blk.o.register_forward_hook(times(ge * gb["attn_branch"])),
                  blk.fc2.register_forward_hook(times(ge * gb["mlp_branch"])),
                  blk.q.register_forward_hook(times(per_column(gb["qk"], bd.qk_units))),
                  blk.o.register_forward_pre_hook(times_input(attn_out_gate(gb, bd.v_dims))),
                  blk.fc2.register_forward_pre_hook(times_input(gb["mlp"]))]
    return loss_with_hooks(model, hooks, x, y)


def test_toy_saliency_equals_gate_derivatives():
    model = toy()
    a = Adapter(model, ToyFamily(model))
    pairs, units = a.saliency_maps("per-head", branches=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, TOKENS, FEATURES, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (4,), generator=g)
    gates = make_gates(a.dims, "per-head")  # uneven heads: a head's gates are the first of its row
    assert_saliency_equals_gate_derivatives(model, pairs, units, gates, _gated_loss(model, a, gates, x, y),
                                            rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("gran", ["aligned", "per-head"])
def test_toy_prunes_and_converts_exactly(gran):
    torch.manual_seed(0)
    cfg = ToyConfig(16, [BlockConfig([4, 4], [3, 3], 20, [0.5, 0.5]) for _ in range(2)])
    model = Toy(cfg).eval()
    pruner = Pruner(model, Target("flops", 0.5), granularity=gran, family=ToyFamily, branches=True)
    assert pruner.dense_cost["flops"] > 0
    x, y = torch.randn(8, TOKENS, FEATURES), torch.randint(0, CLASSES, (8,))
    prune_until_done(pruner, model, x, y, 6)
    small = pruner.convert()
    assert isinstance(small, Toy) and pruner.fraction() <= 0.5
    assert ToyFamily(small).cost("params", small.config) == sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max().item() <= 1e-5


def test_toy_random_masks_convert_exactly_with_branches():
    model = toy()
    a = Adapter(model, ToyFamily(model))
    M = random_masks(a, "per-head", 1, branches=True)
    a.install_norms(M)
    a.apply_masks(M)
    assert isinstance(model.norm, KeptLayerNorm)
    small = a.convert(M)
    x = torch.randn(3, TOKENS, FEATURES, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max().item() <= 1e-10
    assert not small.config.blocks[0].has_attn and not small.config.blocks[-1].has_mlp

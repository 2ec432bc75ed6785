"""Explicit gates, shared by every family's saliency test (ViT, EVA, Swin, the toy): a unit's saliency is
the squared derivative of the loss with respect to a multiplicative gate on that unit (all gates 1,
float64). A test builds the gates (`make_gates`), inserts them into its model with forward hooks (the
helpers below) and hands the gated loss to `assert_saliency_equals_gate_derivatives`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nvit.spec import ATTN_BRANCH, EMBED, HEAD, MLP, MLP_BRANCH, QK, V
from nvit_kernels.saliency import saliency_reference

KINDS = (EMBED, HEAD, QK, V, MLP, ATTN_BRANCH, MLP_BRANCH)


def ones(*shape):
    return torch.ones(shape, dtype=torch.float64, requires_grad=True)


def make_gates(dims, gran):
    """All-one gates for the units of `dims` (an Adapter's Dims): gates["embed"][key] one per channel of each
    embedding (key -1 for one stream, the stage for one per stage, as the EMBED units' block); gates[b]:
    "head" [H], "qk" and "v" [H, n] per head (n: the widest head's units) or [n] shared by the heads
    (aligned), "mlp" [M], and one scalar per branch ("attn_branch", "mlp_branch")."""
    gates = {"embed": {key: ones(width) for key, width in dims.embed_stages()}}
    for b, bd in enumerate(dims.blocks):
        H = bd.heads
        per_head = lambda widths: ones(H, max(widths)) if gran == "per-head" else ones(widths[0])  # noqa: E731
        gates[b] = {"head": ones(H), "qk": per_head(bd.qk_units), "v": per_head(bd.v_dims), "mlp": ones(bd.mlp),
                    "attn_branch": ones(), "mlp_branch": ones()}
    return gates


def per_column(gate, widths):
    """A per-head [H, n] or aligned [n] gate as one gate per column of the heads side by side (head h's
    `widths[h]` columns)."""
    return torch.cat([(gate[h] if gate.dim() == 2 else gate)[:w] for h, w in enumerate(widths)])


def attn_out_gate(gb, v_widths):
    """Gate per column of the attention output (the output projection's input): its head's gate times its
    V dim's gate."""
    return gb["head"].repeat_interleave(torch.tensor(v_widths)) * per_column(gb["v"], v_widths)


def times(gate):
    """A forward hook multiplying a module's output by `gate`."""
    return lambda mod, inp, out: out * gate


def times_input(gate):
    """A forward pre-hook multiplying a module's (first) input by `gate`."""
    return lambda mod, args: (args[0] * gate, *args[1:])


def loss_with_hooks(model, hooks, x, y):
    """Cross-entropy of model(x) with the hooks' handles in place; they are removed afterwards."""
    try:
        return F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()


def gate_grad(gates, kind, block, head, index):
    """d loss / d gate of one unit."""
    if kind == EMBED:
        return gates["embed"][block].grad[index]
    gb = gates[block]
    if kind in (ATTN_BRANCH, MLP_BRANCH):
        return gb["attn_branch" if kind == ATTN_BRANCH else "mlp_branch"].grad
    if kind in (HEAD, MLP):
        return gb["head" if kind == HEAD else "mlp"].grad[index]
    g = gb["qk" if kind == QK else "v"].grad
    return g[head, index] if head >= 0 else g[index]


def assert_saliency_equals_gate_derivatives(model, pairs, units, gates, loss, rtol=1e-5, atol=None):
    """Back-propagates `loss` (the gated model's), then: the saliency sums of `pairs` (an Adapter's
    saliency maps with branches) equal the squared gate derivatives, unit by unit, within rtol and atol
    (default 1e-8 of the largest); every kind of unit is present with a non-zero score. Returns the
    expected scores."""
    model.zero_grad()
    loss.backward()
    params = [p for p, _ in pairs]
    got = saliency_reference([p.detach() for p in params], [p.grad for p in params], [t for _, t in pairs],
                             units.num_units)
    expect = torch.stack([gate_grad(gates, *(int(t[u]) for t in (units.kind, units.block, units.head, units.index)))
                          for u in range(units.num_units)]) ** 2
    scale = float(expect.abs().max())
    assert scale > 0
    assert torch.allclose(got, expect, rtol=rtol, atol=1e-8 * scale if atol is None else atol)
    for k in KINDS:
        assert float(expect[units.kind == k].abs().sum()) > 0, k
    return expect

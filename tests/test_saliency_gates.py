"""The saliency sums of every structure kind equal the derivative of the loss with respect to an
explicit multiplicative gate on that structure (float64, ≤1e-5 relative) -- for the embedding, ONE
gate per channel applied at every write into the residual stream and every read from it. Then the
fused op (fp32) matches the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from nvit_kernels.saliency import SaliencyPlan, saliency_accumulate, saliency_reference
from nvit.spec import ATTN_BRANCH, EMBED, HEAD, MLP, MLP_BRANCH, QK, V
from nvit.structures import Adapter
from _vit_factory import tiny_vit

GRANS = ["aligned", "per-head"]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (3,), generator=g)


def _gated_loss(model, gran, gates, x, y):
    """Loss of `model` with gates inserted by hooks; gates[b] = dict(head=[H], qk=..., v=..., mlp=[M]),
    gates["embed"] = [D]: one gate per embedding channel on every write into the stream (the embedding
    stage's output, each branch's output after LayerScale) and every read from it (each LayerNorm's
    output; the classifier's input where no final norm sits before it)."""
    ge = gates["embed"]

    def times_embed(mod, inp, out):
        return out * ge

    def embed_pre(mod, args):
        return (args[0] * ge,)

    hooks = [model.norm_pre.register_forward_hook(times_embed)]  # the stream as the blocks first see it
    final = [n for n in ("norm", "fc_norm") if not isinstance(getattr(model, n), torch.nn.Identity)]
    hooks += [getattr(model, n).register_forward_hook(times_embed) for n in final]
    if not final:
        hooks += [getattr(model, n).register_forward_pre_hook(embed_pre) for n in ("head", "head_dist")
                  if hasattr(model, n)]
    for b, blk in enumerate(model.blocks):
        hooks += [getattr(blk, n).register_forward_hook(times_embed) for n in ("norm1", "norm2", "ls1", "ls2")]
        for n, key in (("ls1", "attn_branch"), ("ls2", "mlp_branch")):  # a gate on what the branch adds
            hooks.append(getattr(blk, n).register_forward_hook(lambda mod, i, out, gb=gates[b], key=key: out * gb[key]))
    for b, blk in enumerate(model.blocks):
        a, H, d = blk.attn, blk.attn.num_heads, blk.attn.head_dim
        gb = gates[b]

        def qkv_hook(mod, inp, out, gb=gb, H=H, d=d):
            q, rest = out[..., : H * d], out[..., H * d:]
            gq = gb["qk"].reshape(1, 1, -1) if gran == "per-head" else gb["qk"].repeat(H).reshape(1, 1, -1)
            return torch.cat([q * gq, rest], dim=-1)  # gate on q_j scales the term q_j·k_j of the logits

        def proj_pre(mod, args, gb=gb, H=H, d=d):
            gv = gb["v"].reshape(-1) if gran == "per-head" else gb["v"].repeat(H)
            return (args[0] * gb["head"].repeat_interleave(d) * gv,)

        def fc2_pre(mod, args, gb=gb):
            return (args[0] * gb["mlp"],)

        hooks += [a.qkv.register_forward_hook(qkv_hook), a.proj.register_forward_pre_hook(proj_pre),
                  blk.mlp.fc2.register_forward_pre_hook(fc2_pre)]
    try:
        return F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("variant", ["plain", "layerscale_nobias", "distilled", "reg_avg_fcnorm", "dinov2_reg",
                                     "clip_prenorm", "no_final_norm"])
@pytest.mark.parametrize("gran", GRANS)
def test_saliency_equals_gate_derivative(variant, gran):
    torch.manual_seed(0)
    model = tiny_vit(variant, dtype=torch.float64)
    a = Adapter(model)
    pairs, units = a.saliency_maps(gran, branches=True)
    x, y = _batch()
    gates = {"embed": torch.ones(model.embed_dim, dtype=torch.float64, requires_grad=True)}
    for b, blk in enumerate(model.blocks):
        H, d, M = blk.attn.num_heads, blk.attn.head_dim, blk.mlp.fc1.out_features
        shape = (H, d) if gran == "per-head" else (d,)
        gates[b] = {k: torch.ones(s, dtype=torch.float64, requires_grad=True)
                    for k, s in (("head", (H,)), ("qk", shape), ("v", shape), ("mlp", (M,)),
                                 ("attn_branch", ()), ("mlp_branch", ()))}
    model.zero_grad()
    loss = _gated_loss(model, gran, gates, x, y)
    loss.backward()

    params = [p for p, _ in pairs]
    got = saliency_reference([p.detach() for p in params], [p.grad for p in params], [t for _, t in pairs],
                             units.num_units)
    expect = torch.zeros(units.num_units, dtype=torch.float64)
    kind, block, head, index = units.kind, units.block, units.head, units.index
    for u in range(units.num_units):
        k, b, h, i = int(kind[u]), int(block[u]), int(head[u]), int(index[u])
        if k == EMBED:
            continue
        gb = gates[b]
        if k in (ATTN_BRANCH, MLP_BRANCH):
            expect[u] = gb["attn_branch" if k == ATTN_BRANCH else "mlp_branch"].grad ** 2
        elif k == HEAD:
            expect[u] = gb["head"].grad[i] ** 2
        elif k == MLP:
            expect[u] = gb["mlp"].grad[i] ** 2
        else:
            gg = gb["qk" if k == QK else "v"].grad
            expect[u] = (gg[h, i] if h >= 0 else gg[i]) ** 2
    emb = gates["embed"].grad
    expect[kind == EMBED] = emb[index[kind == EMBED]] ** 2
    scale = expect.abs().max()
    assert scale > 0
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5 * float(scale) * 1e-3)
    # every kind is present and non-trivial
    for k in (EMBED, HEAD, QK, V, MLP, ATTN_BRANCH, MLP_BRANCH):
        assert float(expect[kind == k].abs().sum()) > 0


@pytest.mark.parametrize("gran", GRANS)
def test_fused_op_matches_reference_on_model(gran):
    model = tiny_vit("plain")
    a = Adapter(model)
    pairs, units = a.saliency_maps(gran)
    x, y = _batch(1)
    F.cross_entropy(model(x.float()), y).backward()
    params = [p for p, _ in pairs]
    w, g = [p.detach() for p in params], [p.grad for p in params]
    plan = SaliencyPlan.build([t for _, t in pairs], units.num_units)
    scores = torch.zeros(units.num_units)
    saliency_accumulate(w, g, plan, scores)
    ref = saliency_reference([t.double() for t in w], [t.double() for t in g], [t for _, t in pairs], units.num_units)
    assert torch.allclose(scores.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.max()))

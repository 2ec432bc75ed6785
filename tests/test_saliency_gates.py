"""The saliency sums of every structure kind equal the derivative of the loss with respect to an
explicit multiplicative gate on that structure (float64, ≤1e-5 relative) -- for the embedding, ONE
gate per channel applied at every write into the residual stream and every read from it. Then the
fused op (fp32) matches the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from nvit_kernels.saliency import SaliencyPlan, saliency_accumulate, saliency_reference
from nvit.structures import Adapter
from _gates import (assert_saliency_equals_gate_derivatives, attn_out_gate, loss_with_hooks, make_gates,
                    per_column, times, times_input)
from _vit_factory import tiny_vit

GRANS = ["aligned", "per-head"]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (3,), generator=g)


def _gated_loss(model, a, gates, x, y):
    """Loss of `model` with the gates (_gates.make_gates) inserted by hooks: one gate per embedding channel
    on every write into the stream (the embedding stage's output, each branch's output after LayerScale)
    and every read from it (each LayerNorm's output; the classifier's input where no final norm sits
    before it)."""
    ge = gates["embed"][-1]
    hooks = [model.norm_pre.register_forward_hook(times(ge))]  # the stream as the blocks first see it
    final = [n for n in ("norm", "fc_norm") if not isinstance(getattr(model, n), torch.nn.Identity)]
    hooks += [getattr(model, n).register_forward_hook(times(ge)) for n in final]
    if not final:
        hooks += [getattr(model, n).register_forward_pre_hook(times_input(ge)) for n in ("head", "head_dist")
                  if hasattr(model, n)]
    for b, (blk, bd) in enumerate(zip(model.blocks, a.dims.blocks)):
        gb, H, d = gates[b], blk.attn.num_heads, blk.attn.head_dim
        hooks += [getattr(blk, n).register_forward_hook(times(ge)) for n in ("norm1", "norm2")]
        hooks += [blk.ls1.register_forward_hook(times(ge * gb["attn_branch"])),  # what each branch adds
                  blk.ls2.register_forward_hook(times(ge * gb["mlp_branch"]))]

        def qkv_hook(mod, inp, out, gb=gb, H=H, d=d, widths=bd.qk_units):
            q, rest = out[..., : H * d], out[..., H * d:]
            return torch.cat([q * per_column(gb["qk"], widths), rest], dim=-1)  # q_j's gate scales q_j·k_j

        hooks += [blk.attn.qkv.register_forward_hook(qkv_hook),
                  blk.attn.proj.register_forward_pre_hook(times_input(attn_out_gate(gb, bd.v_dims))),
                  blk.mlp.fc2.register_forward_pre_hook(times_input(gb["mlp"]))]
    return loss_with_hooks(model, hooks, x, y)


@pytest.mark.parametrize("variant", ["plain", "layerscale_nobias", "distilled", "reg_avg_fcnorm", "dinov2_reg",
                                     "clip_prenorm", "no_final_norm"])
@pytest.mark.parametrize("gran", GRANS)
def test_saliency_equals_gate_derivative(variant, gran):
    torch.manual_seed(0)
    model = tiny_vit(variant, dtype=torch.float64)
    a = Adapter(model)
    pairs, units = a.saliency_maps(gran, branches=True)
    gates = make_gates(a.dims, gran)
    assert_saliency_equals_gate_derivatives(model, pairs, units, gates, _gated_loss(model, a, gates, *_batch()))


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

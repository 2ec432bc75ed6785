"""The Triton attention kernels under TRITON_INTERPRET=1 (CPU), in a subprocess.

The interpreter must be switched on before triton compiles anything, and other test modules may
already have imported triton in this process, so the checks run in a fresh interpreter: this file
run as a script. Tiny shapes, fp32/fp16 only (bf16 is wrong in the interpreter); bias/mask cases too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nvit_kernels import dispatch  # noqa: E402

if not dispatch.triton_status()[0]:
    pytest.skip(dispatch.triton_status()[1], allow_module_level=True)


def _run_checks() -> list[dict]:
    import math

    import torch
    import torch.nn.functional as F

    from nvit_kernels import dispatch, triton_attention
    from nvit_kernels.attention import uneven_attention, uneven_attention_reference

    assert dispatch.triton_interpreter()
    results = []

    def stock(x, qk, vd, sc):  # per-head SDPA in x's dtype: the error budget
        outs, o = [], 0
        for a, c, s in zip(qk, vd, sc):
            outs.append(F.scaled_dot_product_attention(x[..., o:o + a], x[..., o + a:o + 2 * a],
                                                       x[..., o + 2 * a:o + 2 * a + c], scale=s))
            o += 2 * a + c
        return torch.cat(outs, -1)

    # The last case spans three (pow2 QK, pow2 V) buckets, so it also runs bucketed. The backward (three
    # launches, slow in the interpreter) runs on the multi-tile cases only.
    cases = [([1, 3, 17], [3, 1, 20], 1, 1), ([1, 3, 17], [3, 1, 20], 2, 19), ([5, 33, 2], [40, 2, 7], 1, 17)]
    for dtype in (torch.float32, torch.float16):
        for ci, (qk, vd, b, n) in enumerate(cases):
            g = torch.Generator().manual_seed(b * 100 + n)
            x = (torch.randn(b, n, sum(2 * a + c for a, c in zip(qk, vd)), generator=g, dtype=torch.float64)
                 * 1.5).to(dtype)
            sc = [1 / math.sqrt(a) for a in qk]
            ref = uneven_attention_reference(x, qk, vd, sc)
            base = (stock(x, qk, vd, sc).double() - ref).abs().max().item()
            tol = max(2 * base, 4 * torch.finfo(dtype).eps)
            for bucketed in ((False, True) if ci == 2 else (False,)):
                out = triton_attention.forward(x, qk, vd, sc, bucketed=bucketed)
                err = (out.double() - ref).abs().max().item()
                results.append(dict(case=f"fwd {dtype} qk={qk} v={vd} B={b} N={n} bucketed={bucketed}",
                                    err=err, tol=tol, ok=err <= tol and out.dtype == dtype))
            if ci == 0 or (dtype == torch.float16 and ci == 1):
                continue
            # Backward through the public op (dispatch forced to triton) vs float64 autograd.
            gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            x64 = x.double().requires_grad_()
            uneven_attention_reference(x64, qk, vd, sc).backward(gout)
            xt = x.clone().requires_grad_()
            with dispatch.use_backend("triton"):
                out = uneven_attention(xt, qk, vd, sc)
                out.backward(gout.to(dtype))
            gerr = (xt.grad.double() - x64.grad).abs().max().item()
            gtol = (2e-5 if dtype == torch.float32 else 2e-2) * max(1.0, x64.grad.abs().max().item())
            results.append(dict(case=f"bwd {dtype} qk={qk} v={vd} B={b} N={n}", err=gerr, tol=gtol, ok=gerr <= gtol))
            if ci == 2 and dtype == torch.float32:
                gb = triton_attention.backward(gout.to(dtype), x, out.detach(), qk, vd, sc, bucketed=True)[0]
                berr = (gb.double() - x64.grad).abs().max().item()
                results.append(dict(case=f"bwd-bucketed {dtype} qk={qk} v={vd} B={b} N={n}",
                                    err=berr, tol=gtol, ok=berr <= gtol))
    results += _extras_checks(stock)
    return results


def _extras_checks(stock) -> list[dict]:
    """bias [H, N, N] and mask [nW, N, N] (Swin window attention) through the Triton kernels."""
    import math

    import torch
    import torch.nn.functional as F

    from nvit_kernels import dispatch, triton_attention
    from nvit_kernels.attention import uneven_attention, uneven_attention_reference

    results = []

    def stock_extras(x, qk, vd, sc, bias, mask):  # per-head SDPA, attn_mask = bias + mask in x's dtype
        B, N = x.shape[:2]
        outs, o = [], 0
        for h, (a, c, s) in enumerate(zip(qk, vd, sc)):
            am = torch.zeros(B, N, N, dtype=torch.float64)
            if bias is not None:
                am = am + bias[h].double()
            if mask is not None:
                am = am + mask.double().repeat(B // mask.shape[0], 1, 1)
            outs.append(F.scaled_dot_product_attention(x[..., o:o + a], x[..., o + a:o + 2 * a],
                                                       x[..., o + 2 * a:o + 2 * a + c], attn_mask=am.to(x.dtype),
                                                       scale=s))
            o += 2 * a + c
        return torch.cat(outs, -1)

    def tables(heads, n, nw, kind, seed, neg=-100.0):
        g = torch.Generator().manual_seed(seed)
        bias = torch.randn(heads, n, n, generator=g) * 2 if kind in ("bias", "both", "inf") else None
        mask = None
        if kind in ("mask", "both", "inf"):
            region = torch.randint(0, 3, (nw, n), generator=g)
            region[0] = 0
            mask = torch.zeros(nw, n, n)
            mask[region[:, :, None] != region[:, None, :]] = neg
            if kind == "inf":  # window 1 (and 3): query 2 sees nothing; window 0: query 3 sees one key
                mask[1, 2, :] = neg
                mask[0, 3, :] = neg
                mask[0, 3, n - 1] = 0.0
        return bias, mask

    # (qk, v, B, N, nW, kind, backward too): one token; N straddling the 16-wide interpreter tiles with
    # three (pow2 QK, pow2 V) buckets; -inf entries with fully masked queries.
    cases = [([1, 3, 17], [3, 1, 20], 1, 1, 1, "both", False),
             ([5, 33, 2], [40, 2, 7], 4, 19, 2, "bias", True),
             ([5, 33, 2], [40, 2, 7], 4, 19, 2, "mask", False),
             ([5, 33, 2], [40, 2, 7], 4, 19, 2, "both", True),
             ([4, 17], [3, 20], 4, 17, 2, "inf", True)]
    for dtype in (torch.float32, torch.float16):
        for ci, (qk, vd, b, n, nw, kind, bwd) in enumerate(cases):
            g = torch.Generator().manual_seed(1000 + ci)
            x = (torch.randn(b, n, sum(2 * a + c for a, c in zip(qk, vd)), generator=g, dtype=torch.float64)
                 * 1.5).to(dtype)
            sc = [1 / math.sqrt(a) for a in qk]
            bias, mask = tables(len(qk), n, nw, kind, seed=ci, neg=float("-inf") if kind == "inf" else -100.0)
            ref = uneven_attention_reference(x, qk, vd, sc, bias=bias, mask=mask)
            if kind == "inf":  # stock SDPA gives NaN for the fully masked queries: a fixed budget instead
                tol = 4e-6 if dtype == torch.float32 else 4e-3
            else:
                base = (stock_extras(x, qk, vd, sc, bias, mask).double() - ref).abs().max().item()
                tol = max(2 * base, 4 * torch.finfo(dtype).eps)
            for bucketed in ((False, True) if kind == "both" and n > 1 else (False,)):
                out = triton_attention.forward(x, qk, vd, sc, bucketed=bucketed, bias=bias, mask=mask)
                err = (out.double() - ref).abs().max().item()
                results.append(dict(case=f"fwd {kind} {dtype} qk={qk} v={vd} B={b} N={n} nW={nw} bucketed={bucketed}",
                                    err=err, tol=tol, ok=err <= tol and out.dtype == dtype
                                    and bool(torch.isfinite(out).all())))
            if not bwd or (dtype == torch.float16 and kind != "both"):
                continue
            gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            x64 = x.double().requires_grad_()
            b64 = None if bias is None else bias.double().requires_grad_()
            uneven_attention_reference(x64, qk, vd, sc, bias=b64, mask=mask).backward(gout)
            xt = x.clone().requires_grad_()
            bt = None if bias is None else bias.clone().requires_grad_()
            with dispatch.use_backend("triton"):
                out = uneven_attention(xt, qk, vd, sc, bias=bt, mask=mask)
                out.backward(gout.to(dtype))
            rel = 2e-5 if dtype == torch.float32 else 2e-2
            pairs = [("qkv", xt.grad, x64.grad)] + ([("bias", bt.grad, b64.grad)] if bias is not None else [])
            for what, got, want in pairs:
                gtol = rel * max(1.0, want.abs().max().item())
                gerr = (got.double() - want).abs().max().item()
                results.append(dict(case=f"bwd {kind} grad_{what} {dtype} qk={qk} v={vd} B={b} N={n} nW={nw}",
                                    err=gerr, tol=gtol, ok=gerr <= gtol and got.dtype == (dtype if what == "qkv"
                                                                                          else bias.dtype)))
            if kind == "both" and dtype == torch.float32:
                gq, gb = triton_attention.backward(gout.to(dtype), x, out.detach(), qk, vd, sc, bucketed=True,
                                                   bias=bias, mask=mask)
                for what, got, want in (("qkv", gq, x64.grad), ("bias", gb, b64.grad)):
                    gtol = rel * max(1.0, want.abs().max().item())
                    gerr = (got.double() - want).abs().max().item()
                    results.append(dict(case=f"bwd-bucketed {kind} grad_{what} {dtype} qk={qk} v={vd} B={b} N={n}",
                                        err=gerr, tol=gtol, ok=gerr <= gtol))
    return results


@pytest.mark.slow  # ~10-30 s: every case runs in Triton's CPU interpreter
def test_triton_interpreter():
    # The source tree first on the path: run as a script, this file would otherwise import whatever
    # nvit_kernels is installed (sys.path[0] is tests/, not the checkout).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 12 + 22
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(f"{r['case']}: err {r['err']:.3e} > tol {r['tol']:.3e}" for r in bad)


if __name__ == "__main__":
    import nvit_kernels

    assert os.environ.get("PYTHONPATH") is None or nvit_kernels.__file__.startswith(
        os.environ["PYTHONPATH"].split(os.pathsep)[0]), f"imported {nvit_kernels.__file__}, not the source tree"
    print(json.dumps(_run_checks()))

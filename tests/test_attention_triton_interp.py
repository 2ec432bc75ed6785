"""The Triton attention kernels under TRITON_INTERPRET=1 (CPU), in a subprocess.

The interpreter must be switched on before triton compiles anything, and other test modules may
already have imported triton in this process, so the checks run in a fresh interpreter: this file
run as a script. Tiny shapes, fp32/fp16 only (bf16 is wrong in the interpreter).
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
    return results


def test_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(f"{r['case']}: err {r['err']:.3e} > tol {r['tol']:.3e}" for r in bad)


if __name__ == "__main__":
    print(json.dumps(_run_checks()))

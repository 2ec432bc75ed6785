"""The Triton attention kernels compiled for a GPU without one (Triton's own ptxas): the launch
configurations that forward()/backward() pick with bias/mask must fit the shared memory of every GPU
generation the package supports (sm_86/89 allow 99 KiB a block, the smallest of sm_80+).

Compiling checks what the CPU interpreter cannot: that the kernels lower (constexpr branches, atomics,
layouts) and how much shared memory the software pipeline takes.
"""
from __future__ import annotations

import pytest

from nvit_kernels import dispatch

if not dispatch.triton_status()[0]:
    pytest.skip(dispatch.triton_status()[1], allow_module_level=True)

pytestmark = pytest.mark.slow  # a cold Triton cache compiles each case for 5-25 s

import torch  # noqa: E402
import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # an older Triton layout
    pytest.skip(f"this Triton has no ASTSource/GPUTarget ({e})", allow_module_level=True)

from nvit_kernels import triton_attention as ta  # noqa: E402

SM86_SMEM = 99 * 1024  # per-block maximum on sm_86/sm_89 (sm_80: 163 KiB, sm_90: 227 KiB)
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("qkv", "out", "gout", "gqkv"):
            sig[name] = PTR[dtype]
        elif name in ("lse", "delta", "bias", "mask", "gbias", "tab_scale"):
            sig[name] = "*fp32"
        elif name.startswith("tab_"):
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
    return sig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("width", [32, 64, 128])
def test_extras_kernels_fit_shared_memory(dtype, width, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU block sizes, not the interpreter's
    qkv = torch.empty(1, 1, 1, dtype=dtype)
    *_, opts = ta._extras(qkv, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    stages = opts.pop("num_stages")
    for fn, backward in ((ta._fwd_kernel, False), (ta._bwd_stats_kernel, True), (ta._bwd_dkdv_kernel, True),
                         (ta._bwd_dq_kernel, True)):
        bm, bn, nwarps = ta._blocks(width, width, backward)
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQ=width, BLOCK_DV=width, IEEE=dtype == torch.float32, **opts)
        src = ASTSource(fn, _signature(fn, dtype, consts), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 86, 32),
                                  options=dict(num_warps=nwarps, num_stages=stages))
        assert compiled.metadata.shared <= SM86_SMEM, (fn.__name__, compiled.metadata.shared)

"""Deployment: ONNX Runtime (CPU) latency of an exported NViT against the exported dense timm model it
came from, next to the FLOPs reduction (target: speedup ≥ 0.9 × FLOPs reduction).

The pruned model follows the paper's trends at ~half the dense FLOPs (bench_nvit_model.pruned_masks,
per-head "uneven" dims). Exports: the dense timm ViT; the NViT with its uneven dims (heads grouped by
equal dims, one SDPA per group); the NViT padded to head dims in multiples of 8 (--pad-heads 8: what
fused attention kernels want). Eager PyTorch of both for reference. Batch 1 and 64; interleaved
rounds, min of each. extra_info: ort_speedup_vs_flops (uneven), ort_speedup_padded, eager_speedup, ms.
Quick mode (quickmode.py): the small model only, cut to 2 blocks (the same three exports), batch 1 and 4, one round.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from bench_nvit_model import MODELS, _interleaved_min, pruned_masks
from nvit.deploy import exportable
from nvit.structures import Adapter
from quickmode import pick

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime", "onnxscript")),
                                reason='needs pip install ".[export]"')
CASES = pick([("small", 1), ("small", 64), ("deit_s", 1), ("deit_s", 64)], [("small", 1), ("small", 4)])


def _onnx(model, x, path):
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, input_names=["images"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


_SESSIONS: dict = {}


@pytest.mark.parametrize("name, batch", CASES)
def test_onnxruntime_speedup(benchmark, tmp_path_factory, name, batch):
    if name not in _SESSIONS:
        _SESSIONS.clear()
        make, img, chans = MODELS[name]
        torch.manual_seed(0)
        dense = make().eval()
        adapter = Adapter(dense)
        M, f_dense, f_pruned = pruned_masks(adapter, "uneven")
        nv = adapter.convert(M).eval()
        x = torch.randn(2, chans, img, img)
        d = tmp_path_factory.mktemp(name)
        _SESSIONS[name] = dict(dense=dense, nv=nv, flops=f_dense / f_pruned, shape=(chans, img, img),
                               s_dense=_onnx(dense, x, d / "dense.onnx"), s_nv=_onnx(exportable(nv), x, d / "nv.onnx"),
                               s_pad=_onnx(exportable(nv, 8), x, d / "nv_pad8.onnx"))
    c = _SESSIONS[name]
    x = torch.randn(batch, *c["shape"])
    feed = {"images": x.numpy()}

    def ort(sess):
        return lambda: sess.run(None, feed)

    def eager(m):
        def f():
            with torch.inference_mode():
                m(x)
        return f

    rounds = pick(7 if (name == "small" or batch == 1) else 3, 1)
    t = _interleaved_min([ort(c["s_dense"]), ort(c["s_nv"]), ort(c["s_pad"]), eager(c["dense"]), eager(c["nv"])],
                         rounds)
    t_dense, t_nv, t_pad, e_dense, e_nv = t
    benchmark.extra_info.update(
        model=name, batch=batch, threads=torch.get_num_threads(), loadavg=round(os.getloadavg()[0], 2),
        flops_reduction=round(c["flops"], 3), ms_ort_dense=t_dense * 1e3, ms_ort_nvit=t_nv * 1e3,
        ms_ort_nvit_pad8=t_pad * 1e3, ms_eager_dense=e_dense * 1e3, ms_eager_nvit=e_nv * 1e3,
        ort_speedup=round(t_dense / t_nv, 3), ort_speedup_padded=round(t_dense / t_pad, 3),
        ort_speedup_vs_flops=round(t_dense / t_nv / c["flops"], 3),
        ort_padded_speedup_vs_flops=round(t_dense / t_pad / c["flops"], 3),
        eager_speedup=round(e_dense / e_nv, 3))
    benchmark.pedantic(ort(c["s_nv"]), rounds=1, iterations=1, warmup_rounds=0)

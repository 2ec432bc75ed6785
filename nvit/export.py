"""`python -m nvit.export MODEL_DIR --format onnx|pt2`: a saved NViT model as an ONNX model or a
torch.export program, verified before it is written.

    python -m nvit.export runs/demo/model --format onnx            # → runs/demo/model/model.onnx
    python -m nvit.export runs/demo --format pt2 --batch 8         # a run folder's model/ works too
    python -m nvit.export runs/demo/model --format onnx --pad-heads 8 --dtype fp16

The uneven-dims attention is lowered to standard operators (nvit.deploy: heads grouped by equal dims,
one scaled-dot-product attention per group; --pad-heads N pads every head's dims to a multiple of N
with exact zeros), so ONNX Runtime, TensorRT and torch.export need no custom op.

The export verifies itself: it runs the exported model (ONNX Runtime for ONNX, the loaded program for
pt2) on random inputs -- two batch sizes when the batch is dynamic -- and fails, writing nothing,
unless every output equals the PyTorch model's within the tolerance relative to the output scale
(1e-4 in fp32, 1e-2 in fp16). The tolerance and the measured error are printed.
ONNX needs the optional extra: pip install ".[export]" (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .io import ModelFileError, atomic_write, load
from .model import NViT
from .model_swin import NViTSwin

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(Exception):
    """A problem the user can fix, or a failed verification; exit status 2 (nothing is written)."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nvit.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="a saved NViT model (nvit.save) or a prune run's folder")
    ap.add_argument("--format", required=True, choices=("onnx", "pt2"))
    ap.add_argument("--out", type=Path, help="output file (default: MODEL_DIR/model.onnx or model.pt2)")
    ap.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    ap.add_argument("--pad-heads", type=int, help="pad every head's QK/V dims to a multiple of N (exact zeros)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights and inputs (default: fp32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    args = ap.parse_args(argv)
    if args.batch != "dynamic" and (not args.batch.isdigit() or int(args.batch) < 1):
        ap.error(f"--batch must be 'dynamic' or a positive integer, got {args.batch!r}")
    if args.pad_heads is not None and args.pad_heads < 1:
        ap.error(f"--pad-heads must be ≥1, got {args.pad_heads}")
    return args


def find_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise ExportError(f"{path} is neither a saved NViT model nor a prune run (no config.json in it or in model/)")


def _require_onnx() -> None:
    import importlib.util

    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install \"nvit[export]\" "
                          f"(or pip install \".[export]\" in a checkout)")


def verification_batches(batch: str) -> list[int]:
    return [2, 5] if batch == "dynamic" else [int(batch)]


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out − ref| / max |ref| (the output scale), in float64."""
    ref, out = ref.double(), out.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def export(model: NViT | NViTSwin, out: Path, *, fmt: str, batch: str = "dynamic", opset: int = 18,
           pad_heads: int | None = None, dtype: str = "fp32", seed: int = 0, log=print) -> float:
    """Export `model` to `out` and verify it; returns the measured relative error (raises ExportError
    and writes nothing when it exceeds the tolerance)."""
    from .deploy import attention_groups, exportable

    if fmt == "onnx":
        _require_onnx()
    from .inputs import input_shape

    model = model.eval()
    shape = input_shape(model)
    m = exportable(model, pad_heads).to(DTYPES[dtype])
    groups = attention_groups(m)
    log(f"nvit.export: {sum(len(g) for g in groups)} attention head groups over {len(groups)} blocks "
        f"(pad-heads {pad_heads or 'off'}), {dtype}, batch {batch}")
    gen = torch.Generator().manual_seed(seed)
    batches = verification_batches(batch)
    inputs = [torch.randn(b, *shape, generator=gen) for b in batches]
    with torch.no_grad():
        refs = [model(x) for x in inputs]  # the PyTorch model itself, fp32, with nvit's own attention
    example = inputs[0].to(DTYPES[dtype])
    dyn = None
    if batch == "dynamic":
        dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    tol = TOLERANCE[dtype]
    err = math.nan

    def write(tmp: str) -> None:
        nonlocal err
        if fmt == "onnx":
            outs = _export_onnx(m, example, tmp, dyn, opset, inputs, dtype)
        else:
            outs = _export_pt2(m, example, tmp, dyn, inputs, dtype)
        err = max(relative_error(r, o) for r, o in zip(refs, outs))
        verdict = "ok" if err <= tol else "FAILED"
        log(f"nvit.export: verified on batch sizes {batches}: max |Δ| / max |output| = {err:.2e} "
            f"(tolerance {tol:.0e}, {dtype}) -> {verdict}")
        if not err <= tol:
            raise ExportError(f"the exported model's outputs differ from PyTorch's by {err:.2e} of the output "
                              f"scale (tolerance {tol:.0e}); nothing written")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    log(f"nvit.export: wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return err


def _export_onnx(m, example, tmp, dyn, opset, inputs, dtype) -> list[torch.Tensor]:
    import onnxruntime as ort

    big = sum(p.numel() * p.element_size() for p in m.parameters()) > 1.8e9  # ONNX's 2 GB protobuf limit
    try:
        with torch.no_grad():
            torch.onnx.export(m, (example,), tmp, dynamo=True, dynamic_shapes=dyn, opset_version=opset,
                              input_names=["images"], output_names=["logits"], external_data=big)
    except Exception as e:  # the exporter raises many kinds; say which step failed
        raise ExportError(f"torch.onnx.export failed ({type(e).__name__}: {e})") from None
    sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    np_dtype = "float16" if dtype == "fp16" else "float32"
    return [torch.from_numpy(sess.run(None, {name: x.numpy().astype(np_dtype)})[0]) for x in inputs]


def _export_pt2(m, example, tmp, dyn, inputs, dtype) -> list[torch.Tensor]:
    try:
        with torch.no_grad():
            ep = torch.export.export(m, (example,), dynamic_shapes=dyn)
        with open(tmp, "wb") as f:  # a file object: the temp file's name does not end in .pt2
            torch.export.save(ep, f)
    except Exception as e:
        raise ExportError(f"torch.export failed ({type(e).__name__}: {e})") from None
    with open(tmp, "rb") as f:
        back = torch.export.load(f).module()
    with torch.no_grad():
        return [back(x.to(DTYPES[dtype])) for x in inputs]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        src = find_model(args.model_dir)
        try:
            model = load(src)
        except ModelFileError as e:
            raise ExportError(str(e)) from None
        out = args.out or src / f"model.{args.format}"
        export(model, out, fmt=args.format, batch=args.batch, opset=args.opset, pad_heads=args.pad_heads,
               dtype=args.dtype, seed=args.seed)
        return 0
    except ExportError as e:
        print(f"nvit.export: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""How the compiled extension is found, and that a missing one is never a quiet slowdown.

Each case lays out a source tree in a temporary folder (nvit_kernels' Python files copied from the
installed package, plus whatever the case needs: sources, a binary, a broken binary) and imports it
in a fresh interpreter whose working directory is that tree, as `python -m nvit.prune` run from a
checkout does.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nvit
import nvit_kernels._native as native

INSTALLED = Path(native.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not native.available(), reason=f"no compiled extension: {native.LOAD_ERROR}")

PROBE = """
import json, warnings
import torch
warnings.simplefilter("always")
import nvit_kernels._native as n
from nvit_kernels import dispatch
out = {"state": n.STATE, "error": n.LOAD_ERROR, "file": getattr(n._C, "__file__", None)}
with warnings.catch_warnings(record=True) as w:
    try:
        out["cpu_backend"] = dispatch.select("saliency", torch.device("cpu"))
    except RuntimeError as e:
        out["raised"] = str(e)
out["warnings"] = [str(x.message) for x in w]
print("PROBE" + json.dumps(out))
"""


def _tree(tmp_path: Path, *, binary: str | None = None, sources: str | None = None) -> Path:
    """A checkout-like tree: nvit_kernels (Python), optionally the extension (under the name given) and
    native sources ("real": this repo's csrc + CMakeLists.txt; "edited": other contents)."""
    tree = tmp_path / "checkout"
    shutil.copytree(INSTALLED, tree / "nvit_kernels", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if binary is not None:
        shutil.copy2(native._C.__file__, tree / "nvit_kernels" / binary)
    if sources == "real":
        shutil.copytree(REPO / "csrc", tree / "csrc")
        shutil.copy2(REPO / "CMakeLists.txt", tree / "CMakeLists.txt")
    elif sources == "edited":
        (tree / "csrc").mkdir()
        (tree / "csrc" / "kernel.cpp").write_text("// not what the binary was built from\n")
        (tree / "CMakeLists.txt").write_text("project(x)\n")
    return tree


def _probe(cwd: Path, env_extra: dict | None = None, pre: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NVIT_ALLOW_REFERENCE"}
    env.update(env_extra or {})
    code = pre + PROBE
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE"):])


def _ext_name() -> str:
    return Path(native._C.__file__).name


@needs_ext
def test_tree_with_its_own_build_loads_it(tmp_path):
    if native._C.source_digest != native.source_digest(REPO):
        pytest.skip("the installed extension was built from other sources than this checkout's csrc/")
    tree = _tree(tmp_path, binary=_ext_name(), sources="real")
    r = _probe(tree)
    assert r["state"] == "loaded" and r["file"].startswith(str(tree)), r
    assert r["cpu_backend"] == "cpp" and not r["warnings"]


@needs_ext
def test_binary_from_other_sources_is_refused(tmp_path):
    r = _probe(_tree(tmp_path, binary=_ext_name(), sources="edited"))
    assert r["state"] == "broken" and "changed since the build" in r["error"], r
    assert "raised" in r and "NVIT_ALLOW_REFERENCE=1" in r["raised"] and "pip install ." in r["raised"]


@needs_ext
def test_source_tree_shadowing_the_installed_build_is_an_error(tmp_path):
    # The bug this guards against: `python -m` from a checkout imports its nvit_kernels (no binary)
    # before the installed one (with the binary), and the run quietly used the reference.
    r = _probe(_tree(tmp_path))
    assert r["state"] == "broken" and "shadows another one in" in r["error"] and "nvit_kernels that has it" in r["error"], r
    assert "raised" in r


@needs_ext
def test_binary_for_another_python_is_named(tmp_path):
    r = _probe(_tree(tmp_path, binary="_C.cpython-399-x86_64-linux-gnu.so"))
    assert r["state"] == "broken" and "another Python" in r["error"] and "cpython-399" in r["error"], r


@needs_ext
def test_binary_that_fails_to_load_is_named(tmp_path):
    tree = _tree(tmp_path)
    (tree / "nvit_kernels" / _ext_name()).write_bytes(b"not an ELF file")
    r = _probe(tree)
    assert r["state"] == "broken" and "cannot be loaded" in r["error"], r


@needs_ext
def test_fallback_when_asked_for_warns_once(tmp_path):
    r = _probe(_tree(tmp_path, binary=_ext_name(), sources="edited"), {"NVIT_ALLOW_REFERENCE": "1"})
    assert r["state"] == "broken" and r["cpu_backend"] == "reference", r
    assert len(r["warnings"]) == 1 and "changed since the build" in r["warnings"][0]


def test_torch_only_installation_gets_a_notice(tmp_path):
    """No extension anywhere on the path: the reference runs after a one-time notice, no error.
    The interpreter sees site-packages through a copy of links that leaves nvit_kernels out."""
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    fake_site = tmp_path / "site"
    fake_site.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("nvit_kernels", "nvit", "__editable__")):
            (fake_site / entry.name).symlink_to(entry)
    tree = _tree(tmp_path)
    # Also drop the folder the tested package came from (a checkout on PYTHONPATH holds its binary).
    hidden = (str(site), str(INSTALLED.parent))
    pre = (f"import sys, os; sys.path[:] = [p for p in sys.path if not p or not os.path.realpath(p).startswith({hidden!r})]"
           f" + [{str(fake_site)!r}]\n")
    r = _probe(tree, pre=pre)
    assert r["state"] == "absent" and r["cpu_backend"] == "reference" and "raised" not in r, r
    assert len(r["warnings"]) == 1 and "cpp backend unavailable" in r["warnings"][0]


@needs_ext
def test_cli_refuses_a_broken_extension_before_any_work(tmp_path):
    tree = _tree(tmp_path, binary=_ext_name(), sources="edited")
    (tree / "nvit").symlink_to(Path(nvit.__file__).resolve().parent)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "nvit.prune", "--out", str(out)], cwd=tree, capture_output=True,
                       text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "NVIT_ALLOW_REFERENCE"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "compiled kernels cannot be used" in r.stderr and "NVIT_ALLOW_REFERENCE" in r.stderr
    assert not out.exists()  # refused before the output folder, the data or the dense evaluation


def test_saved_model_runs_with_torch_alone(tmp_path):
    """A saved NViT model loads and runs where neither the compiled extension nor Triton exists: nvit's
    pure-PyTorch attention, after a one-time notice, with the same outputs."""
    import torch

    import nvit
    from nvit.structures import Adapter
    from _vit_factory import random_masks, tiny_vit

    a = Adapter(tiny_vit("plain"))
    nv = a.convert(random_masks(a, "per-head", 0)).eval()
    nvit.save(nv, tmp_path / "m")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.save({"x": x, "y": nv(x)}, tmp_path / "io.pt")
    site = Path(torch.__file__).resolve().parents[1]
    fake_site = tmp_path / "site"
    fake_site.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("nvit_kernels", "nvit", "__editable__", "triton")):
            (fake_site / entry.name).symlink_to(entry)
    tree = _tree(tmp_path)
    (tree / "nvit").symlink_to(Path(nvit.__file__).resolve().parent)
    hidden = (str(site), str(INSTALLED.parent))
    code = (f"import sys, os; sys.path[:] = [p for p in sys.path if not p or not os.path.realpath(p).startswith({hidden!r})]"
            f" + [{str(fake_site)!r}]\n"
            "import warnings, importlib.util, torch, nvit\n"
            "assert importlib.util.find_spec('triton') is None\n"
            "warnings.simplefilter('always')\n"
            f"d = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            f"    m = nvit.load({str(tmp_path / 'm')!r})\n"
            "    with torch.no_grad():\n"
            "        y1, y2 = m(d['x']), m(d['x'])\n"
            "import nvit_kernels._native as n\n"
            "print('STATE', n.STATE, len([x for x in w if 'backend unavailable' in str(x.message)]),\n"
            "      float((y1 - d['y']).abs().max()))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "NVIT_ALLOW_REFERENCE"})
    assert r.returncode == 0, r.stderr[-3000:]
    state, notices, err = r.stdout.split("STATE ")[1].split()
    assert state == "absent" and int(notices) == 1 and float(err) <= 1e-5

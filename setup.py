"""Builds the native kernels (nvit_kernels._C) with CMake + Ninja.

Environment:
  NVIT_NO_CUDA=1          skip the CUDA kernels even when nvcc is found
  NVIT_CUDA_ARCHS="80;90" CUDA architectures (default 80;86;89;90, plus PTX of the last one)
  NVIT_MARCH=native       -march for the C++ CPU kernels ("" for the compiler's default)
  NVIT_BUILD_JOBS=N       parallel compile jobs (default: all cores)
  NVIT_BUILD_TYPE=Release CMake build type

The built module is also placed next to the sources it was built from (nvit_kernels/ of this tree,
as an in-place build does; git ignores it), so `python -m nvit.prune` run from the checkout root,
where the source tree shadows the installed package, still gets the compiled kernels. The module
carries a digest of its sources (nvit_kernels/_sources.py) and the loader refuses one that does not
match the tree it sits in.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _sources_module():
    """nvit_kernels/_sources.py loaded by path: the package itself needs torch, the build must not."""
    spec = importlib.util.spec_from_file_location("_nvit_sources", ROOT / "nvit_kernels" / "_sources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _place_in_tree(built: Path) -> None:
    """Copy the built module into this tree's nvit_kernels/ (atomically: a running process may map it)."""
    dest = ROOT / "nvit_kernels" / built.name
    if dest.resolve() == built.resolve():
        return  # an in-place build (build_ext --inplace, editable install) already put it there
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=built.suffix)
        os.close(fd)
        shutil.copy2(built, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        print(f"nvit: placed {built.name} in {dest.parent} as well (for runs from the source tree)")
    except OSError as e:  # a read-only tree still installs; only runs from inside it lack the kernels
        print(f"nvit: warning: could not place the extension in {dest.parent}: {e}", file=sys.stderr)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import cmake
        import ninja
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake_exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        ninja_exe = str(Path(ninja.BIN_DIR) / "ninja")
        args = [
            cmake_exe, "-S", str(ROOT), "-B", str(build_temp), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja_exe}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('NVIT_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DNVIT_CUDA_ARCHS={os.environ.get('NVIT_CUDA_ARCHS', '80;86;89;90')}",
            f"-DNVIT_MARCH={os.environ.get('NVIT_MARCH', 'native')}",
            f"-DNVIT_NO_CUDA={'ON' if os.environ.get('NVIT_NO_CUDA', '0') not in ('', '0') else 'OFF'}",
            f"-DNVIT_SOURCE_DIGEST={_sources_module().source_digest(ROOT)}",
        ]
        subprocess.run(args, check=True)
        jobs = os.environ.get("NVIT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake_exe, "--build", str(build_temp), "--parallel", jobs], check=True)
        _place_in_tree(Path(self.get_ext_fullpath(ext.name)).resolve())


setup(ext_modules=[CMakeExtension("nvit_kernels._C")], cmdclass={"build_ext": CMakeBuild})

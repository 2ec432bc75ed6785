"""Builds the native kernels (nvit_kernels._C) with CMake + Ninja.

Environment:
  NVIT_NO_CUDA=1          skip the CUDA kernels even when nvcc is found
  NVIT_CUDA_ARCHS="80;90" CUDA architectures (default 80;86;89;90, plus PTX of the last one)
  NVIT_MARCH=native       -march for the C++ CPU kernels ("" for the compiler's default)
  NVIT_BUILD_JOBS=N       parallel compile jobs (default: all cores)
  NVIT_BUILD_TYPE=Release CMake build type
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


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
        ]
        subprocess.run(args, check=True)
        jobs = os.environ.get("NVIT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake_exe, "--build", str(build_temp), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("nvit_kernels._C")], cmdclass={"build_ext": CMakeBuild})

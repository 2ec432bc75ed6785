// Build facts: which backends were compiled and whether a CUDA device can be used here.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <string>

#ifdef NVIT_WITH_CUDA
#include "cuda_utils.h"
#endif

namespace py = pybind11;

#ifndef NVIT_SOURCE_DIGEST
#define NVIT_SOURCE_DIGEST ""
#endif

void register_info(py::module_& m) {
  // Which sources this binary was compiled from (see nvit_kernels/_sources.py).
  m.attr("source_digest") = std::string(NVIT_SOURCE_DIGEST);
#ifdef NVIT_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = std::string(NVIT_CUDA_ARCHS);
  m.attr("cuda_runtime_version") = nvit::cuda_runtime_version();
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = std::string();
  m.attr("cuda_runtime_version") = 0;
#endif
  m.def("cuda_device_count", []() -> py::tuple {
#ifdef NVIT_WITH_CUDA
    std::string err;
    int n = nvit::cuda_device_count(&err);
    return py::make_tuple(n, err);
#else
    return py::make_tuple(0, std::string("built without CUDA"));
#endif
  }, "(number of usable CUDA devices, reason when 0)");
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });
}

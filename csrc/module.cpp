// The pybind11 face of the native kernels: nvit_kernels._C. Each kernel family registers its own
// functions, so families live in separate files.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_info(py::module_& m);
void register_saliency(py::module_& m);
void register_attention(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "nvit native kernels (C++ CPU and, when built with nvcc, CUDA)";
  register_info(m);
  register_saliency(m);
  register_attention(m);
}

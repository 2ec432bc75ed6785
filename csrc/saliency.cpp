// Fused Hessian-saliency kernels (CPU). Filled in by the saliency work.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_saliency(py::module_& m) {}

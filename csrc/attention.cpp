// Uneven per-head QK/V attention (CPU). Filled in by the attention work.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_attention(py::module_& m) {}

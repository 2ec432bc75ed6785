// CUDA helpers shared by the .cu files (and the device query in info.cpp).
#pragma once
#include <string>

namespace nvit {

int cuda_device_count(std::string* err);  // 0 and a reason when no device/driver is usable
int cuda_runtime_version();

}  // namespace nvit

#ifdef __CUDACC__
#include <cuda_runtime.h>
#include <stdexcept>

#define NVIT_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    cudaError_t _e = (expr);                                                                   \
    if (_e != cudaSuccess)                                                                     \
      throw std::runtime_error(std::string("nvit CUDA error: ") + cudaGetErrorString(_e) +     \
                               " at " __FILE__ ":" + std::to_string(__LINE__));                \
  } while (0)

namespace nvit {
inline cudaStream_t as_stream(long long handle) { return reinterpret_cast<cudaStream_t>(handle); }
}  // namespace nvit
#endif

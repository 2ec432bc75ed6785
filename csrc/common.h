// Shared helpers for the native kernels. No torch headers: kernels take raw pointers, sizes,
// dtype codes and (for CUDA) the stream as an integer handle, so one build serves any torch.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace nvit {

// dtype codes shared with nvit_kernels/_native.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument("nvit: " + msg); }

#define NVIT_CHECK(cond, msg) \
  do {                        \
    if (!(cond)) ::nvit::fail(msg); \
  } while (0)

// Scalar conversions for the CPU kernels; written so the compiler can vectorise them
// (F16C/AVX-512 where -march allows, plain integer ops otherwise).
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  _Float16 f;
  std::memcpy(&f, &h, sizeof f);  // memcpy, not a pointer cast: no strict-aliasing UB
  return static_cast<float>(f);
}

inline uint16_t float_to_fp16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}

}  // namespace nvit

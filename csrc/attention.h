// Uneven per-head attention: the CUDA entry point (compiled only with NVIT_WITH_CUDA).
#pragma once
#include <cstdint>
#include <vector>

namespace nvit {

// Largest head dim (QK or V) the CUDA kernel takes; per-thread registers are sized by its pow2 bucket.
constexpr int kAttnCudaMaxDim = 128;  // ViT heads are <= 64 wide; wider buckets cost much compile time
// Heads per launch: the head table travels as a kernel argument (no host-to-device copy, graph-safe).
constexpr int kAttnCudaMaxHeads = 64;

#ifdef NVIT_WITH_CUDA
void uneven_attention_forward_cuda(const void* qkv, void* out, long B, long N, int dtype,
                                   const std::vector<int64_t>& qk, const std::vector<int64_t>& v,
                                   const std::vector<double>& scales, const void* bias, const void* mask, long nw,
                                   long long stream);  // bias [H,N,N], mask [nW,N,N]: fp32 device pointers or null
#endif

}  // namespace nvit

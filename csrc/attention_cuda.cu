// Uneven per-head attention forward on CUDA: one launch for up to 64 heads (the head table is a kernel
// argument). Block = (batch * head, query tile); each thread owns one query row, keeps q and its fp32
// output accumulator in registers (sized by the pow2 bucket DMAX of the widest head, loops guarded by the
// head's own dims, so narrow heads do not pay the bucket's FLOPs) and runs an online softmax over key
// tiles staged in shared memory, where every thread reads the same key row (a broadcast, no bank
// conflicts). No tensor cores: this is the portable backend beside the Triton one, which is the default.
//
// Optional additive logits (Swin window attention), fp32: bias [H, N, N] and mask [nW, N, N] (batch b uses
// mask[b % nW]). With them (the EXTRA instantiation), each key tile also stages bias + mask for the
// block's queries in shared memory, loaded along keys (coalesced) and stored key-major, so in the inner
// loop thread t reads column t of a row (conflict-free). Keys with a -inf logit are skipped, so a fully
// masked query keeps l = 0 and gets output 0 instead of NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "attention.h"
#include "common.h"
#include "cuda_utils.h"

namespace nvit {
namespace {

struct HeadTable {
  int in_off[kAttnCudaMaxHeads];
  int out_off[kAttnCudaMaxHeads];
  int qk[kAttnCudaMaxHeads];
  int v[kAttnCudaMaxHeads];
  float scale[kAttnCudaMaxHeads];  // already times log2(e): the kernel uses exp2
};

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename S> __device__ __forceinline__ S st(float x);
template <> __device__ __forceinline__ float st<float>(float x) { return x; }
template <> __device__ __forceinline__ __half st<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr int kThreads = 64;  // queries per block

// Keys per shared-memory tile: K and V tiles take 32 KiB (16-32 KiB with EXTRA, plus the bias tile's
// BK x 65 floats), below the 48 KiB of static shared memory.
template <int DMAX, bool EXTRA> __host__ __device__ constexpr int keys_per_tile() {
  return EXTRA ? (DMAX <= 32 ? 64 : 32) : (DMAX <= 64 ? 64 : 32);
}

template <typename S, int DMAX, bool EXTRA>
__global__ void __launch_bounds__(kThreads) uneven_attention_fwd_kernel(const S* __restrict__ qkv,
                                                                         S* __restrict__ out, HeadTable tab,
                                                                         int H, int N, long W, long OW,
                                                                         const float* __restrict__ bias,
                                                                         const float* __restrict__ mask, int nw,
                                                                         int h0) {
  constexpr int BK = keys_per_tile<DMAX, EXTRA>();
  __shared__ float ks[BK][DMAX];
  __shared__ float vs[BK][DMAX];
  __shared__ float xs[EXTRA ? BK : 1][kThreads + 1];  // (bias + mask) * log2(e), key-major; +1: no bank conflicts
  const int h = blockIdx.x % H;
  const long b = blockIdx.x / H;
  const int dq = tab.qk[h], dv = tab.v[h];
  const float scale = tab.scale[h];
  const S* base = qkv + b * N * W + tab.in_off[h];
  const int i = blockIdx.y * kThreads + threadIdx.x;
  const bool valid = i < N;

  float q[DMAX], acc[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    q[d] = (valid && d < dq) ? ld(base + i * W + d) * scale : 0.f;
    acc[d] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j0 = 0; j0 < N; j0 += BK) {
    const int nk = min(BK, N - j0);
    __syncthreads();  // the previous tile is no longer read
    for (int e = threadIdx.x; e < nk * dq; e += kThreads) {
      const int j = e / dq, d = e % dq;
      ks[j][d] = ld(base + (long)(j0 + j) * W + dq + d);
    }
    for (int e = threadIdx.x; e < nk * dv; e += kThreads) {
      const int j = e / dv, c = e % dv;
      vs[j][c] = ld(base + (long)(j0 + j) * W + 2 * dq + c);
    }
    if constexpr (EXTRA) {
      const long q0 = (long)blockIdx.y * kThreads;
      const float* brow = bias ? bias + (long)(h0 + h) * N * N : nullptr;
      const float* mrow = mask ? mask + (b % nw) * N * N : nullptr;
      for (int e = threadIdx.x; e < nk * kThreads; e += kThreads) {
        const int t = e / nk, j = e % nk;
        const long qi = q0 + t, at = qi * N + j0 + j;
        float x = 0.f;
        if (qi < N) x = (brow ? brow[at] : 0.f) + (mrow ? mrow[at] : 0.f);
        xs[j][t] = x * 1.4426950408889634f;
      }
    }
    __syncthreads();
    for (int j = 0; j < nk; ++j) {
      float s = 0.f;
#pragma unroll
      for (int d = 0; d < DMAX; ++d)
        if (d < dq) s += q[d] * ks[j][d];
      if constexpr (EXTRA) {
        s += xs[j][threadIdx.x];
        if (s == -INFINITY) continue;  // weight 0; skipping also keeps m = -inf from making NaN
      }
      const float m_new = fmaxf(m, s);
      const float alpha = exp2f(m - m_new), p = exp2f(s - m_new);
      l = l * alpha + p;
#pragma unroll
      for (int c = 0; c < DMAX; ++c)
        if (c < dv) acc[c] = acc[c] * alpha + p * vs[j][c];
      m = m_new;
    }
  }
  if (!valid) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // l = 0 only when every logit is -inf (EXTRA): output 0
  S* o = out + (b * N + i) * OW + tab.out_off[h];
#pragma unroll
  for (int c = 0; c < DMAX; ++c)
    if (c < dv) o[c] = st<S>(acc[c] * inv);
}

template <typename S, bool EXTRA>
void launch_dims(const S* x, S* y, const HeadTable& tab, int H, int dmax, dim3 grid, long N, long W, long OW,
                 const float* bias, const float* mask, int nw, int h0, cudaStream_t stream) {
  if (dmax <= 32)
    uneven_attention_fwd_kernel<S, 32, EXTRA><<<grid, kThreads, 0, stream>>>(x, y, tab, H, N, W, OW, bias, mask, nw, h0);
  else if (dmax <= 64)
    uneven_attention_fwd_kernel<S, 64, EXTRA><<<grid, kThreads, 0, stream>>>(x, y, tab, H, N, W, OW, bias, mask, nw, h0);
  else
    uneven_attention_fwd_kernel<S, 128, EXTRA><<<grid, kThreads, 0, stream>>>(x, y, tab, H, N, W, OW, bias, mask, nw,
                                                                               h0);
}

template <typename S>
void launch(const void* qkv, void* out, const HeadTable& tab, int H, int dmax, long B, long N, long W, long OW,
            const float* bias, const float* mask, int nw, int h0, cudaStream_t stream) {
  dim3 grid(B * H, (N + kThreads - 1) / kThreads);  // B*H on x: its limit is 2^31-1, y's is 65535
  auto* x = static_cast<const S*>(qkv);
  auto* y = static_cast<S*>(out);
  if (bias || mask)
    launch_dims<S, true>(x, y, tab, H, dmax, grid, N, W, OW, bias, mask, nw, h0, stream);
  else
    launch_dims<S, false>(x, y, tab, H, dmax, grid, N, W, OW, nullptr, nullptr, 1, h0, stream);
  NVIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void uneven_attention_forward_cuda(const void* qkv, void* out, long B, long N, int dtype,
                                   const std::vector<int64_t>& qk, const std::vector<int64_t>& v,
                                   const std::vector<double>& scales, const void* bias, const void* mask, long nw,
                                   long long stream) {
  NVIT_CHECK(!qk.empty() && qk.size() == v.size() && qk.size() == scales.size(),
             "uneven_attention (CUDA): qk_dims, v_dims and scales need one entry per head");
  NVIT_CHECK(B >= 1 && N >= 1, "uneven_attention (CUDA): B and N must be >= 1");
  NVIT_CHECK((N + kThreads - 1) / kThreads <= 65535, "uneven_attention (CUDA): N too large for the grid");
  long W = 0, OW = 0;
  for (size_t h = 0; h < qk.size(); ++h) {
    NVIT_CHECK(qk[h] >= 1 && v[h] >= 1, "uneven_attention (CUDA): head dims must be >= 1");
    NVIT_CHECK(qk[h] <= kAttnCudaMaxDim && v[h] <= kAttnCudaMaxDim,
               "uneven_attention (CUDA): head dims above " + std::to_string(kAttnCudaMaxDim) +
                   " are not supported by the CUDA kernel (use the Triton backend)");
    W += 2 * qk[h] + v[h];
    OW += v[h];
  }
  NVIT_CHECK(!mask || (nw >= 1 && B % nw == 0),
             "uneven_attention (CUDA): the batch must be a multiple of the mask's nW >= 1");
  NVIT_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
             std::string("uneven_attention (CUDA): unsupported dtype ") + dtype_name(dtype));
  long in_off = 0, out_off = 0;
  // Chunks of up to 64 heads, one launch each (a ViT block has at most 16).
  for (size_t h0 = 0; h0 < qk.size(); h0 += kAttnCudaMaxHeads) {
    const int H = static_cast<int>(std::min<size_t>(kAttnCudaMaxHeads, qk.size() - h0));
    HeadTable tab{};
    int dmax = 1;
    for (int k = 0; k < H; ++k) {
      const size_t h = h0 + k;
      tab.in_off[k] = static_cast<int>(in_off);
      tab.out_off[k] = static_cast<int>(out_off);
      tab.qk[k] = static_cast<int>(qk[h]);
      tab.v[k] = static_cast<int>(v[h]);
      tab.scale[k] = static_cast<float>(scales[h] * 1.4426950408889634);
      dmax = std::max<int>(dmax, static_cast<int>(std::max(qk[h], v[h])));
      in_off += 2 * qk[h] + v[h];
      out_off += v[h];
    }
    cudaStream_t s = as_stream(stream);
    const auto* bf = static_cast<const float*>(bias);
    const auto* mf = static_cast<const float*>(mask);
    const int nwi = mask ? static_cast<int>(nw) : 1, h0i = static_cast<int>(h0);
    switch (dtype) {
      case kFloat32: launch<float>(qkv, out, tab, H, dmax, B, N, W, OW, bf, mf, nwi, h0i, s); break;
      case kFloat16: launch<__half>(qkv, out, tab, H, dmax, B, N, W, OW, bf, mf, nwi, h0i, s); break;
      default: launch<__nv_bfloat16>(qkv, out, tab, H, dmax, B, N, W, OW, bf, mf, nwi, h0i, s); break;
    }
  }
}

}  // namespace nvit

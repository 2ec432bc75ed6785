// Fused Hessian-saliency pass (CUDA): scores[u] += (Σ_{(r,c) in u} w·g)² over a whole parameter list
// in one tile launch (plus a finalize), whatever the number of tensors.
//
// The plan table (saliency.h) lives on the device with this call's pointers and dtypes; block b
// finds its tensor by binary search over the tensors' first tiles. A matrix tile is 32 rows x 256
// columns (8 warps; warp w takes rows w, w+8, ...; lane l columns l, l+32, ...: coalesced 128-byte
// loads, fp32 products). Row sums are warp reductions, column sums a fixed-order reduction over the
// 8 warps in shared memory. Vectors (one row) use 1 x 4096 tiles.
//   fast:          tile row/column sums atomicAdd into fp32 unit sums; finalize squares into scores.
//   deterministic: tiles write partials to fixed slots; a line kernel sums each row/column line in
//                  tile order; a unit kernel (one warp per unit) gathers the unit's lines in CSR order
//                  with a fixed shuffle tree. Bit-identical across runs.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "cuda_utils.h"
#include "saliency.h"

namespace nvit {
namespace {
using namespace sal;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kTileRows / kWarps;
constexpr int kColsPerLane = kTileCols / 32;
constexpr int kVecPerThread = kVecTile / kThreads;
static_assert(kTileCols == kThreads, "column reduction assigns one column per thread");
static_assert(kTileRows % kWarps == 0 && kTileCols % 32 == 0 && kVecTile % kThreads == 0, "tile shape");

template <int D>
struct Ld;
template <>
struct Ld<kFloat32> {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return __ldcs(static_cast<const float*>(p) + i);  // read once: evict-first
  }
};
template <>
struct Ld<kFloat16> {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return __half2float(__ushort_as_half(__ldcs(static_cast<const unsigned short*>(p) + i)));
  }
};
template <>
struct Ld<kBFloat16> {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return __uint_as_float(static_cast<unsigned int>(__ldcs(static_cast<const unsigned short*>(p) + i)) << 16);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row line r of tensor m (its sum over column tile ct): a partial slot, or atomics into units.
template <bool DET>
__device__ __forceinline__ void emit_row(const int64_t* m, int64_t r, int64_t ct, float v, const int32_t* index,
                                         float* part, float* usum, int32_t U) {
  const int64_t R = m[kRows];
  if (DET) {
    part[m[kRowPartOff] + ct * R + r] = v;
  } else {
    const int32_t* map = index + m[kMapOff] + r;
    for (int64_t k = 0; k < m[kNRowMaps]; ++k) {
      const int32_t u = map[k * R];
      if (u < U) atomicAdd(usum + u, v);
    }
  }
}

template <bool DET>
__device__ __forceinline__ void emit_col(const int64_t* m, int64_t c, int64_t rt, float v, const int32_t* index,
                                         float* part, float* usum, int32_t U) {
  const int64_t C = m[kCols];
  if (DET) {
    part[m[kColPartOff] + rt * C + c] = v;
  } else {
    const int32_t* map = index + m[kMapOff] + m[kNRowMaps] * m[kRows] + c;
    for (int64_t k = 0; k < m[kNColMaps]; ++k) {
      const int32_t u = map[k * C];
      if (u < U) atomicAdd(usum + u, v);
    }
  }
}

template <int D, bool DET>
__device__ void matrix_tile(const int64_t* m, int64_t rt, int64_t ct, const int32_t* index, float* part,
                            float* usum, int32_t U, float (*sh)[kTileCols]) {
  const int64_t R = m[kRows], C = m[kCols];
  const bool has_row = m[kNRowMaps] > 0, has_col = m[kNColMaps] > 0;
  const void* w = reinterpret_cast<const void*>(m[kWPtr]);
  const void* g = reinterpret_cast<const void*>(m[kGPtr]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = rt * kTileRows, c0 = ct * kTileCols;
  float cacc[kColsPerLane];
#pragma unroll
  for (int j = 0; j < kColsPerLane; ++j) cacc[j] = 0.f;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = r0 + warp + i * kWarps;
    if (r >= R) break;  // warp-uniform
    const int64_t base = r * C;
    float rs = 0.f;
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int64_t c = c0 + lane + 32 * j;
      if (c < C) {
        const float p = Ld<D>::at(w, base + c) * Ld<D>::at(g, base + c);
        cacc[j] += p;
        rs += p;
      }
    }
    if (has_row) {
      rs = warp_sum(rs);
      if (lane == 0) emit_row<DET>(m, r, ct, rs, index, part, usum, U);
    }
  }
  if (has_col) {
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) sh[warp][lane + 32 * j] = cacc[j];
    __syncthreads();
    const int64_t c = c0 + threadIdx.x;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += sh[k][threadIdx.x];
    if (c < C) emit_col<DET>(m, c, rt, s, index, part, usum, U);
  }
}

template <int D, bool DET>
__device__ void vector_tile(const int64_t* m, int64_t ct, const int32_t* index, float* part, float* usum,
                            int32_t U, float (*sh)[kTileCols]) {
  const int64_t C = m[kCols];
  const bool has_row = m[kNRowMaps] > 0, has_col = m[kNColMaps] > 0;
  const void* w = reinterpret_cast<const void*>(m[kWPtr]);
  const void* g = reinterpret_cast<const void*>(m[kGPtr]);
  const int64_t c0 = ct * kVecTile;
  float rs = 0.f;
#pragma unroll 4
  for (int j = 0; j < kVecPerThread; ++j) {
    const int64_t c = c0 + threadIdx.x + j * kThreads;
    if (c < C) {
      const float p = Ld<D>::at(w, c) * Ld<D>::at(g, c);
      rs += p;
      if (has_col) emit_col<DET>(m, c, 0, p, index, part, usum, U);  // one row: the product is the column sum
    }
  }
  if (has_row) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    rs = warp_sum(rs);
    if (lane == 0) sh[0][warp] = rs;
    __syncthreads();
    if (warp == 0) {
      float s = lane < kWarps ? sh[0][lane] : 0.f;
      s = warp_sum(s);
      if (lane == 0) emit_row<DET>(m, 0, ct, s, index, part, usum, U);
    }
  }
}

template <bool DET>
__global__ void __launch_bounds__(kThreads) tiles_kernel(const int64_t* __restrict table, int32_t T,
                                                         const int32_t* __restrict index, float* part,
                                                         float* usum, int32_t U) {
  __shared__ float sh[kWarps][kTileCols];
  const int64_t b = blockIdx.x;
  int32_t lo = 0, hi = T;  // last tensor whose first tile is <= b (tensors without tiles are skipped)
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (table[int64_t(mid) * kSalCols + kTile0] <= b) lo = mid;
    else hi = mid;
  }
  const int64_t* m = table + int64_t(lo) * kSalCols;
  const int64_t lt = b - m[kTile0], nct = m[kNColTiles];
  const int64_t rt = lt / nct, ct = lt % nct;
  const bool vec = m[kRows] == 1;
  switch (m[kDType]) {
    case kFloat32:
      if (vec) vector_tile<kFloat32, DET>(m, ct, index, part, usum, U, sh);
      else matrix_tile<kFloat32, DET>(m, rt, ct, index, part, usum, U, sh);
      break;
    case kFloat16:
      if (vec) vector_tile<kFloat16, DET>(m, ct, index, part, usum, U, sh);
      else matrix_tile<kFloat16, DET>(m, rt, ct, index, part, usum, U, sh);
      break;
    default:
      if (vec) vector_tile<kBFloat16, DET>(m, ct, index, part, usum, U, sh);
      else matrix_tile<kBFloat16, DET>(m, rt, ct, index, part, usum, U, sh);
      break;
  }
}

// Deterministic: line i = Σ_k part[base + k*stride], k in tile order.
__global__ void lines_kernel(const int32_t* __restrict tab, const float* __restrict part, float* __restrict lines,
                             int64_t L) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= L) return;
  const int64_t base = tab[3 * i], stride = tab[3 * i + 1], count = tab[3 * i + 2];
  float s = 0.f;
  for (int64_t k = 0; k < count; ++k) s += part[base + k * stride];
  lines[i] = s;
}

// Deterministic: one warp per unit gathers its lines in CSR order (lane-strided, fixed shuffle tree).
__global__ void units_kernel(const int32_t* __restrict ptr, const int32_t* __restrict idx,
                             const float* __restrict lines, float* __restrict scores, int64_t U) {
  const int64_t u = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (u >= U) return;  // warp-uniform
  float s = 0.f;
  for (int32_t e = ptr[u] + lane; e < ptr[u + 1]; e += 32) s += lines[idx[e]];
  s = warp_sum(s);
  if (lane == 0) scores[u] += s * s;
}

__global__ void finalize_kernel(const float* __restrict usum, float* __restrict scores, int64_t U) {
  const int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u < U) scores[u] += usum[u] * usum[u];
}

unsigned int blocks_for(int64_t n, int per_block) {
  return static_cast<unsigned int>((n + per_block - 1) / per_block);
}

}  // namespace

void saliency_cuda(int64_t table, int64_t num_tensors, int64_t index, int64_t scores, int64_t num_units,
                   int64_t total_tiles, int64_t num_lines, int64_t line_tab_off, int64_t csr_ptr_off,
                   int64_t csr_idx_off, int64_t part, int64_t lines, int64_t unit_sums, bool deterministic,
                   int device, int64_t stream) {
  NVIT_CHECK(total_tiles < (int64_t(1) << 31), "saliency: too many tiles for one launch");
  // Our static runtime keeps its own current device: set it to the tensors' device.
  NVIT_CUDA_CHECK(cudaSetDevice(device));
  cudaStream_t s = as_stream(stream);
  const auto* tab = reinterpret_cast<const int64_t*>(table);
  const auto* idx = reinterpret_cast<const int32_t*>(index);
  auto* sc = reinterpret_cast<float*>(scores);
  auto* pt = reinterpret_cast<float*>(part);
  auto* ln = reinterpret_cast<float*>(lines);
  auto* us = reinterpret_cast<float*>(unit_sums);
  const int32_t T = static_cast<int32_t>(num_tensors), U = static_cast<int32_t>(num_units);
  if (deterministic) {
    if (total_tiles > 0)
      tiles_kernel<true><<<static_cast<unsigned int>(total_tiles), kThreads, 0, s>>>(tab, T, idx, pt, nullptr, U);
    if (num_lines > 0)
      lines_kernel<<<blocks_for(num_lines, kThreads), kThreads, 0, s>>>(idx + line_tab_off, pt, ln, num_lines);
    if (num_units > 0)
      units_kernel<<<blocks_for(num_units * 32, kThreads), kThreads, 0, s>>>(idx + csr_ptr_off, idx + csr_idx_off,
                                                                            ln, sc, num_units);
  } else {
    NVIT_CUDA_CHECK(cudaMemsetAsync(us, 0, sizeof(float) * num_units, s));
    if (total_tiles > 0)
      tiles_kernel<false><<<static_cast<unsigned int>(total_tiles), kThreads, 0, s>>>(tab, T, idx, nullptr, us, U);
    if (num_units > 0) finalize_kernel<<<blocks_for(num_units, kThreads), kThreads, 0, s>>>(us, sc, num_units);
  }
  NVIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nvit

// Uneven per-head QK/V attention on the CPU (forward and backward), all heads of a block per call.
//
// Layout: qkv [B, N, W] with W = sum_h (2 qk_h + v_h), per head [q_h | k_h | v_h]; out [B, N, sum_h v_h].
// Every matmul here runs "vectorised over queries": a tile of Mq (16 or 32) queries fills the SIMD
// lanes, and the head dims are the loop (reduction) or broadcast dimension. So no head dim is ever
// padded: a head of QK dim 17 costs 17, not 32. Only the last query tile is rounded up to 16 lanes.
//
//   forward, per task (b, h, query tile):  S^T = K Q^T   (keys x queries, scale folded into Q)
//                                          softmax down each column (one query per lane)
//                                          O^T = V^T P^T, store O = O^T^T / l
//   backward, per task (b, h) (so dK and dV have one owner, no reduction between threads):
//     per query tile: P again, dP^T = V dO^T, G = scale * P * (dP - rowsum(dO*O)),
//                     dQ^T = K^T G^T (stored), dK += G Q, dV += P dO (head dim padded in scratch only).
//
// All of these are C (+)= A B with B and C row-major in aligned scratch (row length a multiple of the
// SIMD width) and A read with arbitrary strides as broadcast scalars: one register-blocked kernel.
// N is small for ViTs (<= ~600), so a whole column of scores stays in L1/L2: plain (not online)
// softmax. fp16/bf16 inputs are converted to fp32 once per tile; fp64 runs in double (for gradcheck).
//
// Optional additive logits (Swin window attention): bias [H, N, N] (per head, shared by the batch) and
// mask [nW, N, N] (batch b uses mask[b % nW]), both in the compute type. They are transposed once per
// call to key-major rows padded to the query lanes (biasT[h][j][i]), so a tile's scores start as
// bias + mask rows and the S^T gemm accumulates onto them (no extra pass over the scores). A query
// whose logits are all -inf gets P = 0 (output 0, no gradient), not NaN. The backward accumulates
// dlogits into key-major partials, one per (head, fixed batch chunk) task, summed in a fixed order and
// transposed into grad_bias at the end (deterministic, no atomics). Without bias/mask the kernels take
// the same paths as before (branches outside the inner loops).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "attention.h"
#include "common.h"

namespace py = pybind11;

namespace nvit {
namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / sizeof(T);
  static V load(const T* p) { return *reinterpret_cast<const V*>(p); }  // p is kVecBytes-aligned
  static void store(T* p, V v) { *reinterpret_cast<V*>(p) = v; }
  static V splat(T x) { return V{} + x; }
};

// ---- storage <-> compute conversions ------------------------------------------------------------
struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

template <typename T> inline T to_c(float x) { return static_cast<T>(x); }
template <typename T> inline T to_c(double x) { return static_cast<T>(x); }
template <typename T> inline T to_c(F16 x) {  // memcpy, not a pointer cast: no strict-aliasing hazard
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof h);
  return static_cast<T>(static_cast<float>(h));
}
template <typename T> inline T to_c(BF16 x) { return static_cast<T>(bf16_to_float(x.bits)); }

template <typename S> inline S from_c(float x);
template <> inline float from_c<float>(float x) { return x; }
template <> inline F16 from_c<F16>(float x) { return F16{float_to_fp16(x)}; }
template <> inline BF16 from_c<BF16>(float x) { return BF16{float_to_bf16(x)}; }
template <typename S> inline S from_c(double x);
template <> inline double from_c<double>(double x) { return x; }

// ---- aligned scratch ----------------------------------------------------------------------------
template <typename T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  void need(size_t count) {
    if (count <= n) return;
    std::free(p);
    size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
    n = count;
  }
  ~Buf() { std::free(p); }
};

inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

// ---- register-blocked C[M x NV*W] (+)= A(M x K) B[K x NV*W] --------------------------------------
// A(m, k) = a[m * sam + k * sak] (broadcast), B and C rows aligned with lengths ldb, ldc.
// With MAX, cmax[0 : NV*W] also takes the running column max of C (the forward's softmax max,
// fused here so the scores are not read once more just for it).
template <typename T, int MR, int NV, bool MAX = false>
inline void micro(const T* a, long sam, long sak, const T* b, long ldb, T* c, long ldc, long K, bool acc,
                  T* cmax = nullptr) {
  using X = Simd<T>;
  typename X::V r[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) r[m][v] = acc ? X::load(c + m * ldc + v * X::W) : typename X::V{};
  for (long k = 0; k < K; ++k) {
    typename X::V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = X::load(b + k * ldb + v * X::W);
    const T* ak = a + k * sak;
    for (int m = 0; m < MR; ++m) {
      const T am = ak[m * sam];
      for (int v = 0; v < NV; ++v) r[m][v] += am * bv[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) X::store(c + m * ldc + v * X::W, r[m][v]);
  if constexpr (MAX) {
    for (int v = 0; v < NV; ++v) {
      auto mx = X::load(cmax + v * X::W);
      for (int m = 0; m < MR; ++m) mx = r[m][v] > mx ? r[m][v] : mx;
      X::store(cmax + v * X::W, mx);
    }
  }
}

template <typename T, int NV, int MR, bool MAX>
inline void rows_tail(long rem, const T* a, long sam, long sak, const T* b, long ldb, T* c, long ldc, long K,
                      bool acc, T* cmax) {
  if constexpr (MR > 0) {
    if (rem == MR) return micro<T, MR, NV, MAX>(a, sam, sak, b, ldb, c, ldc, K, acc, cmax);
    rows_tail<T, NV, MR - 1, MAX>(rem, a, sam, sak, b, ldb, c, ldc, K, acc, cmax);
  }
}

// Rows per block: NV=2 -> 12x2 accumulators, NV=1 -> 16x1 (within 32 AVX-512 registers; half with AVX2).
template <int NV> constexpr int mr_for() { return kVecBytes == 64 ? (NV == 2 ? 12 : 16) : (NV == 2 ? 6 : 8); }

// cmax (with MAX): Ncols running column maxima, updated (the caller initialises them).
template <typename T, bool MAX = false>
void gemm(long M, long Ncols, long K, const T* a, long sam, long sak, const T* b, long ldb, T* c, long ldc,
          bool acc, T* cmax = nullptr) {
  constexpr int W = Simd<T>::W;
  long n0 = 0;
  for (; n0 + 2 * W <= Ncols; n0 += 2 * W) {
    constexpr int MR = mr_for<2>();
    T* mx = MAX ? cmax + n0 : nullptr;
    long m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
      micro<T, MR, 2, MAX>(a + m0 * sam, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc, K, acc, mx);
    if (m0 < M)
      rows_tail<T, 2, MR - 1, MAX>(M - m0, a + m0 * sam, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc, K, acc, mx);
  }
  for (; n0 < Ncols; n0 += W) {
    constexpr int MR = mr_for<1>();
    T* mx = MAX ? cmax + n0 : nullptr;
    long m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
      micro<T, MR, 1, MAX>(a + m0 * sam, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc, K, acc, mx);
    if (m0 < M)
      rows_tail<T, 1, MR - 1, MAX>(M - m0, a + m0 * sam, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc, K, acc, mx);
  }
}

// ---- exp on a vector of non-positive arguments (x - rowmax) ----------------------------------------
// float: Cody-Waite range reduction + degree-6 polynomial (~1 ulp), 2^n built in the exponent bits.
// Arguments below -87 give exactly 0 (exp(-87) ~ 1.6e-38: far below any softmax term that matters). Not
// clamping them to exp(-87) matters for masks: a -100 (or -inf) logit would otherwise give a weight of
// 1.6e-38, whose products in P V are subnormal, which x86 handles in microcode: a Swin-masked call ran
// 2.3x (-100) to 10x (-inf) slower than an unmasked one.
#if defined(__AVX512F__)
// Same reduction and polynomial, with AVX-512's roundscale and scalef (2^n, underflow to 0 built in):
// 16 instructions instead of ~21 (the exp is a quarter of the forward's non-FMA work).
inline Simd<float>::V vexp(Simd<float>::V xv) {
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)xv, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  __m512 x = _mm512_max_ps((__m512)xv, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return (Simd<float>::V)_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
#else
inline Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
  const auto keep = x >= -87.0f;
  x = keep ? x : V{} - 87.0f;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V t = x * 1.44269504088896341f + magic;
  V n = t - magic;
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &e, sizeof scale);
  return keep ? p * scale : V{};
}
#endif
inline Simd<double>::V vexp(Simd<double>::V x) {  // the fp64 path exists for gradcheck: exact beats fast
  Simd<double>::V y;
  for (int i = 0; i < Simd<double>::W; ++i) y[i] = std::exp(x[i]);
  return y;
}

// Column softmax of st [N x cols] (cols a multiple of W). Writes exp(s - max) in place and, per
// column, 1/sum into inv_l. With `normalise`, st becomes P itself.
template <typename T>
void column_softmax(T* st, long N, long cols, T* inv_l, bool normalise) {
  using X = Simd<T>;
  for (long v = 0; v < cols; v += X::W) {
    auto mx = X::splat(-std::numeric_limits<T>::infinity());
    for (long j = 0; j < N; ++j) {
      auto s = X::load(st + j * cols + v);
      mx = s > mx ? s : mx;
    }
    // A column of all -inf (a fully masked query): subtract 0 instead of -inf (no NaN), then P = 0.
    const auto dead = mx == X::splat(-std::numeric_limits<T>::infinity());
    mx = dead ? X::splat(T(0)) : mx;
    auto l = typename X::V{};
    for (long j = 0; j < N; ++j) {
      auto e = vexp(X::load(st + j * cols + v) - mx);
      X::store(st + j * cols + v, e);
      l += e;
    }
    auto il = dead ? X::splat(T(0)) : X::splat(T(1)) / l;
    X::store(inv_l + v, il);
    if (normalise)
      for (long j = 0; j < N; ++j) X::store(st + j * cols + v, X::load(st + j * cols + v) * il);
  }
}

// Forward softmax: the column maxima `mx` came with the scores (gemm<T, true>), so one pass writes
// exp(s - max) in place and sums it; inv_l gets 1/sum per column.
template <typename T>
void column_exp(T* st, long N, long cols, const T* mx, T* inv_l) {
  using X = Simd<T>;
  for (long v = 0; v < cols; v += X::W) {
    const auto m = X::load(mx + v);
    auto l0 = typename X::V{}, l1 = typename X::V{};  // two chains: the adds do not wait on each other
    long j = 0;
    for (; j + 1 < N; j += 2) {
      auto e0 = vexp(X::load(st + j * cols + v) - m), e1 = vexp(X::load(st + (j + 1) * cols + v) - m);
      X::store(st + j * cols + v, e0);
      X::store(st + (j + 1) * cols + v, e1);
      l0 += e0;
      l1 += e1;
    }
    if (j < N) {
      auto e = vexp(X::load(st + j * cols + v) - m);
      X::store(st + j * cols + v, e);
      l0 += e;
    }
    X::store(inv_l + v, X::splat(T(1)) / (l0 + l1));
  }
}

// ---- 16 x 16 fp32 transposes for the forward's Q^T packing and O store (AVX-512) -----------------
// Scalar strided copies of Q and O cost ~15% of the forward at ViT sizes; in-register transposes
// cost a quarter of that. Rows past `rows` read as zeros; `cols` < 16 masks the columns.
#if defined(__AVX512F__)
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // r[4i + j], 128-bit lane L, holds rows 4i..4i+3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    __m512 a0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), a1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    __m512 b0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), b1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(a0, b0, 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(a0, b0, 0xDD);
    t[4 + j] = _mm512_shuffle_f32x4(a1, b1, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(a1, b1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// dst[c * ldd + i] = scale * src[i * lds + c] for i < 16 (rows >= `rows` give 0), c < cols (<= 16).
inline void pack_t16(const float* src, long lds, long rows, long cols, float scale, float* dst, long ldd) {
  const __mmask16 m = static_cast<__mmask16>((1u << cols) - 1u);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(m, src + i * lds) : _mm512_setzero_ps();
  transpose16(r);
  const __m512 s = _mm512_set1_ps(scale);
  for (long c = 0; c < cols; ++c) _mm512_store_ps(dst + c * ldd, _mm512_mul_ps(r[c], s));
}

// dst[i * ldd + c] = src[c * lds + i] * w[i] for c < cols (<= 16), i < rows (<= 16); src, w aligned.
inline void store_t16(const float* src, long lds, long rows, long cols, const float* w, float* dst, long ldd) {
  const __mmask16 m = static_cast<__mmask16>((1u << cols) - 1u);
  const __m512 wv = _mm512_load_ps(w);
  __m512 r[16];
  for (int c = 0; c < 16; ++c) r[c] = c < cols ? _mm512_mul_ps(_mm512_load_ps(src + c * lds), wv) : _mm512_setzero_ps();
  transpose16(r);
  for (long i = 0; i < rows; ++i) _mm512_mask_storeu_ps(dst + i * ldd, m, r[i]);
}
#endif

// Flush subnormal results to zero and read subnormal inputs as zero in this thread while in scope (the
// caller's MXCSR comes back at the end). Softmax weights of logits ~80 below the row max times small
// values land in the subnormal range; x86 computes those in microcode, ~100x slower per operation, for
// contributions below 1e-38 that change nothing.
struct FlushSubnormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

struct Heads {
  long B, N, H, width, out_width;
  std::vector<long> qk, v, in_off, out_off;
  std::vector<double> scale;
  long max_qk = 0, max_v = 0;
};

Heads make_heads(long B, long N, const std::vector<int64_t>& qk, const std::vector<int64_t>& v,
                 const std::vector<double>& scales) {
  NVIT_CHECK(B >= 1 && N >= 1, "uneven_attention: B and N must be >= 1");
  NVIT_CHECK(!qk.empty() && qk.size() == v.size() && qk.size() == scales.size(),
             "uneven_attention: qk_dims, v_dims and scales need one entry per head");
  Heads hd;
  hd.B = B;
  hd.N = N;
  hd.H = static_cast<long>(qk.size());
  long a = 0, o = 0;
  for (long h = 0; h < hd.H; ++h) {
    NVIT_CHECK(qk[h] >= 1 && v[h] >= 1, "uneven_attention: head dims must be >= 1");
    hd.qk.push_back(qk[h]);
    hd.v.push_back(v[h]);
    hd.in_off.push_back(a);
    hd.out_off.push_back(o);
    hd.scale.push_back(scales[h]);
    a += 2 * qk[h] + v[h];
    o += v[h];
    hd.max_qk = std::max<long>(hd.max_qk, qk[h]);
    hd.max_v = std::max<long>(hd.max_v, v[h]);
  }
  hd.width = a;
  hd.out_width = o;
  return hd;
}

void check_mask(const Heads& hd, uintptr_t mask, int64_t nw) {
  NVIT_CHECK(!mask || (nw >= 1 && hd.B % nw == 0),
             "uneven_attention: the batch must be a multiple of the mask's nW >= 1 (window b uses mask[b % nW])");
}

// Heads in decreasing cost, so dynamic scheduling ends with the small tasks (load balance).
std::vector<long> heads_by_cost(const Heads& hd) {
  std::vector<long> order(hd.H);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](long x, long y) { return hd.qk[x] + hd.v[x] > hd.qk[y] + hd.v[y]; });
  return order;
}

// Query tiles: 2W queries, the last one rounded up to W lanes only.
std::vector<std::pair<long, long>> query_tiles(long N, long W) {
  std::vector<std::pair<long, long>> t;  // (first query, lanes)
  for (long i0 = 0; i0 < N; i0 += 2 * W) t.emplace_back(i0, std::min(2 * W, round_up(N - i0, W)));
  return t;
}

// Pack K (rows j, cols d) and V of head h, batch b as compute-type rows. fp32/fp64 inputs are read in
// place instead (see `direct`).
template <typename S, typename T>
void pack_rows(const S* src, long N, long stride, long cols, T* dst) {
  for (long j = 0; j < N; ++j)
    for (long d = 0; d < cols; ++d) dst[j * cols + d] = to_c<T>(src[j * stride + d]);
}

// Additive logits as the kernels read them: key-major rows padded to np lanes (zeros past N).
template <typename T>
struct Extras {
  const T* bias = nullptr;  // [H][N][N] as given (query-major)
  const T* mask = nullptr;  // [nW][N][N]
  long nw = 0, np = 0;
  Buf<T> bias_t, mask_t;    // [H][N][np], [nW][N][np]: row j holds key j's logit term for every query
  bool any() const { return bias || mask; }
};

// dst[m][j][i] = src[m][i][j] for i < N, 0 for N <= i < np. Serial: (H + nW) N^2 copies are well under
// 1% of the attention's B H N^2 (qk + v) FMAs, and another parallel region (its fork and barrier) costs more
// than that on a busy machine.
template <typename T>
void transpose_tables(const T* src, long count, long N, long np, T* dst) {
  for (long mj = 0; mj < count * N; ++mj) {
    const long m = mj / N, j = mj % N;
    T* row = dst + mj * np;
    const T* col = src + m * N * N + j;
    for (long i = 0; i < N; ++i) row[i] = col[i * N];
    for (long i = N; i < np; ++i) row[i] = T(0);
  }
}

template <typename T>
void prepare_extras(Extras<T>& ex, const T* bias, const T* mask, long nw, const Heads& hd) {
  ex.bias = bias;
  ex.mask = mask;
  ex.nw = nw;
  ex.np = round_up(hd.N, Simd<T>::W);
  if (bias) {
    ex.bias_t.need(hd.H * hd.N * ex.np);
    transpose_tables(bias, hd.H, hd.N, ex.np, ex.bias_t.p);
  }
  if (mask) {
    ex.mask_t.need(nw * hd.N * ex.np);
    transpose_tables(mask, nw, hd.N, ex.np, ex.mask_t.p);
  }
}

// st[j][0:lanes] = biasT[h][j][i0:i0+lanes] + maskT[b % nW][j][i0:i0+lanes]: the scores' starting value.
template <typename T>
void init_scores(const Extras<T>& ex, long b, long h, long i0, long N, long lanes, T* st) {
  using X = Simd<T>;
  const T* bt = ex.bias ? ex.bias_t.p + h * N * ex.np + i0 : nullptr;
  const T* mt = ex.mask ? ex.mask_t.p + (b % ex.nw) * N * ex.np + i0 : nullptr;
  for (long j = 0; j < N; ++j)
    for (long c = 0; c < lanes; c += X::W) {
      typename X::V x;
      if (bt && mt) x = X::load(bt + j * ex.np + c) + X::load(mt + j * ex.np + c);
      else x = X::load((bt ? bt : mt) + j * ex.np + c);
      X::store(st + j * lanes + c, x);
    }
}

template <typename S, typename T>
void forward_impl(const S* qkv, S* out, const Heads& hd, const Extras<T>& ex, int nthreads) {
  constexpr int W = Simd<T>::W;
  constexpr bool direct = std::is_same<S, T>::value;
  const long N = hd.N;
  const auto tiles = query_tiles(N, W);
  // Tasks: with enough (b, h) pairs for every thread, one task is a whole (b, h), batch-major: one
  // thread then reads that head's K and V from memory once (two threads splitting its query tiles
  // would both pull them into their own caches), and neighbouring tasks share qkv's rows. With few
  // pairs (small B), one task per query tile keeps all threads busy; heads by decreasing cost.
  struct Task { long b, h, t0, t1; };
  std::vector<Task> tasks;
  const long ntiles = static_cast<long>(tiles.size());
  const auto order = heads_by_cost(hd);
  if (hd.B * hd.H >= 8L * nthreads) {
    for (long b = 0; b < hd.B; ++b)
      for (long h : order) tasks.push_back({b, h, 0, ntiles});
  } else {
    for (long h : order)
      for (long b = 0; b < hd.B; ++b)
        for (long t = 0; t < ntiles; ++t) tasks.push_back({b, h, t, t + 1});
  }
  const long ntask = static_cast<long>(tasks.size());

#pragma omp parallel num_threads(nthreads)
  {
    FlushSubnormals ftz;
    Buf<T> qt, st, ot, kp, vp, inv_l, mx;
    Buf<unsigned char> dead;
    qt.need(hd.max_qk * 2 * W);
    mx.need(2 * W);
    dead.need(2 * W);
    st.need(N * 2 * W);
    ot.need(hd.max_v * 2 * W);
    inv_l.need(2 * W);
    if (!direct) {
      kp.need(N * hd.max_qk);
      vp.need(N * hd.max_v);
    }
    long packed_b = -1, packed_h = -1;
#pragma omp for schedule(dynamic, 1)
    for (long ti = 0; ti < ntask; ++ti) {
      const Task tk = tasks[ti];
      const long dq = hd.qk[tk.h], dv = hd.v[tk.h];
      const S* base = qkv + tk.b * N * hd.width + hd.in_off[tk.h];
      const T scale = static_cast<T>(hd.scale[tk.h]);
      // K and V as compute-type rows: in place for fp32/fp64, else converted once per (b, h) per thread.
      const T *k, *v;
      long ldk, ldv;
      if constexpr (direct) {
        k = base + dq;
        v = base + 2 * dq;
        ldk = ldv = hd.width;
      } else {
        if (packed_b != tk.b || packed_h != tk.h) {
          pack_rows<S, T>(base + dq, N, hd.width, dq, kp.p);
          pack_rows<S, T>(base + 2 * dq, N, hd.width, dv, vp.p);
          packed_b = tk.b;
          packed_h = tk.h;
        }
        k = kp.p;
        v = vp.p;
        ldk = dq;
        ldv = dv;
      }
      for (long tile = tk.t0; tile < tk.t1; ++tile) {
      const long i0 = tiles[tile].first, lanes = tiles[tile].second, valid = std::min(lanes, N - i0);
      S* o = out + (tk.b * N + i0) * hd.out_width + hd.out_off[tk.h];
      constexpr bool fast_t = kVecBytes == 64 && std::is_same<S, float>::value;  // AVX-512 fp32 transposes
      // Q^T (scaled), zero lanes past the last query.
      if constexpr (fast_t) {
#if defined(__AVX512F__)
        for (long ib = 0; ib < lanes; ib += 16)
          for (long d0 = 0; d0 < dq; d0 += 16)
            pack_t16(base + (i0 + ib) * hd.width + d0, hd.width, std::max(0L, std::min(16L, valid - ib)),
                     std::min(16L, dq - d0), scale, qt.p + d0 * lanes + ib, lanes);
#endif
      } else {
        for (long d = 0; d < dq; ++d) {
          T* row = qt.p + d * lanes;
          for (long i = 0; i < valid; ++i) row[i] = scale * to_c<T>(base[(i0 + i) * hd.width + d]);
          for (long i = valid; i < lanes; ++i) row[i] = T(0);
        }
      }
      std::fill(mx.p, mx.p + lanes, -std::numeric_limits<T>::infinity());
      if (!ex.any()) {
        gemm<T, true>(N, lanes, dq, k, ldk, 1, qt.p, lanes, st.p, lanes, false, mx.p);  // S^T = K Q^T, column max
        column_exp<T>(st.p, N, lanes, mx.p, inv_l.p);                                     // unnormalised P^T
      } else {
        init_scores(ex, tk.b, tk.h, i0, N, lanes, st.p);                                  // bias + mask
        gemm<T, true>(N, lanes, dq, k, ldk, 1, qt.p, lanes, st.p, lanes, true, mx.p);   // += K Q^T
        // A fully masked query (max -inf): exp(s - 0) instead of NaN, then 1/l := 0 (output 0).
        for (long c = 0; c < lanes; ++c) dead.p[c] = mx.p[c] == -std::numeric_limits<T>::infinity();
        for (long c = 0; c < lanes; ++c)
          if (dead.p[c]) mx.p[c] = T(0);
        column_exp<T>(st.p, N, lanes, mx.p, inv_l.p);
        for (long c = 0; c < lanes; ++c)
          if (dead.p[c]) inv_l.p[c] = T(0);
      }
      gemm<T>(dv, lanes, N, v, 1, ldv, st.p, lanes, ot.p, lanes, false);               // O^T = V^T P^T
      if constexpr (fast_t) {
#if defined(__AVX512F__)
        for (long ib = 0; ib < valid; ib += 16)
          for (long c0 = 0; c0 < dv; c0 += 16)
            store_t16(ot.p + c0 * lanes + ib, lanes, std::min(16L, valid - ib), std::min(16L, dv - c0), inv_l.p + ib,
                      reinterpret_cast<float*>(o) + ib * hd.out_width + c0, hd.out_width);
#endif
      } else {
        for (long i = 0; i < valid; ++i)
          for (long c = 0; c < dv; ++c) o[i * hd.out_width + c] = from_c<S>(ot.p[c * lanes + i] * inv_l.p[i]);
      }
      }
    }
  }
}

// gbias (when not null): [H][N][N] in T, the sum over the batch of dlogits (before the scale).
template <typename S, typename T>
void backward_impl(const S* gout, const S* qkv, const S* out, S* gqkv, const Heads& hd, const Extras<T>& ex,
                   T* gbias, int nthreads) {
  constexpr int W = Simd<T>::W;
  constexpr bool direct = std::is_same<S, T>::value;
  const long N = hd.N;
  const auto tiles = query_tiles(N, W);
  // Tasks: batch elements [b0, b1) of head h. Without bias, one element each. With bias, the batch is cut
  // into `chunks` fixed ranges and task (h, chunk c) alone adds its dlogits into its key-major partial
  // [N][np] (slot c, h): whole score rows as vector adds, no atomics, and the final sum over c runs in a
  // fixed order, so grad_bias does not depend on which thread ran what (deterministic, gradcheck-safe).
  // chunks * H * N * np values: ~800 KB for a Swin block (16 heads, N = 49) on 2 threads.
  struct Task { long b0, b1, h, chunk; };
  std::vector<Task> tasks;
  const long chunks = gbias ? std::min<long>(hd.B, 2L * nthreads) : 0;  // 2 per thread: load balance
  for (long h : heads_by_cost(hd)) {
    if (gbias) {
      for (long c = 0; c < chunks; ++c) tasks.push_back({hd.B * c / chunks, hd.B * (c + 1) / chunks, h, c});
    } else {
      for (long b = 0; b < hd.B; ++b) tasks.push_back({b, b + 1, h, -1});
    }
  }
  const long ntask = static_cast<long>(tasks.size());
  const long qk_pad = round_up(hd.max_qk, W), v_pad = round_up(hd.max_v, W);
  const long np = round_up(N, W), slot = N * np;
  Buf<T> gpart;
  if (gbias) gpart.need(static_cast<size_t>(chunks * hd.H * slot));

#pragma omp parallel num_threads(nthreads)
  {
    FlushSubnormals ftz;
    Buf<T> qt, qr, dot_, dor, st, dpt, dqt, dk, dv_acc, kp, vp, inv_l, dsum;
    qt.need(hd.max_qk * 2 * W);
    qr.need(2 * W * qk_pad);
    dot_.need(hd.max_v * 2 * W);
    dor.need(2 * W * v_pad);
    st.need(N * 2 * W);
    dpt.need(N * 2 * W);
    dqt.need(hd.max_qk * 2 * W);
    dk.need(N * qk_pad);
    dv_acc.need(N * v_pad);
    inv_l.need(2 * W);
    dsum.need(2 * W);
    if (!direct) {
      kp.need(N * hd.max_qk);
      vp.need(N * hd.max_v);
    }
#pragma omp for schedule(dynamic, 1)
    for (long ti = 0; ti < ntask; ++ti) {
      const Task& task = tasks[ti];
      T* gb_slot = gbias ? gpart.p + (task.chunk * hd.H + task.h) * slot : nullptr;
      if (gb_slot) std::fill(gb_slot, gb_slot + slot, T(0));
      for (long bb = task.b0; bb < task.b1; ++bb) {
      const struct { long b, h; } tk{bb, task.h};
      const long dq = hd.qk[tk.h], dv = hd.v[tk.h];
      const long dqp = round_up(dq, W), dvp = round_up(dv, W);
      const S* base = qkv + tk.b * N * hd.width + hd.in_off[tk.h];
      const S* gobase = gout + tk.b * N * hd.out_width + hd.out_off[tk.h];
      const S* obase = out + tk.b * N * hd.out_width + hd.out_off[tk.h];
      S* gbase = gqkv + tk.b * N * hd.width + hd.in_off[tk.h];
      const T scale = static_cast<T>(hd.scale[tk.h]);
      const T *k, *v;
      long ldk, ldv;
      if constexpr (direct) {
        k = base + dq;
        v = base + 2 * dq;
        ldk = ldv = hd.width;
      } else {
        pack_rows<S, T>(base + dq, N, hd.width, dq, kp.p);
        pack_rows<S, T>(base + 2 * dq, N, hd.width, dv, vp.p);
        k = kp.p;
        v = vp.p;
        ldk = dq;
        ldv = dv;
      }
      std::fill(dk.p, dk.p + N * dqp, T(0));
      std::fill(dv_acc.p, dv_acc.p + N * dvp, T(0));
      for (const auto& tile : tiles) {
        const long i0 = tile.first, lanes = tile.second, valid = std::min(lanes, N - i0);
        // Q^T (scaled, for S) and Q rows (unscaled, padded, for dK); dO^T and dO rows; D = rowsum(dO*O).
        // Lanes past the last query are zero in dO, which zeroes their dP, D, G and dV share.
        for (long i = 0; i < lanes; ++i) {
          const bool ok = i < valid;
          T dsum_i = 0;
          for (long d = 0; d < dqp; ++d) {
            T x = (ok && d < dq) ? to_c<T>(base[(i0 + i) * hd.width + d]) : T(0);
            qr.p[i * dqp + d] = x;
            if (d < dq) qt.p[d * lanes + i] = scale * x;
          }
          for (long c = 0; c < dvp; ++c) {
            T g = (ok && c < dv) ? to_c<T>(gobase[(i0 + i) * hd.out_width + c]) : T(0);
            dor.p[i * dvp + c] = g;
            if (c < dv) {
              dot_.p[c * lanes + i] = g;
              if (ok) dsum_i += g * to_c<T>(obase[(i0 + i) * hd.out_width + c]);
            }
          }
          dsum.p[i] = dsum_i;
        }
        if (ex.any()) {
          init_scores(ex, tk.b, tk.h, i0, N, lanes, st.p);                          // bias + mask
          gemm<T>(N, lanes, dq, k, ldk, 1, qt.p, lanes, st.p, lanes, true);         // S^T (+= K Q^T)
        } else {
          gemm<T>(N, lanes, dq, k, ldk, 1, qt.p, lanes, st.p, lanes, false);        // S^T
        }
        column_softmax<T>(st.p, N, lanes, inv_l.p, true);                          // P^T
        gemm<T>(N, lanes, dv, v, ldv, 1, dot_.p, lanes, dpt.p, lanes, false);      // dP^T = V dO^T
        gemm<T>(N, dvp, lanes, st.p, lanes, 1, dor.p, dvp, dv_acc.p, dvp, true);   // dV += P dO
        using X = Simd<T>;
        // G = dlogits = P (dP - D), unscaled: it is grad_bias's share; the scale goes onto dQ and dK.
        // Lanes past the last query have dO = 0, so G = 0 there.
        for (long j = 0; j < N; ++j)
          for (long c = 0; c < lanes; c += W) {
            auto p = X::load(st.p + j * lanes + c);
            X::store(dpt.p + j * lanes + c, p * (X::load(dpt.p + j * lanes + c) - X::load(dsum.p + c)));
          }
        if (gb_slot) {
          T* gb = gb_slot + i0;
          for (long j = 0; j < N; ++j)
            for (long c = 0; c < lanes; c += W)
              X::store(gb + j * np + c, X::load(gb + j * np + c) + X::load(dpt.p + j * lanes + c));
        }
        gemm<T>(dq, lanes, N, k, 1, ldk, dpt.p, lanes, dqt.p, lanes, false);       // dQ^T = K^T G^T
        gemm<T>(N, dqp, lanes, dpt.p, lanes, 1, qr.p, dqp, dk.p, dqp, true);       // dK += G Q
        for (long i = 0; i < valid; ++i)
          for (long d = 0; d < dq; ++d) gbase[(i0 + i) * hd.width + d] = from_c<S>(scale * dqt.p[d * lanes + i]);
      }
      for (long j = 0; j < N; ++j) {
        for (long d = 0; d < dq; ++d) gbase[j * hd.width + dq + d] = from_c<S>(scale * dk.p[j * dqp + d]);
        for (long c = 0; c < dv; ++c) gbase[j * hd.width + 2 * dq + c] = from_c<S>(dv_acc.p[j * dvp + c]);
      }
      }  // batch elements of the task
    }
    if (gbias) {  // the loop's barrier has passed: every partial is complete
#pragma omp for schedule(static)
      for (long hi = 0; hi < hd.H * N; ++hi) {  // grad_bias[h][i][:] = sum_c partial[c][h][:][i]
        const long h = hi / N, i = hi % N;
        T* dst = gbias + hi * N;
        for (long j = 0; j < N; ++j) {
          T acc = 0;
          for (long c = 0; c < chunks; ++c) acc += gpart.p[(c * hd.H + h) * slot + j * np + i];
          dst[j] = acc;
        }
      }
    }
  }
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    case kFloat16: return f(static_cast<F16*>(nullptr), static_cast<float*>(nullptr));
    case kBFloat16: return f(static_cast<BF16*>(nullptr), static_cast<float*>(nullptr));
    case kFloat64: return f(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    default: fail(std::string("uneven_attention: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace
}  // namespace nvit

void register_attention(py::module_& m) {
  using namespace nvit;
  m.def(
      "uneven_attention_forward",
      [](uintptr_t qkv, uintptr_t out, int64_t B, int64_t N, int dtype, std::vector<int64_t> qk,
         std::vector<int64_t> v, std::vector<double> scales, int nthreads, uintptr_t bias, uintptr_t mask,
         int64_t nw) {
        Heads hd = make_heads(B, N, qk, v, scales);
        check_mask(hd, mask, nw);
        py::gil_scoped_release nogil;
        by_dtype(dtype, [&](auto* s_tag, auto* t_tag) {
          using S = std::remove_pointer_t<decltype(s_tag)>;
          using T = std::remove_pointer_t<decltype(t_tag)>;
          const int nt = std::max(1, nthreads);
          Extras<T> ex;
          prepare_extras(ex, reinterpret_cast<const T*>(bias), reinterpret_cast<const T*>(mask), nw, hd);
          forward_impl<S, T>(reinterpret_cast<const S*>(qkv), reinterpret_cast<S*>(out), hd, ex, nt);
        });
      },
      py::arg("qkv"), py::arg("out"), py::arg("B"), py::arg("N"), py::arg("dtype"), py::arg("qk_dims"),
      py::arg("v_dims"), py::arg("scales"), py::arg("nthreads"), py::arg("bias") = 0, py::arg("mask") = 0,
      py::arg("nW") = 0,
      "out[B,N,sum v] = per-head softmax(scale q k^T + bias[h] + mask[b % nW]) v of contiguous qkv[B,N,sum(2qk+v)] "
      "(data pointers; bias [H,N,N] and mask [nW,N,N] contiguous in the compute type (fp32, fp64 for fp64), 0 = "
      "absent)");
  m.def(
      "uneven_attention_backward",
      [](uintptr_t gout, uintptr_t qkv, uintptr_t out, uintptr_t gqkv, int64_t B, int64_t N, int dtype,
         std::vector<int64_t> qk, std::vector<int64_t> v, std::vector<double> scales, int nthreads, uintptr_t bias,
         uintptr_t mask, int64_t nw, uintptr_t gbias) {
        Heads hd = make_heads(B, N, qk, v, scales);
        check_mask(hd, mask, nw);
        NVIT_CHECK((bias == 0) == (gbias == 0), "uneven_attention: bias and grad_bias come together");
        py::gil_scoped_release nogil;
        by_dtype(dtype, [&](auto* s_tag, auto* t_tag) {
          using S = std::remove_pointer_t<decltype(s_tag)>;
          using T = std::remove_pointer_t<decltype(t_tag)>;
          const int nt = std::max(1, nthreads);
          Extras<T> ex;
          prepare_extras(ex, reinterpret_cast<const T*>(bias), reinterpret_cast<const T*>(mask), nw, hd);
          backward_impl<S, T>(reinterpret_cast<const S*>(gout), reinterpret_cast<const S*>(qkv),
                              reinterpret_cast<const S*>(out), reinterpret_cast<S*>(gqkv), hd, ex,
                              reinterpret_cast<T*>(gbias), nt);
        });
      },
      py::arg("grad_out"), py::arg("qkv"), py::arg("out"), py::arg("grad_qkv"), py::arg("B"), py::arg("N"),
      py::arg("dtype"), py::arg("qk_dims"), py::arg("v_dims"), py::arg("scales"), py::arg("nthreads"),
      py::arg("bias") = 0, py::arg("mask") = 0, py::arg("nW") = 0, py::arg("grad_bias") = 0,
      "grad_qkv (every element written) from grad_out, qkv and the forward's out (data pointers); with bias, "
      "grad_bias [H,N,N] (compute type) = sum over the batch of dlogits");
  m.attr("attention_bias_mask") = true;  // the kernels take bias/mask (the Python side checks for it)
  m.attr("attention_cuda_max_dim") = kAttnCudaMaxDim;
#ifdef NVIT_WITH_CUDA
  m.def(
      "uneven_attention_forward_cuda",
      [](uintptr_t qkv, uintptr_t out, int64_t B, int64_t N, int dtype, std::vector<int64_t> qk,
         std::vector<int64_t> v, std::vector<double> scales, long long stream, uintptr_t bias, uintptr_t mask,
         int64_t nw) {
        py::gil_scoped_release nogil;
        uneven_attention_forward_cuda(reinterpret_cast<const void*>(qkv), reinterpret_cast<void*>(out), B, N, dtype,
                                      qk, v, scales, reinterpret_cast<const void*>(bias),
                                      reinterpret_cast<const void*>(mask), nw, stream);
      },
      py::arg("qkv"), py::arg("out"), py::arg("B"), py::arg("N"), py::arg("dtype"), py::arg("qk_dims"),
      py::arg("v_dims"), py::arg("scales"), py::arg("stream"), py::arg("bias") = 0, py::arg("mask") = 0,
      py::arg("nW") = 0,
      "CUDA forward (device pointers, stream handle); head dims <= attention_cuda_max_dim; optional fp32 bias "
      "[H,N,N] and mask [nW,N,N] (0 = absent)");
#endif
}

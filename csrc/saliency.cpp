// Fused Hessian-saliency pass (CPU): scores[u] += (Σ_{(r,c) in u} w·g)² over a whole parameter list.
//
// The pass is memory-bound: every (weight, grad) element is read exactly once. One OpenMP region
// runs three phases separated by barriers:
//   1. items (row blocks of a column block of a tensor, ~128K elements, over ALL tensors, so many
//      small tensors still spread over the threads): per row, Σ_c w·g (row partial) and, into a
//      column accumulator that stays in L1, Σ_r w·g (column partial). Every item writes its own
//      partial slots, so no two threads touch the same memory.
//   2. lines: each row/column line sum = ordered fp64 sum of its partials.
//   3. units: gather the line sums of each unit in CSR order (fp64), square, add into scores.
// The item partition depends only on the tensor shapes and every sum runs in a fixed order, so the
// result is bit-identical across runs and thread counts (deterministic mode costs nothing here).
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "saliency.h"

namespace py = pybind11;

namespace nvit {
namespace {
using namespace sal;

constexpr int64_t kColBlock = 4096;      // column accumulator: 16 KB of fp32, stays in L1
constexpr int64_t kItemElems = 1 << 17;  // ~1 MB of fp32 weight+grad per item

struct LdF32 {
  using T = float;
  static float at(const T* p, int64_t i) { return p[i]; }
};
struct LdF16 {
  using T = _Float16;  // converts with vcvtph2ps (F16C / AVX-512) in the vectorised loop
  static float at(const T* p, int64_t i) { return static_cast<float>(p[i]); }
};
struct LdBF16 {
  using T = uint16_t;
  static float at(const T* p, int64_t i) { return bf16_to_float(p[i]); }
};

struct TensorJob {
  const void* w;
  const void* g;
  int dtype;
  bool row, col;            // has row maps / column maps
  int64_t rows, cols;       // canonical shape (column vectors transposed to one row)
  int64_t block;            // columns per block
  int64_t ncb, rows_per_item, nrb;
  int64_t row_part, col_part;  // offsets into the partials: [ncb][rows] and [nrb][cols]
  int64_t row_line, col_line;
};

struct Item {
  int32_t t;
  int32_t cb;
  int64_t rb;
};

// One item: rows [rb*rows_per_item, ...) of column block cb. Row partials go to
// part[row_part + cb*rows + r], column partials to part[col_part + rb*cols + c].
template <class L, bool ROW, bool COL>
void run_item(const TensorJob& tj, const Item& it, float* __restrict part) {
  using T = typename L::T;
  const T* __restrict w = static_cast<const T*>(tj.w);
  const T* __restrict g = static_cast<const T*>(tj.g);
  const int64_t C = tj.cols, c0 = it.cb * tj.block, n = std::min(tj.block, C - c0);
  const int64_t r0 = it.rb * tj.rows_per_item, r1 = std::min(tj.rows, r0 + tj.rows_per_item);
  float* __restrict acc = COL ? part + tj.col_part + it.rb * C + c0 : nullptr;
  float* __restrict rs = ROW ? part + tj.row_part + it.cb * tj.rows : nullptr;
  if (COL) std::fill(acc, acc + n, 0.f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict wr = w + r * C + c0;
    const T* __restrict gr = g + r * C + c0;
    if (ROW && COL) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < n; ++j) {
        const float p = L::at(wr, j) * L::at(gr, j);
        acc[j] += p;
        s += p;
      }
      rs[r] = s;
    } else if (ROW) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < n; ++j) s += L::at(wr, j) * L::at(gr, j);
      rs[r] = s;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += L::at(wr, j) * L::at(gr, j);
    }
  }
}

template <class L>
void run_item_dtype(const TensorJob& tj, const Item& it, float* part) {
  if (tj.row && tj.col) run_item<L, true, true>(tj, it, part);
  else if (tj.row) run_item<L, true, false>(tj, it, part);
  else run_item<L, false, true>(tj, it, part);
}

void dispatch_item(const TensorJob& tj, const Item& it, float* part) {
  switch (tj.dtype) {
    case kFloat32: run_item_dtype<LdF32>(tj, it, part); break;
    case kFloat16: run_item_dtype<LdF16>(tj, it, part); break;
    default: run_item_dtype<LdBF16>(tj, it, part); break;  // validated before the region
  }
}

void lines_of(const TensorJob& tj, const float* __restrict part, double* __restrict lines) {
  if (tj.row) {
    double* __restrict out = lines + tj.row_line;
    std::fill(out, out + tj.rows, 0.0);
    for (int64_t cb = 0; cb < tj.ncb; ++cb) {
      const float* __restrict p = part + tj.row_part + cb * tj.rows;
#pragma omp simd
      for (int64_t r = 0; r < tj.rows; ++r) out[r] += p[r];
    }
  }
  if (tj.col) {
    double* __restrict out = lines + tj.col_line;
    std::fill(out, out + tj.cols, 0.0);
    for (int64_t rb = 0; rb < tj.nrb; ++rb) {
      const float* __restrict p = part + tj.col_part + rb * tj.cols;
#pragma omp simd
      for (int64_t c = 0; c < tj.cols; ++c) out[c] += p[c];
    }
  }
}

// Scratch reused across calls: fresh multi-MB buffers would page-fault on every call.
thread_local std::vector<float> t_part;
thread_local std::vector<double> t_lines;

void saliency_cpu(int64_t table_addr, int64_t num_tensors, int64_t index_addr, int64_t scores_addr) {
  const int64_t* table = reinterpret_cast<const int64_t*>(table_addr);
  const int32_t* index = reinterpret_cast<const int32_t*>(index_addr);
  float* scores = reinterpret_cast<float*>(scores_addr);
  const int64_t* glob = table + num_tensors * kSalCols;
  NVIT_CHECK(glob[gVersion] == kVersion && glob[gTensors] == num_tensors,
             "saliency: plan table does not match this extension (rebuild the plan / the extension)");
  const int64_t U = glob[gUnits], L = glob[gLines];
  const int32_t* csr_ptr = index + glob[gCsrPtrOff];
  const int32_t* csr_idx = index + glob[gCsrIdxOff];

  std::vector<TensorJob> jobs;
  std::vector<Item> items;
  int64_t npart = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const int64_t* m = table + t * kSalCols;
    TensorJob tj{};
    tj.row = m[kNRowMaps] > 0;
    tj.col = m[kNColMaps] > 0;
    if (!tj.row && !tj.col) continue;  // feeds no unit: never read
    tj.dtype = static_cast<int>(m[kDType]);
    NVIT_CHECK(tj.dtype == kFloat32 || tj.dtype == kFloat16 || tj.dtype == kBFloat16,
               "saliency: tensor " + std::to_string(t) + " has unsupported dtype " + dtype_name(tj.dtype));
    tj.w = reinterpret_cast<const void*>(m[kWPtr]);
    tj.g = reinterpret_cast<const void*>(m[kGPtr]);
    tj.rows = m[kRows];
    tj.cols = m[kCols];
    // A single row has no column reuse: one wide block keeps items large.
    tj.block = tj.rows == 1 ? kItemElems : kColBlock;
    tj.ncb = (tj.cols + tj.block - 1) / tj.block;
    tj.rows_per_item = std::max<int64_t>(1, kItemElems / std::min(tj.block, tj.cols));
    tj.nrb = (tj.rows + tj.rows_per_item - 1) / tj.rows_per_item;
    tj.row_line = m[kRowLineOff];
    tj.col_line = m[kColLineOff];
    if (tj.row) { tj.row_part = npart; npart += tj.ncb * tj.rows; }
    if (tj.col) { tj.col_part = npart; npart += tj.nrb * tj.cols; }
    const int32_t j = static_cast<int32_t>(jobs.size());
    for (int64_t rb = 0; rb < tj.nrb; ++rb)
      for (int64_t cb = 0; cb < tj.ncb; ++cb) items.push_back({j, static_cast<int32_t>(cb), rb});
    jobs.push_back(tj);
  }
  if (static_cast<int64_t>(t_part.size()) < npart) t_part.resize(npart);
  if (static_cast<int64_t>(t_lines.size()) < L) t_lines.resize(L);
  float* part = t_part.data();
  double* lines = t_lines.data();
  const int64_t nitems = static_cast<int64_t>(items.size()), njobs = static_cast<int64_t>(jobs.size());

  py::gil_scoped_release nogil;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nitems; ++i) dispatch_item(jobs[items[i].t], items[i], part);
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < njobs; ++j) lines_of(jobs[j], part, lines);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {
      double s = 0.0;
      for (int32_t e = csr_ptr[u]; e < csr_ptr[u + 1]; ++e) s += lines[csr_idx[e]];
      scores[u] += static_cast<float>(s * s);
    }
  }
}

}  // namespace
}  // namespace nvit

#ifdef NVIT_WITH_CUDA
namespace nvit {
void saliency_cuda(int64_t table, int64_t num_tensors, int64_t index, int64_t scores, int64_t num_units,
                   int64_t total_tiles, int64_t num_lines, int64_t line_tab_off, int64_t csr_ptr_off,
                   int64_t csr_idx_off, int64_t part, int64_t lines, int64_t unit_sums, bool deterministic,
                   int device, int64_t stream);
}  // namespace nvit
#endif

void register_saliency(py::module_& m) {
  m.attr("saliency_layout_version") = nvit::sal::kVersion;
  m.def("saliency_accumulate_cpu", &nvit::saliency_cpu, py::arg("table"), py::arg("num_tensors"),
        py::arg("index"), py::arg("scores"),
        "scores[u] += (Σ w·g over unit u)² for CPU tensors. Takes addresses: the plan table with this "
        "call's pointers and dtypes filled in (int64 [T+1, cols]), the plan index (int32) and fp32 scores.");
#ifdef NVIT_WITH_CUDA
  m.def("saliency_accumulate_cuda", &nvit::saliency_cuda, py::arg("table"), py::arg("num_tensors"),
        py::arg("index"), py::arg("scores"), py::arg("num_units"), py::arg("total_tiles"),
        py::arg("num_lines"), py::arg("line_tab_off"), py::arg("csr_ptr_off"), py::arg("csr_idx_off"),
        py::arg("part"), py::arg("lines"), py::arg("unit_sums"), py::arg("deterministic"),
        py::arg("device"), py::arg("stream"),
        "CUDA saliency pass: device addresses of the table/index/scores/scratch, launched on `stream`.");
#endif
}

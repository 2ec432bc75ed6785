// Layout of the saliency plan shared by the C++ and CUDA kernels and nvit_kernels/saliency.py
// (which mirrors these numbers; keep them in sync).
//
// The plan is an int64 table of T+1 rows by kSalCols columns (row t: tensor t, row T: globals) and
// an int32 index array. Each tensor is seen as a contiguous [rows, cols] matrix; column vectors
// ([n, 1]) are stored transposed as [1, n] with row and column maps swapped, so a "vector" is
// always one long row. Per call the first three columns of each tensor row get the weight and grad
// data pointers and the dtype code.
//
// index: [unit maps | line table | CSR pointers | CSR entries], unit id == num_units means "none".
// - maps of tensor t at kMapOff: n_row_maps maps of `rows` ids, then n_col_maps maps of `cols` ids.
// - a "line" is a row or column of a tensor whose sum feeds units (row lines when the tensor has row
//   maps, column lines when it has column maps), numbered tensor by tensor (kRowLineOff, kColLineOff).
// - CSR: for unit u, entries [ptr[u], ptr[u+1]) list the lines whose sums add into u (a line appears
//   once per map naming u), so a unit's sum can be gathered in a fixed order.
// - GPU partials (the same for CUDA and Triton): tiles of kTileRows x kTileCols (vectors: 1 x
//   kVecTile); row partials of tensor t at kRowPartOff + col_tile*rows + r, column partials at
//   kColPartOff + row_tile*cols + c; the line table holds (first partial, stride, count) per line.
#pragma once
#include <cstdint>

namespace nvit {
namespace sal {

enum Col : int {
  kWPtr = 0, kGPtr, kDType, kRows, kCols, kNRowMaps, kNColMaps, kMapOff, kTile0, kNRowTiles,
  kNColTiles, kRowPartOff, kColPartOff, kRowLineOff, kColLineOff, kNumel, kSalCols
};
enum Global : int {
  gUnits = 0, gTensors, gTiles, gPartials, gLines, gLineTabOff, gCsrPtrOff, gCsrIdxOff, gEntries,
  gVersion, gTileRows, gTileCols, gVecTile
};
constexpr int64_t kVersion = 1;
constexpr int kTileRows = 32, kTileCols = 256, kVecTile = 4096;

}  // namespace sal
}  // namespace nvit

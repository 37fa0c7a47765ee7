// The CPU kernels' tile geometry: row blocks, key tiles (views of the input for full tiles, one
// padded copy for the ragged last tile) and the fixed split of row blocks into groups.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace fastneg {

// Copies rows [first, first + count) of src (gathered through index when given) into the
// zero-padded [rows, dim] scratch buffer dst.
template <typename T>
void fill_block(at::Tensor& dst, const at::Tensor& src, int64_t first, int64_t count, const int64_t* index) {
  dst.zero_();
  const int64_t dim = src.size(1);
  const T* s = src.data_ptr<T>();
  T* d = dst.data_ptr<T>();
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = index ? index[first + r] : first + r;
    std::memcpy(d + r * dim, s + row * dim, sizeof(T) * dim);
  }
}

struct Geometry {
  int64_t B, N, D, key_tile, num_row_blocks, num_key_tiles;
  Geometry(int64_t B_, int64_t N_, int64_t D_) : B(B_), N(N_), D(D_) {
    const int64_t padded_n = (N + 15) / 16 * 16;
    key_tile = std::max(kRowBlock, std::min(kMaxKeyTile, padded_n));
    num_row_blocks = (B + kRowBlock - 1) / kRowBlock;
    num_key_tiles = (N + key_tile - 1) / key_tile;
  }
  int64_t rows_in(int64_t rb) const { return std::min(kRowBlock, B - rb * kRowBlock); }
  int64_t cols_in(int64_t kt) const { return std::min(key_tile, N - kt * key_tile); }
};

// The key tiles of one matrix: views into the input for full tiles, one padded copy for the
// ragged last tile, so that every tile product has the same shape.
template <typename T>
struct KeyTiles {
  const at::Tensor* keys;
  at::Tensor last;
  const Geometry* g;
  KeyTiles(const at::Tensor& k, const Geometry& geo) : keys(&k), g(&geo) {
    const int64_t kt = g->num_key_tiles - 1;
    if (g->cols_in(kt) < g->key_tile) {
      last = at::empty({g->key_tile, k.size(1)}, k.options());
      fill_block<T>(last, k, kt * g->key_tile, g->cols_in(kt), nullptr);
    }
  }
  at::Tensor tile(int64_t kt) const {
    if (kt == g->num_key_tiles - 1 && last.defined()) return last;
    return keys->narrow(0, kt * g->key_tile, g->key_tile);
  }
};

// Row blocks are split into a fixed number of contiguous groups (one per thread at most),
// processed in parallel; per-group partials (column logsumexps in forward, key gradients in
// backward) are merged in group order: deterministic for a thread count.
inline int64_t row_groups(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.num_row_blocks));
}

}  // namespace fastneg

// The CPU kernels' score tiles (SPEC sections 2-4): one thread's row block, its score tile of the
// current key tile (each from one ATen matrix product of a fixed shape) and the positive scores.
//
// Consistent decisions: every score tile, including the one that yields the positive scores
// (the positives' keys gathered into a zero-padded tile), is produced by a matrix product of
// the same shape. Backward recomputes the tiles with the same products and reads the per-row
// thresholds saved by forward, so masks cannot flip between passes. An exact duplicate of a
// positive key is *not* guaranteed to score bit-identically to it: the BLAS product may round an
// element differently by its position in the tile (edge rows, e.g.), so at a margin of exactly 0
// a duplicate can fall on either side (docs/reference.md, "Ties at a threshold").
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "views.h"

namespace fastneg {

// One thread's buffers for a block of query rows: the rows (and their guide embeddings) and the
// score tile of the current key tile (and the guide's), as the forward, backward and sampler
// loops all read them.
template <typename T>
struct BlockTiles {
  at::Tensor q_blk, s_tile, gq_blk, t_tile;

  BlockTiles(const Inputs& in, const Geometry& g, const at::TensorOptions& opts)
      : q_blk(at::empty({kRowBlock, g.D}, opts)), s_tile(at::empty({kRowBlock, g.key_tile}, opts)) {
    if (in.guide()) {
      gq_blk = at::empty({kRowBlock, in.guide_query.size(1)}, opts);
      t_tile = at::empty({kRowBlock, g.key_tile}, opts);
    }
  }
  // rows r0 .. r0 + nr - 1 of the queries (and guide queries)
  void load_rows(const Inputs& in, int64_t r0, int64_t nr) {
    fill_block<T>(q_blk, in.query, r0, nr, nullptr);
    if (gq_blk.defined()) fill_block<T>(gq_blk, in.guide_query, r0, nr, nullptr);
  }
  // the block's scores (and guide scores) against key tile kt; returns that key tile
  at::Tensor score(const Shared<T>& sh, int64_t kt) {
    at::Tensor k_tile = sh.key_tiles.tile(kt);
    at::mm_out(s_tile, q_blk, k_tile.t());
    if (gq_blk.defined()) at::mm_out(t_tile, gq_blk, sh.guide_tiles->tile(kt).t());
    return k_tile;
  }
  T* scores() { return s_tile.data_ptr<T>(); }
  const T* guide_scores() { return t_tile.defined() ? t_tile.data_ptr<T>() : nullptr; }
  // row r of the scored block as the view of key tile j0 .. j0 + nc - 1
  TileView<T> row_tile(const Shared<T>& sh, int64_t r, int64_t j0, int64_t nc) {
    const T* t = guide_scores();
    return make_tile<T>(sh, scores() + r * s_tile.size(1), t ? t + r * t_tile.size(1) : nullptr, j0, nc);
  }
};

// Positive scores of one row block, from a tile product of the standard shape.
template <typename T>
void positive_scores(const at::Tensor& q_blk, const at::Tensor& src, const int64_t* positives, int64_t first,
                     int64_t rows, at::Tensor& gather_buf, at::Tensor& tile_buf, T* out) {
  fill_block<T>(gather_buf, src, first, rows, positives);
  at::mm_out(tile_buf, q_blk, gather_buf.t());
  const T* t = tile_buf.data_ptr<T>();
  const int64_t ld = tile_buf.size(1);
  for (int64_t r = 0; r < rows; ++r) out[r] = t[r * ld + r];
}

}  // namespace fastneg

// The CPU kernels' tiling (SPEC sections 2-4): inputs, key tiles, per-thread row blocks and their
// score tiles (each from one ATen matrix product of a fixed shape), the per-row state pre-pass,
// the symmetric loss's column views, and the choice of the element-wise kernels' build.
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
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "rules.h"

namespace fastneg {

namespace generic {
#include "row_kernels.h"
}  // namespace generic

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTNEG_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "row_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

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

struct Inputs {
  at::Tensor query, keys, positives, query_labels, key_labels, guide_query, guide_keys;
  at::Tensor exclude;  // [B] int64, -1 = none (undefined: no exclusions)
  bool labels() const { return key_labels.defined(); }
  int64_t label_levels() const { return labels() ? key_labels.size(0) : 0; }
  bool guide() const { return guide_query.defined(); }
};

// Checked, contiguous inputs of one call (csrc/inputs.cpp); labels as [levels, rows].
Inputs make_inputs(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                   const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
                   const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
                   const std::optional<at::Tensor>& exclude = std::nullopt);

// The combinations the fused loss refuses (also checked in Python, with friendlier messages).
void check_plan_use(const Plan& plan, const Inputs& in);

// What forward and backward share for one call: the key tiles and the scalars.
template <typename T>
struct Shared {
  KeyTiles<T> key_tiles;
  std::optional<KeyTiles<T>> guide_tiles;
  const int64_t* positives;
  const int64_t* key_labels;    // nullptr without labels
  const int64_t* query_labels;  // nullptr without labels
  const int64_t* exclude;       // nullptr without exclusions
  int64_t levels, B, N;
  T inv_temp, a, b, soft_inv;
  bool soft;
  Shared(const Inputs& in, const Geometry& g, double temperature, const Plan& plan)
      : key_tiles(in.keys, g),
        positives(in.positives.data_ptr<int64_t>()),
        key_labels(in.labels() ? in.key_labels.data_ptr<int64_t>() : nullptr),
        query_labels(in.labels() ? in.query_labels.data_ptr<int64_t>() : nullptr),
        exclude(in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr),
        levels(in.label_levels()),
        B(in.query.size(0)),
        N(in.keys.size(0)),
        inv_temp(T(1) / T(temperature)),
        a(T(plan.weight_a)),
        b(T(plan.weight_b)),
        soft_inv(plan.soft_temperature ? T(1) / T(*plan.soft_temperature) : T(0)),
        soft(plan.soft_temperature.has_value()) {
    if (in.guide()) guide_tiles.emplace(in.guide_keys, g);
  }
};

// One candidate list's view, for a query row or (symmetric loss) a key column: its positive, the
// rules' thresholds, and its own labels, read at `at` from a [levels, stride] label table.
template <typename T>
RowView<T> make_view(const Shared<T>& sh, int64_t positive, T positive_score, T threshold, T guide_threshold,
                     const int64_t* labels, int64_t stride, int64_t at, int64_t exclude = -1) {
  RowView<T> view{positive, exclude, positive_score, threshold, guide_threshold, sh.inv_temp, sh.soft_inv, {}};
  for (int64_t l = 0; l < sh.levels; ++l) view.query_label[l] = labels[l * stride + at];
  return view;
}

// Candidates first .. first + count - 1 of a view, with their labels from a [levels, stride] table.
template <typename T>
TileView<T> make_candidates(const Shared<T>& sh, const T* scores, const T* guide_scores, const int64_t* labels,
                            int64_t stride, int64_t first, int64_t count) {
  return TileView<T>{scores, guide_scores, labels ? labels + first : nullptr, first, count, sh.levels, stride};
}

template <typename T>
RowView<T> make_row(const Shared<T>& sh, int64_t i, T positive_score, T threshold, T guide_threshold) {
  return make_view<T>(sh, sh.positives[i], positive_score, threshold, guide_threshold, sh.query_labels, sh.B, i,
                      sh.exclude ? sh.exclude[i] : -1);
}

template <typename T>
TileView<T> make_tile(const Shared<T>& sh, const T* scores, const T* guide_scores, int64_t j0, int64_t nc) {
  return make_candidates<T>(sh, scores, guide_scores, sh.key_labels, sh.N, j0, nc);
}

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

// Calls f.template operator()<W, LABELS, GUIDE>() with the runtime flags as template args.
template <typename F>
void dispatch_flags(int weighting, bool labels, bool guide, F&& f) {
  auto with_w = [&](auto w) {
    if (labels) {
      if (guide) f.template operator()<decltype(w)::value, true, true>();
      else f.template operator()<decltype(w)::value, true, false>();
    } else {
      if (guide) f.template operator()<decltype(w)::value, false, true>();
      else f.template operator()<decltype(w)::value, false, false>();
    }
  };
  if (weighting == Weighting::SIMANS) with_w(std::integral_constant<int, Weighting::SIMANS>{});
  else if (weighting == Weighting::HARDNESS) with_w(std::integral_constant<int, Weighting::HARDNESS>{});
  else if (weighting == Weighting::GUIDE_HARDNESS) with_w(std::integral_constant<int, Weighting::GUIDE_HARDNESS>{});
  else if (weighting == Weighting::HCL) with_w(std::integral_constant<int, Weighting::HCL>{});
  else if (weighting == Weighting::GCSE) with_w(std::integral_constant<int, Weighting::GCSE>{});
  else with_w(std::integral_constant<int, Weighting::NONE>{});
}

// owner[j]: the row whose positive is key j, or -1. The symmetric loss gives each owned column a
// loss of its own (key j against every query), so positives must be distinct.
inline std::vector<int64_t> column_owners(const Inputs& in) {
  std::vector<int64_t> owner(in.keys.size(0), -1);
  const int64_t* p = in.positives.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.positives.numel(); ++i) {
    TORCH_CHECK_VALUE(owner[p[i]] < 0, "symmetric=True needs distinct positives: key ", p[i],
                      " is the positive of rows ", owner[p[i]], " and ", i);
    owner[p[i]] = i;
  }
  return owner;
}

// Column j (owned by row o) as a row of the transposed problem: its candidates are the queries,
// its rules come from the column's positive score s_{o j} (the same thresholds as row o's), and
// its labels are the key's labels compared with the queries'.
template <typename T>
RowView<T> make_column(const Shared<T>& sh, int64_t j, int64_t o, const T* pos_score, const T* thr, const T* gthr) {
  return make_view<T>(sh, o, pos_score[o], thr[o], gthr[o], sh.key_labels, sh.N, j);
}

// The queries r0 .. r0 + nr - 1 as the "keys" of a column (scores: one column of a transposed tile).
template <typename T>
TileView<T> make_column_tile(const Shared<T>& sh, const T* scores, const T* guide_scores, int64_t r0, int64_t nr) {
  return make_candidates<T>(sh, scores, guide_scores, sh.query_labels, sh.B, r0, nr);
}

// dst[c * kRowBlock + r] = src[r * ld + c] for the tile's live rows and columns.
template <typename T>
void transpose_tile(const T* src, int64_t rows, int64_t cols, int64_t ld, T* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * kRowBlock + r] = src[r * ld + c];
}

// One column's share of the symmetric loss, accumulated over the row blocks of one group.
template <typename T>
struct ColumnAcc {
  OnlineLSE<T> lse, lse_w;
  int64_t negatives = 0;
};

template <typename T>
void lse_merge(OnlineLSE<T>& acc, const OnlineLSE<T>& other) {
  acc.nan = acc.nan || other.nan;
  if (acc.nan || other.max == neg_inf<T>()) return;
  if (acc.max == neg_inf<T>()) {
    acc = other;
    return;
  }
  const T m = other.max > acc.max ? other.max : acc.max;
  acc.sum = acc.sum * std::exp(acc.max - m) + other.sum * std::exp(other.max - m);
  acc.max = m;
}

// Row blocks are split into a fixed number of contiguous groups (one per thread at most),
// processed in parallel; per-group partials (column logsumexps in forward, key gradients in
// backward) are merged in group order: deterministic for a thread count.
inline int64_t row_groups(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.num_row_blocks));
}

// s_i+ (and t_i+) of every row, and the thresholds derived from them. A pre-pass, because the
// symmetric loss's column j needs row o's values in every row block.
template <typename T>
void row_states(const Inputs& in, const Geometry& g, const Shared<T>& sh, const Plan& plan, T* pos_score,
                T* thr, T* gthr) {
  const auto opts = in.query.options();
  at::parallel_for(0, g.num_row_blocks, 1, [&](int64_t rb_begin, int64_t rb_end) {
    at::Tensor q_blk = at::empty({kRowBlock, g.D}, opts);
    at::Tensor gather_buf = at::empty({g.key_tile, g.D}, opts);
    at::Tensor s_tile = at::empty({kRowBlock, g.key_tile}, opts);
    at::Tensor gq_blk, g_gather;
    if (in.guide()) {
      gq_blk = at::empty({kRowBlock, in.guide_query.size(1)}, opts);
      g_gather = at::empty({g.key_tile, in.guide_query.size(1)}, opts);
    }
    std::vector<T> t_pos(kRowBlock);
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * kRowBlock, nr = g.rows_in(rb);
      fill_block<T>(q_blk, in.query, r0, nr, nullptr);
      positive_scores<T>(q_blk, in.keys, sh.positives + r0, 0, nr, gather_buf, s_tile, pos_score + r0);
      if (in.guide()) {
        fill_block<T>(gq_blk, in.guide_query, r0, nr, nullptr);
        positive_scores<T>(gq_blk, in.guide_keys, sh.positives + r0, 0, nr, g_gather, s_tile, t_pos.data());
      }
      for (int64_t r = 0; r < nr; ++r) {
        thr[r0 + r] = score_threshold<T>(pos_score[r0 + r], plan);
        gthr[r0 + r] = in.guide() ? guide_threshold<T>(t_pos[r], plan) : T(0);
      }
    }
  });
}

// The element-wise kernels' build: AVX2+FMA where the processor has it, else the generic one.
// FASTNEG_CPU_KERNELS=generic forces the generic build (tests compare the two).
template <typename F>
decltype(auto) with_row_kernels(F&& f) {
#ifdef FASTNEG_HAVE_AVX2_BUILD
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* forced = std::getenv("FASTNEG_CPU_KERNELS");
  if (has_avx2 && !(forced && std::string(forced) == "generic")) return f.template operator()<avx2::RowKernels>();
#endif
  return f.template operator()<generic::RowKernels>();
}

}  // namespace fastneg

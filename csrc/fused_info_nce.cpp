// CPU kernels of the fused contrastive op (SPEC sections 2-4).
//
// The score matrix is visited in tiles of kRowBlock x key_tile: each tile comes from one
// ATen matrix product into a small scratch buffer, then one fused pass applies the
// false-negative mask, the negative weighting and an online logsumexp. No [B, N] buffer
// exists; extra memory is a few tiles per thread plus O(B + N) (and, in backward, one
// [N, D] key-gradient partial per thread, summed in a fixed order so results are
// deterministic for a given thread count).
//
// Consistent decisions: every score tile, including the one that yields the positive scores
// (the positives' keys gathered into a zero-padded tile), is produced by a matrix product of
// the same shape. Backward recomputes the tiles with the same products and reads the per-row
// thresholds saved by forward, so masks cannot flip between passes. An exact duplicate of a
// positive key is *not* guaranteed to score bit-identically to it: the BLAS product may round an
// element differently by its position in the tile (edge rows, e.g.), so at a margin of exactly 0
// a duplicate can fall on either side (README, "Ties at a threshold").
//
// Symmetric (CLIP-style) loss in the same pass: each score tile is also read by columns. Key j
// that is row o's positive has its own loss, key j against every query, under the same rules
// (thresholds from s_{o j}); each thread group keeps an online logsumexp per owned column
// ([B] per group, not [B, N]), merged in group order after the pass. Backward adds the
// column direction's dS to the same tile before the two products.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace fastneg {
namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kMaxKeyTile = 256;
constexpr int kWeightNone = 0;
constexpr int kWeightSimANS = 1;
constexpr int kWeightHardness = 2;
constexpr int kWeightGuideHardness = 3;  // internal: beta_ij = a * t_ij (guide score), guide not masking
constexpr int kWeightHCL = 4;   // HCL: beta_ij = a l_ij + log n - logsumexp_k(a l_ik), with gradient
constexpr int kWeightGCSE = 5;  // GCSE: beta_ij = -l_ij exp(-(l_ij - r_ij)^2 / (2 a^2)) where l_ij <= r_ij
constexpr int64_t kMaxLabelLevels = 8;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// What one tile-row pass needs to classify key j of row i as the positive, a masked false
// negative or a weighted negative.
template <typename T>
struct RowView {
  int64_t positive;
  int64_t exclude;  // a column removed from this view entirely (neither positive, masked nor negative), or -1
  T positive_score, threshold, guide_threshold, inv_temp, soft_inv_temp;
  int64_t query_label[kMaxLabelLevels];  // one label per level (levels are OR-ed)
};

template <typename T>
struct TileView {
  const T* scores;            // [cols] this row's scores
  const T* guide_scores;      // [cols] or nullptr
  const int64_t* key_labels;  // [levels, N] at this tile's first column, or nullptr
  int64_t first_key, cols;
  int64_t label_levels, label_stride;  // levels and the row stride (N) of key_labels
};

// Online logsumexp of one row's values across tiles (merged by online_lse_add).
template <typename T>
struct OnlineLSE {
  T max = neg_inf<T>();
  T sum = T(0);
  bool nan = false;

  T value() const {
    if (nan) return std::numeric_limits<T>::quiet_NaN();
    if (max == neg_inf<T>()) return neg_inf<T>();
    return max + std::log(sum);
  }
};

// Soft labels, per row: the teacher's online logsumexp (max, z) and a = sum_j e^{t'_j - max} (t'_j - x_j).
// With SimANS, x_j is the student's logit without its log-weight, and the negatives' log-weights u_j
// are kept apart, relative to their running maximum um: b = sum_neg e^{t'_j - max} (u_j - um) and
// zn = sum_neg e^{t'_j - max} (so that u_j + offset never meets a cancellation of two large terms).
template <typename T>
struct SoftAcc {
  T max = neg_inf<T>();
  T z = T(0), a = T(0);
  T b = T(0), zn = T(0), um = neg_inf<T>();
  bool nan = false;

  T lse() const {
    if (nan) return std::numeric_limits<T>::quiet_NaN();
    if (max == neg_inf<T>()) return neg_inf<T>();
    return max + std::log(z);
  }
  T mean_gap() const { return nan ? std::numeric_limits<T>::quiet_NaN() : a / z; }  // sum_j p_j (t'_j - x_j)
};

}  // namespace

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

namespace {

struct RuleArgs {
  bool attract = false;  // flagged keys join the positives (SupCon's outside form) instead of leaving the row
  std::optional<double> margin, relative_margin, max_score;
  double guide_margin = 0.0;
  bool guide_relative = false;
  int weighting = kWeightNone;
  double weight_a = 0.0, weight_b = 0.0;
  std::optional<double> debias;  // DCL's tau_plus
  std::optional<double> soft_temperature;  // soft labels: the teacher's temperature (its logits t_ij / it)
  double soft_weight = 1.0;                // loss = (1 - w) CE + w KL(teacher || student)
};

// DCL (Chuang et al. 2020): the row's negative term becomes
// Ng = max((e^{neg_lse} - n tau+ e^{l+}) / (1 - tau+), n e^{-1/t}), computed after a shift c.
// Returns log(e^{l+} + Ng), the shift to add to the negatives' offset (their dL/dl carries a
// factor 1 / (1 - tau+), or nothing when the floor is active) and the positive's coefficient c+
// in dL/dl+ = c+ e^{l+ - lse} - 1.
template <typename T>
struct DebiasedRow {
  T lse, offset_shift, positive_coef;
};

template <typename T>
DebiasedRow<T> debiased_row(T l_pos, T neg_lse, int64_t count, T tau_plus, T inv_temp) {
  const T n = T(count);
  const T log_floor = std::log(n) - inv_temp;  // -inf without negatives
  T c = l_pos > neg_lse ? l_pos : neg_lse;
  c = log_floor > c ? log_floor : c;
  const T raw = (std::exp(neg_lse - c) - n * tau_plus * std::exp(l_pos - c)) / (T(1) - tau_plus);
  const T floor = n * std::exp(-inv_temp - c);
  const bool clamped = raw < floor;
  const T lse = c + std::log(std::exp(l_pos - c) + (clamped ? floor : raw));
  if (clamped) return {lse, neg_inf<T>(), T(1)};
  return {lse, -std::log1p(-tau_plus), T(1) - n * tau_plus / (T(1) - tau_plus)};
}

template <typename T>
T logaddexp(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
  const T m = a > b ? a : b;
  if (m == neg_inf<T>()) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

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

Inputs make_inputs(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                   const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
                   const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
                   const std::optional<at::Tensor>& exclude = std::nullopt) {
  TORCH_CHECK(query.device().is_cpu(), "fastneg cpu backend: query must be a CPU tensor");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "fastneg cpu backend: query must be float32 or float64");
  TORCH_CHECK(keys.scalar_type() == query.scalar_type(), "fastneg cpu backend: keys dtype must match query");
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2 && query.size(1) == keys.size(1),
              "fastneg cpu backend: query [B, D] and keys [N, D] expected");
  Inputs in;
  // detached: the parallel workers do not inherit the caller's below-autograd dispatch state
  in.query = query.detach().contiguous();
  in.keys = keys.detach().contiguous();
  in.positives = positives.to(at::kLong).contiguous();
  TORCH_CHECK(in.positives.numel() == query.size(0), "fastneg cpu backend: positives must have B entries");
  {
    // checked here as well as in Python, which skips the check while torch.compile traces
    const int64_t* p = in.positives.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.positives.numel(); ++i)
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < keys.size(0), "positives must be in [0, N) = [0, ", keys.size(0),
                        "), got ", p[i], " at row ", i);
  }
  if (key_labels.has_value() && key_labels->defined()) {
    TORCH_CHECK(query_labels.has_value() && query_labels->defined(), "query_labels and key_labels go together");
    // [N] or [levels, N] (and [B] or [levels, B]): a key is masked when any level matches
    in.key_labels = key_labels->to(at::kLong);
    in.query_labels = query_labels->to(at::kLong);
    if (in.key_labels.dim() == 1) in.key_labels = in.key_labels.unsqueeze(0);
    if (in.query_labels.dim() == 1) in.query_labels = in.query_labels.unsqueeze(0);
    in.key_labels = in.key_labels.contiguous();
    in.query_labels = in.query_labels.contiguous();
    TORCH_CHECK_VALUE(in.key_labels.dim() == 2 && in.key_labels.size(1) == keys.size(0) &&
                          in.query_labels.dim() == 2 && in.query_labels.size(1) == query.size(0) &&
                          in.query_labels.size(0) == in.key_labels.size(0),
                      "fastneg cpu backend: labels must be [N]/[B] or [levels, N]/[levels, B]");
    TORCH_CHECK_VALUE(in.key_labels.size(0) >= 1 && in.key_labels.size(0) <= kMaxLabelLevels,
                      "fastneg cpu backend: at most ", kMaxLabelLevels, " label levels");
  }
  if (exclude.has_value() && exclude->defined()) {
    in.exclude = exclude->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(in.exclude.numel() == query.size(0), "fastneg cpu backend: exclude must have B entries");
    const int64_t* e = in.exclude.data_ptr<int64_t>();
    const int64_t* p = in.positives.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.exclude.numel(); ++i)
      TORCH_CHECK_VALUE(e[i] >= -1 && e[i] < keys.size(0) && e[i] != p[i], "exclude must be in [-1, N) = [-1, ",
                        keys.size(0), ") and not the row's positive, got ", e[i], " at row ", i);
  }
  if (guide_query.has_value() && guide_query->defined()) {
    TORCH_CHECK(guide_keys.has_value() && guide_keys->defined(), "guide_query and guide_keys go together");
    in.guide_query = guide_query->detach().to(query.scalar_type()).contiguous();
    in.guide_keys = guide_keys->detach().to(query.scalar_type()).contiguous();
  }
  return in;
}

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
  Shared(const Inputs& in, const Geometry& g, double temperature, const RuleArgs& rules)
      : key_tiles(in.keys, g),
        positives(in.positives.data_ptr<int64_t>()),
        key_labels(in.labels() ? in.key_labels.data_ptr<int64_t>() : nullptr),
        query_labels(in.labels() ? in.query_labels.data_ptr<int64_t>() : nullptr),
        exclude(in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr),
        levels(in.label_levels()),
        B(in.query.size(0)),
        N(in.keys.size(0)),
        inv_temp(T(1) / T(temperature)),
        a(T(rules.weight_a)),
        b(T(rules.weight_b)),
        soft_inv(rules.soft_temperature ? T(1) / T(*rules.soft_temperature) : T(0)),
        soft(rules.soft_temperature.has_value()) {
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

template <typename T>
T row_threshold(T positive_score, const RuleArgs& rules) {
  T thr = std::numeric_limits<T>::infinity();
  auto take = [&](T cand) { thr = cand < thr ? cand : thr; };
  if (rules.margin) take(positive_score - T(*rules.margin));
  if (rules.relative_margin) take(positive_score - std::abs(positive_score) * T(*rules.relative_margin));
  if (rules.max_score) take(T(*rules.max_score));
  return thr;
}

template <typename T>
T guide_row_threshold(T guide_positive, const RuleArgs& rules) {
  if (rules.guide_relative) return guide_positive - std::abs(guide_positive) * T(rules.guide_margin);
  return guide_positive - T(rules.guide_margin);
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
  if (weighting == kWeightSimANS) with_w(std::integral_constant<int, kWeightSimANS>{});
  else if (weighting == kWeightHardness) with_w(std::integral_constant<int, kWeightHardness>{});
  else if (weighting == kWeightGuideHardness) with_w(std::integral_constant<int, kWeightGuideHardness>{});
  else if (weighting == kWeightHCL) with_w(std::integral_constant<int, kWeightHCL>{});
  else if (weighting == kWeightGCSE) with_w(std::integral_constant<int, kWeightGCSE>{});
  else with_w(std::integral_constant<int, kWeightNone>{});
}

// owner[j]: the row whose positive is key j, or -1. The symmetric loss gives each owned column a
// loss of its own (key j against every query), so positives must be distinct.
std::vector<int64_t> column_owners(const Inputs& in) {
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
int64_t row_groups(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.num_row_blocks));
}

// s_i+ (and t_i+) of every row, and the thresholds derived from them. A pre-pass, because the
// symmetric loss's column j needs row o's values in every row block.
template <typename T>
void row_states(const Inputs& in, const Geometry& g, const Shared<T>& sh, const RuleArgs& rules, T* pos_score,
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
        thr[r0 + r] = row_threshold<T>(pos_score[r0 + r], rules);
        gthr[r0 + r] = in.guide() ? guide_row_threshold<T>(t_pos[r], rules) : T(0);
      }
    }
  });
}

template <typename T, typename K>
std::vector<at::Tensor> forward_impl(const Inputs& in, double temperature, const RuleArgs& rules, bool symmetric) {
  const Geometry g(in.query.size(0), in.keys.size(0), in.query.size(1));
  const auto opts = in.query.options();
  at::Tensor loss = at::empty({g.B}, opts), lse = at::empty({g.B}, opts), pos_score = at::empty({g.B}, opts),
             offset = at::empty({g.B}, opts), thr = at::empty({g.B}, opts), gthr = at::empty({g.B}, opts);
  at::Tensor n_masked = at::empty({g.B}, opts.dtype(at::kLong)), n_neg = at::empty({g.B}, opts.dtype(at::kLong));
  at::Tensor col_lse = at::zeros({g.B}, opts), col_offset = at::zeros({g.B}, opts);
  // per row: [0] c+ (the positive's coefficient), [1] beta R and [2] -logsumexp_k(beta l_ik) (HCL),
  // [3] the teacher's logsumexp (soft labels)
  at::Tensor pos_coef = at::zeros({4, g.B}, opts);
  T* const coef_p = pos_coef.data_ptr<T>();

  const Shared<T> sh(in, g, temperature, rules);
  const T inv_temp = sh.inv_temp, a = sh.a, b = sh.b;
  T* const spos_p = pos_score.data_ptr<T>();
  T* const thr_p = thr.data_ptr<T>();
  T* const gthr_p = gthr.data_ptr<T>();
  row_states<T>(in, g, sh, rules, spos_p, thr_p, gthr_p);

  const std::vector<int64_t> owner = symmetric ? column_owners(in) : std::vector<int64_t>();
  const int64_t groups = row_groups(g);
  // symmetric: per group, one partial logsumexp per owned column (indexed by its owner row)
  std::vector<std::vector<ColumnAcc<T>>> col_parts(symmetric ? groups : 0);

  dispatch_flags(rules.weighting, in.labels(), in.guide(), [&]<int W, bool LABELS, bool GUIDE>() {
    at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
      BlockTiles<T> blk(in, g, opts);
      std::vector<T> x(g.key_tile), log_w(g.key_tile), tx(sh.soft ? g.key_tile : 0), xf(rules.attract ? g.key_tile : 0);
      std::vector<T> s_t(symmetric ? g.key_tile * kRowBlock : 0), t_t(symmetric && GUIDE ? g.key_tile * kRowBlock : 0);
      std::vector<OnlineLSE<T>> acc(kRowBlock), acc_w(kRowBlock), acc_f(rules.attract ? kRowBlock : 0);
      std::vector<T> sum_f(rules.attract ? kRowBlock : 0);
      std::vector<SoftAcc<T>> acc_soft(sh.soft ? kRowBlock : 0);
      std::vector<T> t_pos(kRowBlock);
      std::vector<int64_t> cnt_neg(kRowBlock), cnt_masked(kRowBlock);
      std::vector<RowView<T>> rows(kRowBlock);

      for (int64_t grp = g_begin; grp < g_end; ++grp) {
        ColumnAcc<T>* cols = nullptr;
        if (symmetric) {
          col_parts[grp].assign(g.B, ColumnAcc<T>());
          cols = col_parts[grp].data();
        }
        const int64_t rb_begin = g.num_row_blocks * grp / groups, rb_end = g.num_row_blocks * (grp + 1) / groups;
        for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
          const int64_t r0 = rb * kRowBlock, nr = g.rows_in(rb);
          blk.load_rows(in, r0, nr);
          for (int64_t r = 0; r < nr; ++r) {
            rows[r] = make_row<T>(sh, r0 + r, spos_p[r0 + r], thr_p[r0 + r], gthr_p[r0 + r]);
            acc[r] = OnlineLSE<T>();
            acc_w[r] = OnlineLSE<T>();
            if (rules.attract) {
              acc_f[r] = OnlineLSE<T>();
              sum_f[r] = T(0);
            }
            if (sh.soft) acc_soft[r] = SoftAcc<T>();
            t_pos[r] = neg_inf<T>();
            cnt_neg[r] = cnt_masked[r] = 0;
          }
          for (int64_t kt = 0; kt < g.num_key_tiles; ++kt) {
            const int64_t j0 = kt * g.key_tile, nc = g.cols_in(kt);
            blk.score(sh, kt);
            const T* s_data = blk.scores();
            const T* t_data = blk.guide_scores();
            for (int64_t r = 0; r < nr; ++r) {
              const TileView<T> tile = blk.row_tile(sh, r, j0, nc);
              const int64_t masked = K::template logits<T, W, LABELS, GUIDE>(
                  rows[r], tile, a, b, x.data(), log_w.data(), sh.soft ? tx.data() : nullptr,
                  rules.attract ? xf.data() : nullptr);
              const bool has_pos = rows[r].positive >= j0 && rows[r].positive < j0 + nc;
              const bool has_excl = rows[r].exclude >= j0 && rows[r].exclude < j0 + nc;
              cnt_masked[r] += masked;
              cnt_neg[r] += nc - masked - (has_pos ? 1 : 0) - (has_excl ? 1 : 0);
              K::lse_add(acc[r], x.data(), nc);
              if (rules.attract) {  // the flagged keys' logits: their logsumexp and their sum
                K::lse_add(acc_f[r], xf.data(), nc);
                for (int64_t c = 0; c < nc; ++c)
                  if (xf[c] > neg_inf<T>()) sum_f[r] += xf[c];
              }
              if (W == kWeightSimANS || W == kWeightHCL) K::lse_add(acc_w[r], log_w.data(), nc);
              if (sh.soft) {
                if (W == kWeightSimANS)  // the student's logits without the log-weights (kept apart, see SoftAcc)
                  for (int64_t c = 0; c < nc; ++c) x[c] = tile.scores[c] * inv_temp;
                if (has_pos) {  // the teacher also scores the positive, against the student's l+
                  const int64_t pc = rows[r].positive - j0;
                  t_pos[r] = tx[pc];
                  x[pc] = spos_p[r0 + r] * inv_temp;
                }
                K::soft(acc_soft[r], tx.data(), x.data(), W == kWeightSimANS ? log_w.data() : nullptr, nc);
              }
            }
            if (!symmetric) continue;
            // the same tile read by columns: owned column j against this block's queries
            transpose_tile(s_data, nr, nc, g.key_tile, s_t.data());
            if (GUIDE) transpose_tile(t_data, nr, nc, g.key_tile, t_t.data());
            for (int64_t c = 0; c < nc; ++c) {
              const int64_t o = owner[j0 + c];
              if (o < 0) continue;
              const RowView<T> col = make_column<T>(sh, j0 + c, o, spos_p, thr_p, gthr_p);
              const TileView<T> tile = make_column_tile<T>(sh, s_t.data() + c * kRowBlock,
                                                           GUIDE ? t_t.data() + c * kRowBlock : nullptr, r0, nr);
              const int64_t masked = K::template logits<T, W, LABELS, GUIDE>(col, tile, a, b, x.data(), log_w.data());
              ColumnAcc<T>& ca = cols[o];
              ca.negatives += nr - masked - ((o >= r0 && o < r0 + nr) ? 1 : 0);
              K::lse_add(ca.lse, x.data(), nr);
              if (W == kWeightSimANS) K::lse_add(ca.lse_w, log_w.data(), nr);
            }
          }
          T* loss_p = loss.data_ptr<T>();
          T* lse_p = lse.data_ptr<T>();
          T* off_p = offset.data_ptr<T>();
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = r0 + r;
            const T l_pos = spos_p[i] * inv_temp;
            T row_off = T(0);
            if ((W == kWeightSimANS || W == kWeightHCL) && cnt_neg[r] > 0)
              row_off = std::log(T(cnt_neg[r])) - acc_w[r].value();
            const T hcl_off = row_off;
            T total, coef = T(1);
            if (rules.debias) {
              const DebiasedRow<T> d =
                  debiased_row(l_pos, acc[r].value() + row_off, cnt_neg[r], T(*rules.debias), inv_temp);
              total = d.lse;
              row_off += d.offset_shift;
              coef = d.positive_coef;
            } else {
              total = logaddexp(l_pos, acc[r].value() + row_off);
            }
            loss_p[i] = total - l_pos;
            if (rules.attract) {
              // P_i = {p_i} U flagged: L_i = logsumexp over P_i U N_i - mean over P_i of l_ip
              const T positives = T(1 + cnt_masked[r]);
              total = logaddexp(total, acc_f[r].value());
              loss_p[i] = total - (l_pos + sum_f[r]) / positives;
              coef_p[g.B + i] = T(1) / positives;
            }
            if (W == kWeightHCL && cnt_neg[r] > 0) {
              // dL/dl_ij = (1 + beta) P_ij - beta R softmax_k(beta l_ik)_j, R = sum_j P_ij over negatives
              coef_p[g.B + i] = a * std::exp(acc[r].value() + row_off - total);
              coef_p[2 * g.B + i] = hcl_off - std::log(T(cnt_neg[r]));
            }
            if (sh.soft) {
              // KL(p || q) = lse - T + sum_j p_j (t'_j - x_j) - offset (1 - p+), T the teacher's logsumexp
              const T teacher = acc_soft[r].lse();
              const T p_pos = std::exp(t_pos[r] - teacher);
              T kl;
              if (W == kWeightSimANS) {
                // sum_neg p_j (u_j + offset) = b / z + (log n - log S_w) zn / z, with offset = log n - um -
                // log S_w (um, the soft accumulator's u maximum, is acc_w's maximum: the same entries):
                // no large term cancels another
                const SoftAcc<T>& sa = acc_soft[r];
                T weights = T(0);
                if (cnt_neg[r] > 0 && sa.zn > T(0))
                  weights = (sa.b + (std::log(T(cnt_neg[r])) - std::log(acc_w[r].sum)) * sa.zn) / sa.z;
                kl = total - teacher + sa.mean_gap() - weights;
              } else {
                const T off_mass = row_off == T(0) ? T(0) : row_off * (T(1) - p_pos);
                kl = total - teacher + acc_soft[r].mean_gap() - off_mass;
              }
              const T w = T(rules.soft_weight);
              loss_p[i] = (T(1) - w) * (total - l_pos) + w * kl;
              coef_p[3 * g.B + i] = teacher;
            }
            lse_p[i] = total;
            off_p[i] = row_off;
            coef_p[i] = coef;
            n_masked.data_ptr<int64_t>()[i] = cnt_masked[r];
            n_neg.data_ptr<int64_t>()[i] = cnt_neg[r];
          }
        }
      }
    });
  });
  if (symmetric) {
    // merge the groups' column partials in group order; loss_o = (row o + column p_o) / 2
    T* loss_p = loss.data_ptr<T>();
    T* clse_p = col_lse.data_ptr<T>();
    T* coff_p = col_offset.data_ptr<T>();
    at::parallel_for(0, g.B, 1024, [&](int64_t o_begin, int64_t o_end) {
      for (int64_t o = o_begin; o < o_end; ++o) {
        ColumnAcc<T> total = col_parts[0][o];
        for (int64_t grp = 1; grp < groups; ++grp) {
          const ColumnAcc<T>& part = col_parts[grp][o];
          lse_merge(total.lse, part.lse);
          lse_merge(total.lse_w, part.lse_w);
          total.negatives += part.negatives;
        }
        const T l_pos = spos_p[o] * inv_temp;
        T col_off = T(0);
        if (rules.weighting == kWeightSimANS && total.negatives > 0)
          col_off = std::log(T(total.negatives)) - total.lse_w.value();
        const T col_total = logaddexp(l_pos, total.lse.value() + col_off);
        loss_p[o] = (loss_p[o] + (col_total - l_pos)) / T(2);
        clse_p[o] = col_total;
        coff_p[o] = col_off;
      }
    });
  }
  return {loss, lse, pos_score, offset, thr, gthr, n_masked, n_neg, col_lse, col_offset, pos_coef};
}

template <typename T, typename K>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_loss_in, const Inputs& in, double temperature,
                                      const at::Tensor& lse_in, const at::Tensor& pos_score_in,
                                      const at::Tensor& offset_in, const at::Tensor& thr_in,
                                      const at::Tensor& gthr_in, const at::Tensor& col_lse_in,
                                      const at::Tensor& col_offset_in, const at::Tensor& pos_coef_in,
                                      const RuleArgs& rules, bool symmetric, bool query_grad, bool keys_grad) {
  const Geometry g(in.query.size(0), in.keys.size(0), in.query.size(1));
  const auto opts = in.query.options();
  const at::Tensor grad_loss = grad_loss_in.to(in.query.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous(), pos_score = pos_score_in.contiguous(),
                   offset = offset_in.contiguous(), thr = thr_in.contiguous(), gthr = gthr_in.contiguous();
  const at::Tensor col_lse = col_lse_in.to(in.query.scalar_type()).contiguous(),
                   col_offset = col_offset_in.to(in.query.scalar_type()).contiguous();
  if (symmetric)
    TORCH_CHECK_VALUE(col_lse.numel() == g.B && col_offset.numel() == g.B,
                      "fastneg cpu backend: col_lse and col_offset must have B entries");
  at::Tensor dq = query_grad ? at::zeros({g.B, g.D}, opts) : at::empty({0}, opts);
  at::Tensor tau_rowsum = at::zeros({g.B}, opts.dtype(at::kDouble));

  const Shared<T> sh(in, g, temperature, rules);
  const T inv_temp = sh.inv_temp, a = sh.a, b = sh.b;
  const T* const spos_p = pos_score.data_ptr<T>();
  const T* const thr_p = thr.data_ptr<T>();
  const T* const gthr_p = gthr.data_ptr<T>();
  const T* const grad_p = grad_loss.data_ptr<T>();
  const at::Tensor pos_coef = pos_coef_in.to(in.query.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(pos_coef.numel() == 4 * g.B, "fastneg cpu backend: positive_coef must have 4 x B entries");
  const T* const coef_p = pos_coef.data_ptr<T>();
  // symmetric: loss_i = (row_i + column_{p_i}) / 2, so each direction's dL/ds carries half of g_i
  const T half = symmetric ? T(0.5) : T(1);
  const std::vector<int64_t> owner = symmetric ? column_owners(in) : std::vector<int64_t>();

  const int64_t groups = row_groups(g);
  const int64_t padded_n = g.num_key_tiles * g.key_tile;
  std::vector<at::Tensor> dk_parts(keys_grad ? groups : 0);

  dispatch_flags(rules.weighting, in.labels(), in.guide(), [&]<int W, bool LABELS, bool GUIDE>() {
    at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
      BlockTiles<T> blk(in, g, opts);
      at::Tensor dq_blk = at::empty({kRowBlock, g.D}, opts);
      std::vector<T> x(g.key_tile), log_w(g.key_tile), tx(sh.soft ? g.key_tile : 0);
      std::vector<T> xf(rules.attract ? g.key_tile : 0), dsf(rules.attract ? g.key_tile : 0);
      std::vector<T> s_t(symmetric ? g.key_tile * kRowBlock : 0), t_t(symmetric && GUIDE ? g.key_tile * kRowBlock : 0);
      for (int64_t grp = g_begin; grp < g_end; ++grp) {
        at::Tensor dk_part;
        if (keys_grad) dk_part = dk_parts[grp] = at::zeros({padded_n, g.D}, opts);
        const int64_t rb_begin = g.num_row_blocks * grp / groups, rb_end = g.num_row_blocks * (grp + 1) / groups;
        for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
          const int64_t r0 = rb * kRowBlock, nr = g.rows_in(rb);
          blk.load_rows(in, r0, nr);
          dq_blk.zero_();
          double* rowsum = tau_rowsum.data_ptr<double>() + r0;
          for (int64_t kt = 0; kt < g.num_key_tiles; ++kt) {
            const int64_t j0 = kt * g.key_tile, nc = g.cols_in(kt);
            const at::Tensor k_tile = blk.score(sh, kt);
            T* s_data = blk.scores();
            const T* t_data = blk.guide_scores();
            if (symmetric) {
              // column direction first (it reads the scores that the row direction overwrites):
              // dS'_{i'j} = g_o / (2 tau) (P'_{i'j} - [i' == o]) for owned column j, owner o
              transpose_tile(s_data, nr, nc, g.key_tile, s_t.data());
              if (GUIDE) transpose_tile(t_data, nr, nc, g.key_tile, t_t.data());
              for (int64_t c = 0; c < nc; ++c) {
                T* scol = s_t.data() + c * kRowBlock;
                const int64_t o = owner[j0 + c];
                if (o < 0) {
                  std::fill(scol, scol + nr, T(0));
                  continue;
                }
                const RowView<T> col = make_column<T>(sh, j0 + c, o, spos_p, thr_p, gthr_p);
                const TileView<T> tile =
                    make_column_tile<T>(sh, scol, GUIDE ? t_t.data() + c * kRowBlock : nullptr, r0, nr);
                K::template logits<T, W, LABELS, GUIDE>(col, tile, a, b, x.data(), log_w.data());
                const T c_lse = col_lse.data_ptr<T>()[o];
                const T scale = grad_p[o] * half * inv_temp;
                rowsum[0] += K::grad(x.data(), col_offset.data_ptr<T>()[o] - c_lse, scale, spos_p[o], scol, nr);
                if (o >= r0 && o < r0 + nr) scol[o - r0] = scale * std::expm1(spos_p[o] * inv_temp - c_lse);
              }
            }
            for (int64_t r = 0; r < kRowBlock; ++r) {
              T* srow = s_data + r * g.key_tile;
              if (r >= nr) {
                std::fill(srow, srow + g.key_tile, T(0));
                continue;
              }
              const int64_t i = r0 + r;
              const RowView<T> row = make_row<T>(sh, i, spos_p[i], thr_p[i], gthr_p[i]);
              const TileView<T> tile = blk.row_tile(sh, r, j0, nc);
              K::template logits<T, W, LABELS, GUIDE>(row, tile, a, b, x.data(), log_w.data(),
                                                      sh.soft ? tx.data() : nullptr, rules.attract ? xf.data() : nullptr);
              // dL_i/ds_ij = g_i / tau * (P_ij - [j == p_i]); P_ij = exp(x_ij + offset_i - lse_i)
              const T shift = offset.data_ptr<T>()[i] - lse.data_ptr<T>()[i];
              const T scale = grad_p[i] * half * inv_temp;
              const T w = T(rules.soft_weight);
              T acc_f = T(0);
              if (rules.attract) {
                // flagged keys are positives: dL_i/ds_ij = g_i / tau * (e^{l_ij - lse_i} - 1 / |P_i|)
                const T inv_p = coef_p[g.B + i], row_lse = lse.data_ptr<T>()[i];
                for (int64_t c = 0; c < nc; ++c) {
                  if (!(xf[c] > neg_inf<T>())) continue;
                  dsf[c] = scale * (std::exp(xf[c] - row_lse) - inv_p);
                  acc_f += dsf[c] * (srow[c] - row.positive_score);
                }
              }
              // sum_j dS_ij s_ij for the temperature gradient, written as sum_j dS_ij (s_ij - s_i+)
              // (equal, since sum_j dS_ij = 0) to avoid cancelling two large sums
              T acc;
              if (W == kWeightHCL)  // (1 + beta) P_ij - beta R e^{beta l_ij - logsumexp_k beta l_ik}
                acc = K::grad2(x.data(), shift, scale * (T(1) + a), log_w.data(), coef_p[2 * g.B + i],
                               scale * coef_p[g.B + i], row.positive_score, srow, nc);
              else if (sh.soft)  // P_ij - w p_ij, p the teacher's softmax
                acc = K::grad2(x.data(), shift, scale, tx.data(), -coef_p[3 * g.B + i], scale * w,
                               row.positive_score, srow, nc);
              else
                acc = K::grad(x.data(), shift, scale, row.positive_score, srow, nc);
              std::fill(srow + nc, srow + g.key_tile, T(0));
              if (rules.attract) {
                for (int64_t c = 0; c < nc; ++c)
                  if (xf[c] > neg_inf<T>()) srow[c] = dsf[c];
                acc += acc_f;
              }
              const int64_t pc = row.positive - j0;
              if (pc >= 0 && pc < nc) {
                // dL/dl+ = c+ e^{l+ - lse} - 1 (c+ = 1 but with DCL's debiasing); soft labels:
                // e^{l+ - lse} - (1 - w) - w p+
                const T d = row.positive_score * inv_temp - lse.data_ptr<T>()[i];
                srow[pc] = scale * (coef_p[i] == T(1) ? std::expm1(d) : coef_p[i] * std::exp(d) - T(1));
                if (rules.attract) srow[pc] = scale * (std::exp(d) - coef_p[g.B + i]);
                if (sh.soft) srow[pc] += scale * w * (T(1) - std::exp(tx[pc] - coef_p[3 * g.B + i]));
              }
              rowsum[r] += acc;
              if (symmetric)
                for (int64_t c = 0; c < nc; ++c) srow[c] += s_t[c * kRowBlock + r];
            }
            if (query_grad) dq_blk.addmm_(blk.s_tile, k_tile);
            if (keys_grad) dk_part.narrow(0, j0, g.key_tile).addmm_(blk.s_tile.t(), blk.q_blk);
          }
          if (query_grad) dq.narrow(0, r0, nr).copy_(dq_blk.narrow(0, 0, nr));
        }
      }
    });
  });
  at::Tensor dk = at::empty({0}, opts);
  if (keys_grad) {
    dk = dk_parts[0].narrow(0, 0, g.N).clone();
    for (int64_t grp = 1; grp < groups; ++grp) dk.add_(dk_parts[grp].narrow(0, 0, g.N));
  }
  return {dq, dk, tau_rowsum};
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

RuleArgs make_rules(std::optional<double> margin, std::optional<double> relative_margin,
                    std::optional<double> max_score, double guide_margin, bool guide_relative, int64_t weighting,
                    double weight_a, double weight_b, std::optional<double> debias = std::nullopt,
                    std::optional<double> soft_temperature = std::nullopt, double soft_weight = 1.0,
                    bool attract = false) {
  RuleArgs r;
  r.attract = attract;
  r.debias = debias;
  r.soft_temperature = soft_temperature;
  r.soft_weight = soft_weight;
  r.margin = margin;
  r.relative_margin = relative_margin;
  r.max_score = max_score;
  r.guide_margin = guide_margin;
  r.guide_relative = guide_relative;
  r.weighting = static_cast<int>(weighting);
  r.weight_a = weight_a;
  r.weight_b = weight_b;
  return r;
}

void check_rule_use(const RuleArgs& rules, const Inputs& in, bool symmetric) {
  const int weighting = rules.weighting;
  TORCH_CHECK_VALUE(weighting >= kWeightNone && weighting <= kWeightGCSE, "unknown weighting ", weighting);
  TORCH_CHECK_VALUE(!rules.debias || (*rules.debias >= 0.0 && *rules.debias < 1.0), "debias must be in [0, 1)");
  TORCH_CHECK_VALUE(!rules.debias || !symmetric, "debias cannot be combined with symmetric");
  TORCH_CHECK_VALUE(weighting != kWeightGuideHardness || in.guide(), "guide-score hardness needs a guide");
  TORCH_CHECK_VALUE(weighting != kWeightGCSE || in.guide(), "GCSE needs a guide (the reference model)");
  TORCH_CHECK_VALUE(weighting != kWeightGCSE || rules.weight_a > 0.0, "GCSE alpha must be > 0");
  TORCH_CHECK_VALUE(weighting != kWeightHCL || !symmetric, "HCL cannot be combined with symmetric");
  TORCH_CHECK_VALUE(!rules.attract || (!symmetric && !rules.debias && !rules.soft_temperature && weighting != kWeightHCL),
                    "attraction (false_negatives='attract') cannot be combined with symmetric, debias, soft labels or HCL");
  TORCH_CHECK_VALUE(!in.exclude.defined() || !symmetric, "exclude cannot be combined with symmetric");
  if (rules.soft_temperature) {
    TORCH_CHECK_VALUE(in.guide(), "soft labels need a guide (the teacher)");
    TORCH_CHECK_VALUE(*rules.soft_temperature > 0.0, "soft-label temperature must be > 0");
    TORCH_CHECK_VALUE(!symmetric && !rules.debias && weighting != kWeightHCL,
                      "soft labels cannot be combined with symmetric, debias or HCL");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
info_nce_fwd_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                 const at::Tensor& temperature, const std::optional<at::Tensor>& query_labels,
                 const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& guide_query,
                 const std::optional<at::Tensor>& guide_keys, std::optional<double> margin,
                 std::optional<double> relative_margin, std::optional<double> max_score, double guide_margin,
                 bool guide_relative, int64_t weighting, double weight_a, double weight_b, bool symmetric,
                 std::optional<double> debias, std::optional<double> soft_temperature, double soft_weight,
                 const std::optional<at::Tensor>& exclude, bool attract) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs in = make_inputs(query, keys, positives, query_labels, key_labels, guide_query, guide_keys, exclude);
  const RuleArgs rules = make_rules(margin, relative_margin, max_score, guide_margin, guide_relative, weighting,
                                    weight_a, weight_b, debias, soft_temperature, soft_weight, attract);
  check_rule_use(rules, in, symmetric);
  const double tau = temperature.item<double>();
  std::vector<at::Tensor> out = with_row_kernels([&]<typename K>() {
    return in.query.scalar_type() == at::kDouble ? forward_impl<double, K>(in, tau, rules, symmetric)
                                                 : forward_impl<float, K>(in, tau, rules, symmetric);
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9], out[10]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
    const at::Tensor& temperature, const std::optional<at::Tensor>& query_labels,
    const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& guide_query,
    const std::optional<at::Tensor>& guide_keys, const at::Tensor& lse, const at::Tensor& positive_score,
    const at::Tensor& row_offset, const at::Tensor& threshold, const at::Tensor& guide_threshold,
    const at::Tensor& col_lse, const at::Tensor& col_offset, const at::Tensor& positive_coef, int64_t weighting,
    double weight_a, double weight_b, bool symmetric, std::optional<double> soft_temperature, double soft_weight,
    const std::optional<at::Tensor>& exclude, bool attract, bool query_grad, bool keys_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs in = make_inputs(query, keys, positives, query_labels, key_labels, guide_query, guide_keys, exclude);
  const RuleArgs rules = make_rules(std::nullopt, std::nullopt, std::nullopt, 0.0, false, weighting, weight_a, weight_b,
                                    std::nullopt, soft_temperature, soft_weight, attract);
  check_rule_use(rules, in, symmetric);
  const double tau = temperature.item<double>();
  std::vector<at::Tensor> out = with_row_kernels([&]<typename K>() {
    return in.query.scalar_type() == at::kDouble
               ? backward_impl<double, K>(grad_loss, in, tau, lse, positive_score, row_offset, threshold,
                                          guide_threshold, col_lse, col_offset, positive_coef, rules, symmetric,
                                          query_grad, keys_grad)
               : backward_impl<float, K>(grad_loss, in, tau, lse, positive_score, row_offset, threshold,
                                         guide_threshold, col_lse, col_offset, positive_coef, rules, symmetric,
                                         query_grad, keys_grad);
  });
  return {out[0], out[1], out[2]};
}


// ---- Negative sampling (SPEC section 5) -----------------------------------------------------------
//
// The same tiles, rules and classification as the loss; each row keeps a running top-k (a heap
// of its k best candidates) over the unmasked negatives, scored by
//   top:     s_ij
//   simans:  log w_ij + G_ij   (Gumbel-top-k: a draw without replacement, P(j) ~ w_ij)
//   uniform: G_ij
// with G_ij standard Gumbel noise that is a pure function of (seed, i, j), so draws do not depend
// on tiling or threads (and the Triton sampler computes the same bits).

constexpr int64_t kStrategyTop = 0;
constexpr int64_t kStrategySimANS = 1;
constexpr int64_t kStrategyUniform = 2;

inline uint32_t mix32(uint32_t x) {  // "lowbias32" integer hash
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline float gumbel_noise(uint32_t seed, int64_t i, int64_t j) {
  const uint32_t h = mix32(mix32(mix32(seed) ^ static_cast<uint32_t>(i)) ^ static_cast<uint32_t>(j));
  const float u = (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);  // in (0, 1)
  return -std::log(-std::log(u));
}

// The k best (value, key) pairs seen so far; better = larger value, then smaller key index.
template <typename T>
class RunningTopK {
 public:
  explicit RunningTopK(int64_t k) : k_(k) { heap_.reserve(k); }
  void clear() { heap_.clear(); }
  // candidates must beat this to enter (keys arrive in increasing index, so ties never do)
  T floor() const { return static_cast<int64_t>(heap_.size()) < k_ ? neg_inf<T>() : heap_.front().first; }
  void offer(T value, int64_t key) {
    if (static_cast<int64_t>(heap_.size()) < k_) {
      heap_.emplace_back(value, key);
      std::push_heap(heap_.begin(), heap_.end(), better);
    } else if (value > heap_.front().first) {
      std::pop_heap(heap_.begin(), heap_.end(), better);
      heap_.back() = {value, key};
      std::push_heap(heap_.begin(), heap_.end(), better);
    }
  }
  // best first, padded with -1
  void write(int64_t* out) {
    std::sort_heap(heap_.begin(), heap_.end(), better);
    for (int64_t c = 0; c < k_; ++c) out[c] = c < static_cast<int64_t>(heap_.size()) ? heap_[c].second : -1;
  }

 private:
  static bool better(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
  int64_t k_;
  std::vector<std::pair<T, int64_t>> heap_;
};

template <typename T, typename K>
at::Tensor sample_impl(const Inputs& in, const RuleArgs& rules, int64_t strategy, int64_t k, uint32_t seed) {
  const Geometry g(in.query.size(0), in.keys.size(0), in.query.size(1));
  const auto opts = in.query.options();
  at::Tensor out = at::empty({g.B, k}, opts.dtype(at::kLong));
  at::Tensor pos_score = at::empty({g.B}, opts), thr = at::empty({g.B}, opts), gthr = at::empty({g.B}, opts);
  const Shared<T> sh(in, g, 1.0, rules);  // temperature 1: the "logits" are the raw scores
  row_states<T>(in, g, sh, rules, pos_score.data_ptr<T>(), thr.data_ptr<T>(), gthr.data_ptr<T>());
  const T a = sh.a, b = sh.b;
  const int weighting = strategy == kStrategySimANS ? kWeightSimANS : kWeightNone;

  dispatch_flags(weighting, in.labels(), in.guide(), [&]<int W, bool LABELS, bool GUIDE>() {
    at::parallel_for(0, g.num_row_blocks, 1, [&](int64_t rb_begin, int64_t rb_end) {
      BlockTiles<T> blk(in, g, opts);
      std::vector<T> x(g.key_tile), log_w(g.key_tile);
      std::vector<RunningTopK<T>> best(kRowBlock, RunningTopK<T>(k));
      std::vector<RowView<T>> rows(kRowBlock);
      for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
        const int64_t r0 = rb * kRowBlock, nr = g.rows_in(rb);
        blk.load_rows(in, r0, nr);
        for (int64_t r = 0; r < nr; ++r) {
          rows[r] = make_row<T>(sh, r0 + r, pos_score.data_ptr<T>()[r0 + r], thr.data_ptr<T>()[r0 + r],
                                gthr.data_ptr<T>()[r0 + r]);
          best[r].clear();
        }
        for (int64_t kt = 0; kt < g.num_key_tiles; ++kt) {
          const int64_t j0 = kt * g.key_tile, nc = g.cols_in(kt);
          blk.score(sh, kt);
          for (int64_t r = 0; r < nr; ++r) {
            const TileView<T> tile = blk.row_tile(sh, r, j0, nc);
            K::template logits<T, W, LABELS, GUIDE>(rows[r], tile, a, b, x.data(), log_w.data());
            const T* value = W == kWeightSimANS ? log_w.data() : x.data();  // -inf off the negatives
            RunningTopK<T>& top = best[r];
            const int64_t i = r0 + r;
            for (int64_t c = 0; c < nc; ++c) {
              T v = value[c];
              if (!(v > neg_inf<T>())) continue;  // masked, the positive, or NaN: never drawn
              if (strategy == kStrategySimANS) v += T(gumbel_noise(seed, i, j0 + c));
              else if (strategy == kStrategyUniform) v = T(gumbel_noise(seed, i, j0 + c));
              if (v > top.floor()) top.offer(v, j0 + c);
            }
          }
        }
        for (int64_t r = 0; r < nr; ++r) best[r].write(out.data_ptr<int64_t>() + (r0 + r) * k);
      }
    });
  });
  return out;
}

at::Tensor sample_negatives_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                                const std::optional<at::Tensor>& query_labels,
                                const std::optional<at::Tensor>& key_labels,
                                const std::optional<at::Tensor>& guide_query,
                                const std::optional<at::Tensor>& guide_keys, std::optional<double> margin,
                                std::optional<double> relative_margin, std::optional<double> max_score,
                                double guide_margin, bool guide_relative, int64_t strategy, double weight_a,
                                double weight_b, int64_t num_negatives, int64_t seed) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs in = make_inputs(query, keys, positives, query_labels, key_labels, guide_query, guide_keys);
  TORCH_CHECK_VALUE(strategy >= kStrategyTop && strategy <= kStrategyUniform, "unknown strategy ", strategy);
  TORCH_CHECK_VALUE(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
  const RuleArgs rules = make_rules(margin, relative_margin, max_score, guide_margin, guide_relative,
                                    strategy == kStrategySimANS ? kWeightSimANS : kWeightNone, weight_a, weight_b);
  const uint32_t s = static_cast<uint32_t>(seed);
  return with_row_kernels([&]<typename K>() {
    return in.query.scalar_type() == at::kDouble ? sample_impl<double, K>(in, rules, strategy, num_negatives, s)
                                                 : sample_impl<float, K>(in, rules, strategy, num_negatives, s);
  });
}

}  // namespace

TORCH_LIBRARY(fastneg, m) {
  m.def(
      "info_nce_fwd_cpu(Tensor query, Tensor keys, Tensor positives, Tensor temperature, Tensor? query_labels, "
      "Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, float? margin, float? relative_margin, "
      "float? max_score, float guide_margin, bool guide_relative, int weighting, float weight_a, float weight_b, "
      "bool symmetric, float? debias, float? soft_temperature, float soft_weight, Tensor? exclude, bool attract) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def(
      "info_nce_bwd_cpu(Tensor grad_loss, Tensor query, Tensor keys, Tensor positives, Tensor temperature, "
      "Tensor? query_labels, Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, Tensor lse, "
      "Tensor positive_score, Tensor row_offset, Tensor threshold, Tensor guide_threshold, Tensor col_lse, "
      "Tensor col_offset, Tensor positive_coef, int weighting, float weight_a, float weight_b, bool symmetric, "
      "float? soft_temperature, float soft_weight, Tensor? exclude, bool attract, bool query_grad, bool keys_grad) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "sample_negatives_cpu(Tensor query, Tensor keys, Tensor positives, Tensor? query_labels, Tensor? key_labels, "
      "Tensor? guide_query, Tensor? guide_keys, float? margin, float? relative_margin, float? max_score, "
      "float guide_margin, bool guide_relative, int strategy, float weight_a, float weight_b, int num_negatives, "
      "int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastneg, CPU, m) {
  m.impl("info_nce_fwd_cpu", &info_nce_fwd_cpu);
  m.impl("info_nce_bwd_cpu", &info_nce_bwd_cpu);
  m.impl("sample_negatives_cpu", &sample_negatives_cpu);
}

}  // namespace fastneg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "fastneg CPU kernels (registered as torch.ops.fastneg.*)"; }

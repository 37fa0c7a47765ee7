// The symmetric loss's column side: the owner row of each key column, a column as a row of the
// transposed problem, its candidate queries, and its per-group accumulator.
#pragma once

#include <vector>

#include "tiles.h"

namespace fastneg {

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

}  // namespace fastneg

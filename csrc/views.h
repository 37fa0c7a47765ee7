// Views for the element-wise kernels: a query row or (symmetric loss) a key column with its
// positive, thresholds and labels, and a tile of its candidates.
#pragma once

#include "inputs.h"

namespace fastneg {

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

}  // namespace fastneg

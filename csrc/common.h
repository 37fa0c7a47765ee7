// What every C++ kernel shares beyond ATen: the tile geometry's constants, the views one row
// pass reads (RowView, TileView), the online accumulators (OnlineLSE, HclAcc, SoftAcc) and the
// row-level estimator math (logaddexp, a row relative to its negatives with DCL). row_kernels.h
// is written against these types and includes nothing itself.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "plan.h"

namespace fastneg {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kMaxKeyTile = 256;

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

// HCL, per row: the negatives' scores s_j summed as sx = sum_j e^{(1 + beta)(s_j - ref_x) / t} and
// sw = sum_j e^{beta (s_j - ref_w) / t}, each reference the row's largest negative score (hi), or
// its smallest (lo) where the factor is negative, so that every term is <= 1 and the reference's
// own is exactly 1: no exponent is a difference of two rounded terms of size (1 + beta) |l|
// (merged by hcl_lse_add).
template <typename T>
struct HclAcc {
  T hi = neg_inf<T>(), lo = std::numeric_limits<T>::infinity();
  T sx = T(0), sw = T(0);
  bool nan = false;

  static T reference(T factor, T hi, T lo) { return factor >= T(0) ? hi : lo; }
};

// A row's logsumexp relative to its negatives' log-mass g (d = l+ - g), with DCL when `debias`
// (Chuang et al. 2020: the negatives' term becomes Ng = max((e^g - n tau+ e^{l+}) / (1 - tau+),
// n e^{-1/t}); log_floor = log n - 1/t - g): rel = lse - g and loss = lse - l+, each computed from
// the larger of the positive's term and the negatives' so that neither is a difference of two
// rounded terms of the logits' size. Also the shift to add to the negatives' offset (their dL/dl
// carries a factor 1 / (1 - tau+), or nothing where the floor is active) and the positive's
// coefficient c+ in dL/dl+ = c+ e^{l+ - lse} - 1.
template <typename T>
struct RelativeRow {
  T rel, loss, offset_shift, positive_coef;
};

template <typename T>
RelativeRow<T> relative_row(T d, bool debias, T log_floor, int64_t count, T tau_plus) {
  if (!debias) {  // lse = logaddexp(l+, g)
    if (d >= T(0)) {
      const T loss = std::log1p(std::exp(-d));
      return {d + loss, loss, T(0), T(1)};
    }
    const T rel = std::log1p(std::exp(d));
    return {rel, rel - d, T(0), T(1)};
  }
  const T n = T(count);
  T c = d > T(0) ? d : T(0);
  c = log_floor > c ? log_floor : c;
  const T pos = std::exp(d - c);
  const T raw = (std::exp(-c) - n * tau_plus * pos) / (T(1) - tau_plus);
  const T floor = std::exp(log_floor - c);
  const bool clamped = raw < floor;
  const T neg = clamped ? floor : raw;
  RelativeRow<T> out;
  if (pos >= neg) {
    out.loss = std::log1p(neg / pos);
    out.rel = d + out.loss;
  } else {
    out.rel = c + std::log(neg) + std::log1p(pos / neg);
    out.loss = out.rel - d;
  }
  out.offset_shift = clamped ? neg_inf<T>() : -std::log1p(-tau_plus);
  out.positive_coef = clamped ? T(1) : T(1) - n * tau_plus / (T(1) - tau_plus);
  return out;
}

template <typename T>
T logaddexp(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
  const T m = a > b ? a : b;
  if (m == neg_inf<T>()) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

}  // namespace fastneg

// The false-negative rules and the SimANS weight (SPEC sections 2-3), written once for every C++
// kernel: forward, backward and sampler all classify and weight through these functions.
// fastneg/reference/rules.py and fastneg/backends/triton/rules.py hold the same functions under
// the same names. The templates take a scalar or a fixed-width vector of scores (row_kernels.h);
// the vector ones are always inlined, so that they compile for the caller's target (AVX2 or not).
#pragma once

#include <cmath>
#include <limits>

#include "plan.h"

namespace fastneg {

// The score rules of one row as one threshold: key j is a false negative when s_ij > it
// (margin: s+ - m; relative margin: s+ - |s+| r; max score: a constant; +inf when none is on).
template <typename T>
T score_threshold(T positive_score, const Plan& plan) {
  T thr = std::numeric_limits<T>::infinity();
  auto take = [&](T cand) { thr = cand < thr ? cand : thr; };
  if (plan.margin) take(positive_score - T(*plan.margin));
  if (plan.relative_margin) take(positive_score - std::abs(positive_score) * T(*plan.relative_margin));
  if (plan.max_score) take(T(*plan.max_score));
  return thr;
}

// The guide's rule as a threshold on the guide's scores: t+ - margin, or t+ - |t+| margin (relative).
template <typename T>
T guide_threshold(T guide_positive, const Plan& plan) {
  if (plan.guide_relative) return guide_positive - std::abs(guide_positive) * T(plan.guide_margin);
  return guide_positive - T(plan.guide_margin);
}

// M_ij: above the score threshold, a matching label (any level), or above the guide threshold.
// `label_match` is all false without labels; without a guide pass guide_threshold = +inf.
template <typename M, typename V, typename T>
[[gnu::always_inline]] inline M false_negative_mask(V s, T threshold, M label_match, V t, T guide_threshold) {
  return (s > threshold) | label_match | (t > guide_threshold);
}

// SimANS's log-weight log w_ij = -a (s_ij - s_i+ - b)^2, before the row's normaliser.
template <typename V, typename T>
[[gnu::always_inline]] inline V simans_log_weight(V s, T positive_score, T a, T b) {
  const V d = s - positive_score - b;
  return -a * d * d;
}

}  // namespace fastneg

// The element-wise part of the CPU kernels: one row of one score tile at a time.
//
// No includes and no ATen here (the types it uses, RowView, TileView and OnlineLSE, are
// defined once in fused_info_nce.cpp): that file includes this one twice, once as plain
// x86-64 (or whatever the target is) and once under `#pragma GCC target("avx2,fma")`, and picks
// the build the processor supports at run time. Every loop is written branch-free so that the
// compiler vectorises it.

constexpr int32_t kLanes = 16;

template <typename T>
T sum_lanes(const T* lanes) {
  T total = T(0);
  for (int32_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// exp(x) for the arguments used here (x <= ~0: always shifted by a running maximum or by the
// row's logsumexp). About 1 ulp in float32; exactly 0 below 2^-126; NaN stays NaN.
inline float exp_shifted(float x) {
  const float t = x * 1.44269504088896341f;
  const float tc = t < -126.0f ? -126.0f : (t > 126.0f ? 126.0f : t);
  const float n = (tc + 12582912.0f) - 12582912.0f;  // round to the nearest integer
  const float f = tc - n;                              // |f| <= 0.5
  float p = 1.5252733804059841e-5f;
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float r = p * scale;
  return t < -126.0f ? 0.0f : r;
}
inline double exp_shifted(double x) { return std::exp(x); }

// x_ij = l_ij + u_ij over the row's negatives (-inf for masked keys and the positive), where u
// is the per-key part of beta (SimANS log w_ij, or the hardness bias); the SimANS per-row
// normaliser is added by the caller. log_w gets SimANS's log w_ij (-inf off the negatives).
// Returns the number of masked keys in the tile (the positive never counts).
template <typename T, int W, bool LABELS, bool GUIDE>
int64_t biased_logits(const RowView<T>& row, const TileView<T>& tile, T a, T b, T* x, T* log_w) {
  const int32_t nc = static_cast<int32_t>(tile.cols);
  const int64_t rel = row.positive - tile.first_key;
  const int32_t pc = (rel >= 0 && rel < nc) ? static_cast<int32_t>(rel) : -1;
  int32_t masked_count = 0;
#pragma omp simd reduction(+ : masked_count)
  for (int32_t c = 0; c < nc; ++c) {
    const T s = tile.scores[c];
    bool m = s > row.threshold;
    if (LABELS) m = m | (tile.key_labels[c] == row.query_label);
    if (GUIDE) m = m | (tile.guide_scores[c] > row.guide_threshold);
    const bool off = m | (c == pc);
    masked_count += (m & (c != pc)) ? 1 : 0;
    T u = T(0);
    if (W == kWeightSimANS) {
      const T d = s - row.positive_score - b;
      u = -a * d * d;
      log_w[c] = off ? neg_inf<T>() : u;
    } else if (W == kWeightHardness) {
      u = a * s;
    }
    x[c] = off ? neg_inf<T>() : s * row.inv_temp + u;
  }
  return masked_count;
}

// Merges a tile row into a per-row online logsumexp (see OnlineLSE); NaN is sticky.
template <typename T>
void online_lse_add(OnlineLSE<T>& acc, const T* x, int64_t n_) {
  const int32_t n = static_cast<int32_t>(n_);
  T m = neg_inf<T>();
  int32_t nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int32_t c = 0; c < n; ++c) {
    m = x[c] > m ? x[c] : m;
    nans += x[c] != x[c] ? 1 : 0;
  }
  if (nans) acc.nan = true;
  if (acc.nan || m == neg_inf<T>()) return;
  const T new_max = m > acc.max ? m : acc.max;
  T lanes[kLanes] = {};
  int32_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int32_t l = 0; l < kLanes; ++l) lanes[l] += exp_shifted(x[c + l] - new_max);
  for (; c < n; ++c) lanes[0] += exp_shifted(x[c] - new_max);
  acc.sum = acc.sum * exp_shifted(acc.max - new_max) + sum_lanes(lanes);
  acc.max = new_max;
}

// Overwrites one row of a score tile with dS_ij = scale * exp(x_ij + shift) (the negatives'
// share of dL/ds; the caller sets the positive's entry) and returns sum_j dS_ij (s_ij - s_i+),
// the row's share of the temperature gradient.
template <typename T>
T negative_score_grad(const T* x, T shift, T scale, T positive_score, T* s_row, int64_t n_) {
  const int32_t n = static_cast<int32_t>(n_);
  // kLanes independent partial sums: a reduction order the compiler may vectorise without
  // -ffast-math (and that does not depend on the build)
  T lanes[kLanes] = {};
  int32_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int32_t l = 0; l < kLanes; ++l) {
      const T ds = scale * exp_shifted(x[c + l] + shift);
      lanes[l] += ds * (s_row[c + l] - positive_score);
      s_row[c + l] = ds;
    }
  }
  for (; c < n; ++c) {
    const T ds = scale * exp_shifted(x[c] + shift);
    lanes[0] += ds * (s_row[c] - positive_score);
    s_row[c] = ds;
  }
  return sum_lanes(lanes);
}

// One build of the element-wise kernels, as a type the tile loops are templated on.
struct RowKernels {
  template <typename T, int W, bool LABELS, bool GUIDE>
  static int64_t logits(const RowView<T>& row, const TileView<T>& tile, T a, T b, T* x, T* log_w) {
    return biased_logits<T, W, LABELS, GUIDE>(row, tile, a, b, x, log_w);
  }
  template <typename T>
  static void lse_add(OnlineLSE<T>& acc, const T* x, int64_t n) {
    online_lse_add(acc, x, n);
  }
  template <typename T>
  static T grad(const T* x, T shift, T scale, T positive_score, T* s_row, int64_t n) {
    return negative_score_grad(x, shift, scale, positive_score, s_row, n);
  }
};

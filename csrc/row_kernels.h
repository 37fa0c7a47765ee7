// The element-wise part of the CPU kernels: one row of one score tile at a time.
//
// No includes and no ATen here (the types it uses, RowView, TileView, OnlineLSE and SoftAcc, are
// defined once in common.h, the rules in rules.h): tiles.h includes this one twice, once as plain
// x86-64 (or whatever the target is) and once under `#pragma GCC target("avx2,fma")`, and picks
// the build the processor supports at run time. The loops work on fixed-width vectors.

// Fixed-width vectors (GCC/Clang vector extensions): 8 floats or 4 doubles per operation,
// lowered to AVX2 in the AVX2 build and to pairs of SSE registers in the generic one.
template <typename T>
struct Vec {
  static constexpr int32_t kWidth = 32 / sizeof(T);
  typedef T type __attribute__((vector_size(32)));
  typedef decltype(type{} > type{}) mask;
  typedef int64_t labels __attribute__((vector_size(8 * kWidth)));
};

// Loads/stores kWidth elements (all of them when FULL, else `count`, zero-filling the rest).
template <typename V, bool FULL, typename E>
inline V load(const E* p, int32_t count) {
  V v = {};
  std::memcpy(&v, p, (FULL ? sizeof(V) : count * sizeof(E)));
  return v;
}
template <bool FULL, typename V, typename E>
inline void store(E* p, V v, int32_t count) {
  std::memcpy(p, &v, (FULL ? sizeof(V) : count * sizeof(E)));
}

template <typename V>
inline auto horizontal_sum(V v) {
  auto total = v[0];
  for (int32_t l = 1; l < static_cast<int32_t>(sizeof(V) / sizeof(v[0])); ++l) total += v[l];
  return total;
}

// exp(x) for the arguments used here (x <= ~0: always shifted by a running maximum or by the
// row's logsumexp). About 1 ulp in float32; exactly 0 below 2^-126; NaN stays NaN.
inline Vec<float>::type exp_shifted(Vec<float>::type x) {
  typedef Vec<float>::type V;
  typedef int32_t I __attribute__((vector_size(32)));
  const V t = x * 1.44269504088896341f;
  const V lo = V{} - 126.0f, hi = V{} + 126.0f;
  const V tc = t < lo ? lo : (t > hi ? hi : t);
  const V n = (tc + 12582912.0f) - 12582912.0f;  // round to the nearest integer
  const V f = tc - n;                              // |f| <= 0.5
  V p = V{} + 1.5252733804059841e-5f;
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  const V r = p * reinterpret_cast<const V&>(bits);
  return t < lo ? V{} : r;
}
inline Vec<double>::type exp_shifted(Vec<double>::type x) {
  for (int32_t l = 0; l < Vec<double>::kWidth; ++l) x[l] = std::exp(x[l]);
  return x;
}

// x_ij = l_ij + u_ij over the row's negatives (-inf for masked keys and the positive), where u
// is the per-key part of beta (SimANS log w_ij, or the hardness bias); the SimANS per-row
// normaliser is added by the caller. HCL: x_ij = s_ij, the score (its logits and weights are
// taken from it by hcl_lse_add and hcl_score_grad). log_w gets SimANS's log w_ij (-inf off the
// negatives). The row's excluded column (ec) is neither masked nor a negative; xf (when given) gets l_ij of the
// masked keys and -inf elsewhere (attraction: the flagged keys are positives).
// Returns the number of masked keys in the tile (the positive never counts).
template <typename T, int W, bool LABELS, bool GUIDE, bool FULL>
inline typename Vec<T>::mask logits_chunk(const RowView<T>& row, const TileView<T>& tile, T a, T b, T* x, T* log_w,
                                          T* tx, T* xf, int32_t c, int32_t count, int32_t pc, int32_t ec) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::mask M;
  const V s = load<V, FULL>(tile.scores + c, count);
  M label_match = {};
  if constexpr (LABELS) {
    typedef typename Vec<T>::labels L;
    for (int64_t level = 0; level < tile.label_levels; ++level)
      label_match |= __builtin_convertvector(
          load<L, FULL>(tile.key_labels + level * tile.label_stride + c, count) == row.query_label[level], M);
  }
  V tg = {};
  if constexpr (GUIDE) tg = load<V, FULL>(tile.guide_scores + c, count);
  M m = false_negative_mask<M>(s, row.threshold, label_match, tg,
                               GUIDE ? row.guide_threshold : std::numeric_limits<T>::infinity());
  M column = {};
  for (int32_t l = 0; l < Vec<T>::kWidth; ++l) column[l] = c + l;
  const M valid = column < count + c;
  const M positive = column == pc;
  const M excluded = column == ec;
  m &= ~excluded;
  const M off = m | positive | excluded | ~valid;
  const V ninf = V{} + neg_inf<T>();
  V u = {};
  if constexpr (W == Weighting::SIMANS) {
    u = simans_log_weight(s, row.positive_score, a, b);
    store<FULL>(log_w + c, off ? ninf : u, count);
  } else if constexpr (W == Weighting::HARDNESS) {
    u = a * s;
  } else if constexpr (W == Weighting::GUIDE_HARDNESS) {
    u = a * tg;
  } else if constexpr (W == Weighting::GCSE) {
    // GCSE: u = -l exp(-(l - r)^2 / (2 alpha^2)) where l <= r (r: the reference model's logit), else 0.
    // The tie is decided on the raw scores (s <= t) and the gap is (s - t) / temperature: one rounding
    // of an exact difference, never contracted with a product, so a reference that scores a key
    // exactly like the student gives gap 0 and the full offset in every build.
    const V l = s * row.inv_temp;
    const V d = (s - tg) * row.inv_temp;
    const V decay = exp_shifted(-(d * d) * (T(0.5) / (a * a)));
    u = s > tg ? V{} : -l * decay;
  }
  if constexpr (GUIDE) {
    // soft labels: the teacher's logits over the positive and the unmasked negatives
    if (tx != nullptr)
      store<FULL>(tx + c, ((m & ~positive) | excluded | ~valid) ? ninf : tg * row.soft_inv_temp, count);
  }
  if (xf != nullptr) store<FULL>(xf + c, (m & ~positive & valid) ? s * row.inv_temp : ninf, count);
  if constexpr (W == Weighting::HCL)
    store<FULL>(x + c, off ? ninf : s, count);  // the scores: hcl_lse_add and hcl_score_grad scale them
  else
    store<FULL>(x + c, off ? ninf : s * row.inv_temp + u, count);
  return m & ~positive & valid;  // -1 where masked
}

template <typename T, int W, bool LABELS, bool GUIDE>
int64_t biased_logits(const RowView<T>& row, const TileView<T>& tile, T a, T b, T* x, T* log_w, T* tx, T* xf) {
  constexpr int32_t kW = Vec<T>::kWidth;
  const int32_t nc = static_cast<int32_t>(tile.cols);
  const int64_t rel = row.positive - tile.first_key;
  const int32_t pc = (rel >= 0 && rel < nc) ? static_cast<int32_t>(rel) : -1;
  const int64_t rel_ex = row.exclude - tile.first_key;
  const int32_t ec = (row.exclude >= 0 && rel_ex >= 0 && rel_ex < nc) ? static_cast<int32_t>(rel_ex) : -1;
  typename Vec<T>::mask masked = {};
  int32_t c = 0;
  for (; c + kW <= nc; c += kW)
    masked += logits_chunk<T, W, LABELS, GUIDE, true>(row, tile, a, b, x, log_w, tx, xf, c, kW, pc, ec);
  if (c < nc) masked += logits_chunk<T, W, LABELS, GUIDE, false>(row, tile, a, b, x, log_w, tx, xf, c, nc - c, pc, ec);
  return -static_cast<int64_t>(horizontal_sum(masked));
}

// Merges a tile row into a per-row online logsumexp (see OnlineLSE); NaN is sticky.
template <typename T>
void online_lse_add(OnlineLSE<T>& acc, const T* x, int64_t n_) {
  typedef typename Vec<T>::type V;
  constexpr int32_t kW = Vec<T>::kWidth;
  const int32_t n = static_cast<int32_t>(n_);
  const V ninf = V{} + neg_inf<T>();
  V vmax = ninf;
  typename Vec<T>::mask nan = {};
  int32_t c = 0;
  for (; c + kW <= n; c += kW) {
    const V v = load<V, true>(x + c, kW);
    vmax = v > vmax ? v : vmax;
    nan |= v != v;
  }
  T m = neg_inf<T>();
  for (int32_t l = 0; l < kW; ++l) m = vmax[l] > m ? vmax[l] : m;
  bool any_nan = false;
  for (int32_t l = 0; l < kW; ++l) any_nan |= nan[l] != 0;
  for (int32_t t = c; t < n; ++t) {
    m = x[t] > m ? x[t] : m;
    any_nan |= x[t] != x[t];
  }
  if (any_nan) acc.nan = true;
  if (acc.nan || m == neg_inf<T>()) return;
  const T new_max = m > acc.max ? m : acc.max;
  V sum = {};
  for (c = 0; c + kW <= n; c += kW) sum += exp_shifted(load<V, true>(x + c, kW) - new_max);
  if (c < n) {
    V tail = ninf;
    std::memcpy(&tail, x + c, (n - c) * sizeof(T));
    sum += exp_shifted(tail - new_max);
  }
  const V carried = exp_shifted(V{} + (acc.max - new_max));
  acc.sum = acc.sum * carried[0] + horizontal_sum(sum);
  acc.max = new_max;
}

// Overwrites one row of a score tile with dS_ij = scale * exp((x_ij - ref) + shift) (the negatives'
// share of dL/ds; the caller sets the positive's entry; ref 0, or DCL's RowState.NEGATIVE_MAX),
// minus scale2 * exp(y_ij + shift2) when SECOND (soft labels: y = the teacher's logits), and returns
// sum_j dS_ij (s_ij - s_i+), the row's share of the temperature gradient.
template <typename T, bool SECOND>
T score_grad(const T* x, T ref, T shift, T scale, const T* y, T shift2, T scale2, T positive_score, T* s_row,
             int64_t n_) {
  typedef typename Vec<T>::type V;
  constexpr int32_t kW = Vec<T>::kWidth;
  const int32_t n = static_cast<int32_t>(n_);
  auto ds_of = [&](V xv, V yv) {
    V ds = scale * exp_shifted((xv - ref) + shift);
    if constexpr (SECOND) ds -= scale2 * exp_shifted(yv + shift2);
    return ds;
  };
  V acc = {};
  int32_t c = 0;
  for (; c + kW <= n; c += kW) {
    const V ds = ds_of(load<V, true>(x + c, kW), SECOND ? load<V, true>(y + c, kW) : V{});
    acc += ds * (load<V, true>(s_row + c, kW) - positive_score);
    store<true>(s_row + c, ds, kW);
  }
  if (c < n) {
    V xt = V{} + neg_inf<T>(), yt = V{} + neg_inf<T>();
    std::memcpy(&xt, x + c, (n - c) * sizeof(T));
    if constexpr (SECOND) std::memcpy(&yt, y + c, (n - c) * sizeof(T));
    const V ds = ds_of(xt, yt);
    acc += ds * (load<V, false>(s_row + c, n - c) - positive_score);
    store<false>(s_row + c, ds, n - c);
  }
  return horizontal_sum(acc);
}

// HCL: merges a tile row of scores s (-inf off the negatives) into the row's HclAcc: the new
// references first (the largest and smallest score so far), the earlier sums carried over to them,
// then e^{factor (s_j - s_ref) / t} for each negative (<= 1): the difference of two scores is exact
// where it matters (Sterbenz), so the reference's own term is exactly 1 and a near copy's exponent
// carries one rounding of its own size. NaN is sticky.
template <typename T>
void hcl_lse_add(HclAcc<T>& acc, const T* x, T beta, T inv_temp, int64_t n_) {
  typedef typename Vec<T>::type V;
  constexpr int32_t kW = Vec<T>::kWidth;
  const int32_t n = static_cast<int32_t>(n_);
  T hi = neg_inf<T>(), lo = std::numeric_limits<T>::infinity();
  bool any_nan = false;
  for (int32_t c = 0; c < n; ++c) {
    const T v = x[c];
    any_nan |= v != v;
    if (v > neg_inf<T>()) {
      hi = v > hi ? v : hi;
      lo = v < lo ? v : lo;
    }
  }
  if (any_nan) acc.nan = true;
  if (acc.nan || hi == neg_inf<T>()) return;
  const T gx = T(1) + beta, gw = beta;
  const T new_hi = hi > acc.hi ? hi : acc.hi, new_lo = lo < acc.lo ? lo : acc.lo;
  const T rx = HclAcc<T>::reference(gx, new_hi, new_lo), rw = HclAcc<T>::reference(gw, new_hi, new_lo);
  const T fx = gx * inv_temp, fw = gw * inv_temp;
  if (acc.hi > neg_inf<T>()) {  // carry the earlier tiles' sums over to the new references
    acc.sx *= std::exp((HclAcc<T>::reference(gx, acc.hi, acc.lo) - rx) * fx);
    acc.sw *= std::exp((HclAcc<T>::reference(gw, acc.hi, acc.lo) - rw) * fw);
  }
  const V ninf = V{} + neg_inf<T>();
  V sx = {}, sw = {};
  auto add = [&](V s) {
    const auto negative = s > ninf;
    sx += exp_shifted(negative ? (s - rx) * fx : ninf);
    sw += exp_shifted(negative ? (s - rw) * fw : ninf);
  };
  int32_t c = 0;
  for (; c + kW <= n; c += kW) add(load<V, true>(x + c, kW));
  if (c < n) {
    V tail = ninf;
    std::memcpy(&tail, x + c, (n - c) * sizeof(T));
    add(tail);
  }
  acc.sx += horizontal_sum(sx);
  acc.sw += horizontal_sum(sw);
  acc.hi = new_hi;
  acc.lo = new_lo;
}

// HCL: overwrites one row of a score tile (x: its scores, -inf off the negatives) with
// dS_ij = scale_x e^{(1 + beta)(s_j - ref_x) / t + shift_x} - scale_w e^{beta (s_j - ref_w) / t + shift_w}
// (ref_x, ref_w: the reference scores, hcl_lse_add) and returns sum_j dS_ij (s_ij - s_i+), as
// score_grad does.
template <typename T>
T hcl_score_grad(const T* x, T beta, T inv_temp, T ref_x, T shift_x, T scale_x, T ref_w, T shift_w, T scale_w,
                 T positive_score, T* s_row, int64_t n_) {
  typedef typename Vec<T>::type V;
  constexpr int32_t kW = Vec<T>::kWidth;
  const int32_t n = static_cast<int32_t>(n_);
  const T gx = T(1) + beta, gw = beta;
  const V ninf = V{} + neg_inf<T>();
  const T fx = gx * inv_temp, fw = gw * inv_temp;
  auto ds_of = [&](V sv) {
    const auto negative = sv > ninf;
    const V px = exp_shifted(negative ? (sv - ref_x) * fx + shift_x : ninf);
    const V pw = exp_shifted(negative ? (sv - ref_w) * fw + shift_w : ninf);
    return scale_x * px - scale_w * pw;
  };
  V acc = {};
  int32_t c = 0;
  for (; c + kW <= n; c += kW) {
    const V ds = ds_of(load<V, true>(x + c, kW));
    acc += ds * (load<V, true>(s_row + c, kW) - positive_score);
    store<true>(s_row + c, ds, kW);
  }
  if (c < n) {
    V xt = ninf;
    std::memcpy(&xt, x + c, (n - c) * sizeof(T));
    const V ds = ds_of(xt);
    acc += ds * (load<V, false>(s_row + c, n - c) - positive_score);
    store<false>(s_row + c, ds, n - c);
  }
  return horizontal_sum(acc);
}

// Soft labels: merges a tile row into the teacher's online logsumexp of tx and the running sum of
// e^{tx_j - max} (tx_j - x_j) over the entries where tx is finite (x must hold the student's logit
// there, the positive's included). With u (SimANS's log-weights, -inf off the negatives) also the
// sums b and zn of SoftAcc, relative to u's running maximum. NaN anywhere in those entries is sticky.
template <typename T>
void soft_add(SoftAcc<T>& acc, const T* tx, const T* x, const T* u, int64_t n_) {
  typedef typename Vec<T>::type V;
  constexpr int32_t kW = Vec<T>::kWidth;
  const int32_t n = static_cast<int32_t>(n_);
  const V ninf = V{} + neg_inf<T>();
  T m = neg_inf<T>(), um = acc.um;
  bool any_nan = false;
  for (int32_t c = 0; c < n; ++c) {
    m = tx[c] > m ? tx[c] : m;
    any_nan |= tx[c] != tx[c] || (tx[c] > neg_inf<T>() && x[c] != x[c]);
    if (u != nullptr) um = u[c] > um ? u[c] : um;
  }
  if (any_nan) acc.nan = true;
  if (acc.nan || m == neg_inf<T>()) return;
  const T new_max = m > acc.max ? m : acc.max;
  V z = {}, a = {}, b = {}, zn = {};
  auto add = [&](V t, V xv, V uv) {
    const V e = exp_shifted(t - new_max);
    z += e;
    a += e * (t > ninf ? t - xv : V{});
    const auto neg = uv > ninf;  // SimANS's negatives (all false without u)
    b += neg ? e * (uv - um) : V{};
    zn += neg ? e : V{};
  };
  int32_t c = 0;
  for (; c + kW <= n; c += kW)
    add(load<V, true>(tx + c, kW), load<V, true>(x + c, kW), u != nullptr ? load<V, true>(u + c, kW) : ninf);
  if (c < n) {
    V t = ninf, uv = ninf;
    std::memcpy(&t, tx + c, (n - c) * sizeof(T));
    if (u != nullptr) std::memcpy(&uv, u + c, (n - c) * sizeof(T));
    add(t, load<V, false>(x + c, n - c), uv);
  }
  const V carried = exp_shifted(V{} + (acc.max - new_max));
  acc.z = acc.z * carried[0] + horizontal_sum(z);
  acc.a = acc.a * carried[0] + horizontal_sum(a);
  // b is relative to u's running maximum: shift the earlier tiles' part to the new one (zn = 0 until
  // the first negative, so the shift only matters once both are finite)
  const T shift = acc.um == neg_inf<T>() ? T(0) : um - acc.um;
  acc.b = (acc.b - shift * acc.zn) * carried[0] + horizontal_sum(b);
  acc.zn = acc.zn * carried[0] + horizontal_sum(zn);
  acc.um = um;
  acc.max = new_max;
}

// One build of the element-wise kernels, as a type the tile loops are templated on.
struct RowKernels {
  template <typename T, int W, bool LABELS, bool GUIDE>
  static int64_t logits(const RowView<T>& row, const TileView<T>& tile, T a, T b, T* x, T* log_w,
                        T* tx = nullptr, T* xf = nullptr) {
    return biased_logits<T, W, LABELS, GUIDE>(row, tile, a, b, x, log_w, tx, xf);
  }
  template <typename T>
  static void soft(SoftAcc<T>& acc, const T* tx, const T* x, const T* u, int64_t n) {
    soft_add(acc, tx, x, u, n);
  }
  template <typename T>
  static T grad2(const T* x, T shift, T scale, const T* y, T shift2, T scale2, T positive_score, T* s_row,
                 int64_t n) {
    return score_grad<T, true>(x, T(0), shift, scale, y, shift2, scale2, positive_score, s_row, n);
  }
  template <typename T>
  static void lse_add(OnlineLSE<T>& acc, const T* x, int64_t n) {
    online_lse_add(acc, x, n);
  }
  template <typename T>
  static void hcl_add(HclAcc<T>& acc, const T* x, T beta, T inv_temp, int64_t n) {
    hcl_lse_add(acc, x, beta, inv_temp, n);
  }
  template <typename T>
  static T hcl_grad(const T* x, T beta, T inv_temp, T ref_x, T shift_x, T scale_x, T ref_w, T shift_w, T scale_w,
                    T positive_score, T* s_row, int64_t n) {
    return hcl_score_grad(x, beta, inv_temp, ref_x, shift_x, scale_x, ref_w, shift_w, scale_w, positive_score,
                          s_row, n);
  }
  template <typename T>
  static T grad(const T* x, T ref, T shift, T scale, T positive_score, T* s_row, int64_t n) {
    return score_grad<T, false>(x, ref, shift, scale, nullptr, T(0), T(0), positive_score, s_row, n);
  }
};

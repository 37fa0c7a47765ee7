// The fused forward on CPU (SPEC sections 2-4): one pass over score tiles per block of query rows,
// the false-negative mask, the negative weighting and an online logsumexp per row, never a [B, N]
// buffer: extra memory is a few tiles per thread plus O(B + N).
//
// Symmetric (CLIP-style) loss in the same pass: each score tile is also read by columns. Key j
// that is row o's positive has its own loss, key j against every query, under the same rules
// (thresholds from s_{o j}); each thread group keeps an online logsumexp per owned column
// ([B] per group, not [B, N]), merged in group order after the pass.
#include "ops.h"
#include "columns.h"
#include "kernels.h"
#include "row_states.h"

namespace fastneg {
namespace {

template <typename T, typename K>
std::vector<at::Tensor> forward_impl(const Inputs& in, double temperature, const Plan& plan) {
  const bool symmetric = plan.symmetric;
  const Geometry g(in.query.size(0), in.keys.size(0), in.query.size(1));
  const auto opts = in.query.options();
  at::Tensor loss = at::empty({g.B}, opts);
  at::Tensor n_masked = at::empty({g.B}, opts.dtype(at::kLong)), n_neg = at::empty({g.B}, opts.dtype(at::kLong));
  // the per-row state the backward reads, one named row each (plan.h, RowState); unused rows stay 0
  at::Tensor state = at::zeros({RowState::COUNT, g.B}, opts);
  T* const state_p = state.data_ptr<T>();
  auto row_of = [&](int slot) { return state_p + slot * g.B; };
  T* const lse_p = row_of(RowState::LOGSUMEXP);
  T* const off_p = row_of(RowState::OFFSET);
  T* const coef_p = row_of(RowState::POSITIVE_COEF);

  const Shared<T> sh(in, g, temperature, plan);
  const T inv_temp = sh.inv_temp, a = sh.a, b = sh.b;
  T* const spos_p = row_of(RowState::POSITIVE_SCORE);
  T* const thr_p = row_of(RowState::THRESHOLD);
  T* const gthr_p = row_of(RowState::GUIDE_THRESHOLD);
  row_states<T>(in, g, sh, plan, spos_p, thr_p, gthr_p);

  const std::vector<int64_t> owner = symmetric ? column_owners(in) : std::vector<int64_t>();
  const int64_t groups = row_groups(g);
  // symmetric: per group, one partial logsumexp per owned column (indexed by its owner row)
  std::vector<std::vector<ColumnAcc<T>>> col_parts(symmetric ? groups : 0);

  dispatch_flags(plan.kind, in.labels(), in.guide(), [&]<int W, bool LABELS, bool GUIDE>() {
    at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
      BlockTiles<T> blk(in, g, opts);
      std::vector<T> x(g.key_tile), log_w(g.key_tile), tx(sh.soft ? g.key_tile : 0), xf(plan.attract ? g.key_tile : 0);
      std::vector<T> s_t(symmetric ? g.key_tile * kRowBlock : 0), t_t(symmetric && GUIDE ? g.key_tile * kRowBlock : 0);
      std::vector<OnlineLSE<T>> acc(kRowBlock), acc_w(kRowBlock), acc_f(plan.attract ? kRowBlock : 0);
      std::vector<HclAcc<T>> acc_hcl(W == Weighting::HCL ? kRowBlock : 0);
      std::vector<T> sum_f(plan.attract ? kRowBlock : 0);
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
            if (W == Weighting::HCL) acc_hcl[r] = HclAcc<T>();
            if (plan.attract) {
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
                  plan.attract ? xf.data() : nullptr);
              const bool has_pos = rows[r].positive >= j0 && rows[r].positive < j0 + nc;
              const bool has_excl = rows[r].exclude >= j0 && rows[r].exclude < j0 + nc;
              cnt_masked[r] += masked;
              cnt_neg[r] += nc - masked - (has_pos ? 1 : 0) - (has_excl ? 1 : 0);
              if (W == Weighting::HCL)
                K::hcl_add(acc_hcl[r], x.data(), a, inv_temp, nc);
              else
                K::lse_add(acc[r], x.data(), nc);
              if (plan.attract) {  // the flagged keys' logits: their logsumexp and their sum
                K::lse_add(acc_f[r], xf.data(), nc);
                for (int64_t c = 0; c < nc; ++c)
                  if (xf[c] > neg_inf<T>()) sum_f[r] += xf[c];
              }
              if (W == Weighting::SIMANS) K::lse_add(acc_w[r], log_w.data(), nc);
              if (sh.soft) {
                if (W == Weighting::SIMANS)  // the student's logits without the log-weights (kept apart, see SoftAcc)
                  for (int64_t c = 0; c < nc; ++c) x[c] = tile.scores[c] * inv_temp;
                if (has_pos) {  // the teacher also scores the positive, against the student's l+
                  const int64_t pc = rows[r].positive - j0;
                  t_pos[r] = tx[pc];
                  x[pc] = spos_p[r0 + r] * inv_temp;
                }
                K::soft(acc_soft[r], tx.data(), x.data(), W == Weighting::SIMANS ? log_w.data() : nullptr, nc);
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
              if (W == Weighting::SIMANS) K::lse_add(ca.lse_w, log_w.data(), nr);
            }
          }
          T* loss_p = loss.data_ptr<T>();
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = r0 + r;
            const T l_pos = spos_p[i] * inv_temp;
            T row_off = T(0);
            if (W == Weighting::SIMANS && cnt_neg[r] > 0) row_off = std::log(T(cnt_neg[r])) - acc_w[r].value();
            T total, coef = T(1);
            T log_share;  // l+ - total
            if (W == Weighting::HCL && cnt_neg[r] > 0) {  // (not with attraction or soft labels: plan checks)
              // g = log(n sum_j e^{(1 + beta) l_j} / sum_j e^{beta l_j}), the negatives' log-mass, is
              // ref_x + small; everything the backward needs is taken relative to g, so that the
              // positive's share, P_ij and beta R never meet a rounding of size (1 + beta) |l|
              const HclAcc<T>& h = acc_hcl[r];
              const T sx_ref = HclAcc<T>::reference(T(1) + a, h.hi, h.lo), sw_ref = HclAcc<T>::reference(a, h.hi, h.lo);
              const T log_sx = std::log(h.sx), log_sw = std::log(h.sw);
              // g = (1 + beta) r - beta w + log n + log sx - log sw, r, w the references' logits
              const T small = a * (sx_ref - sw_ref) * inv_temp + (std::log(T(cnt_neg[r])) + log_sx - log_sw);
              const T rx = sx_ref * inv_temp;
              const T d = (spos_p[i] - sx_ref) * inv_temp - small;  // l+ - g, the scores' difference exact
              RelativeRow<T> rr = relative_row(d, plan.debias.has_value(),
                                               std::log(T(cnt_neg[r])) - inv_temp - (rx + small), cnt_neg[r],
                                               T(plan.debias.value_or(0.0)));
              if (h.nan) rr.rel = rr.loss = std::numeric_limits<T>::quiet_NaN();
              const T rel = rr.rel, shift = rr.offset_shift;  // rel = total - g
              coef = rr.positive_coef;
              loss_p[i] = rr.loss;
              total = l_pos + rr.loss;  // so that the backward's e^{l+ - total} is the forward's
              log_share = -rr.loss;
              row_off = shift - rel - log_sx;  // P_ij = e^{(1 + beta)(s_ij - s_ref) / t + offset}
              // dL/dl_ij = (1 + beta) P_ij - beta R softmax_k(beta l_ik)_j, R = the negatives' share of P
              row_of(RowState::HCL_MASS)[i] = a * std::exp(shift - rel);
              row_of(RowState::HCL_SHIFT)[i] = -log_sw;
              row_of(RowState::HCL_REFERENCE)[i] = sx_ref;
              row_of(RowState::HCL_WEIGHT_REFERENCE)[i] = sw_ref;
            } else if (plan.debias && cnt_neg[r] > 0) {
              // relative to the negatives' log-mass g, as for HCL: the loss and the positive's share come
              // from the larger of the two terms, not from a total rounded at the logits' size
              // g = max + (log S + row_off); l+ - g from l+ - max, exact where the two are close
              const T g_small = std::log(acc[r].sum) + row_off, g = acc[r].max + g_small;
              const T d = acc[r].nan ? std::numeric_limits<T>::quiet_NaN() : (l_pos - acc[r].max) - g_small;
              const RelativeRow<T> rr =
                  relative_row(d, true, std::log(T(cnt_neg[r])) - inv_temp - g, cnt_neg[r], T(*plan.debias));
              total = l_pos + rr.loss;
              // P_ij = e^{x_ij + row_off + shift - total} = e^{(x_ij - max) - log S + shift - rel}: the backward
              // takes x_ij - max, exact for the row's dominant negative
              row_off = rr.offset_shift - rr.rel - std::log(acc[r].sum);
              row_of(RowState::NEGATIVE_MAX)[i] = acc[r].max;
              coef = rr.positive_coef;
              loss_p[i] = rr.loss;
              log_share = -rr.loss;
            } else {
              total = plan.debias ? l_pos : logaddexp(l_pos, acc[r].value() + row_off);
              loss_p[i] = total - l_pos;
              log_share = l_pos - total;
            }
            if (plan.attract) {
              // P_i = {p_i} U flagged: L_i = logsumexp over P_i U N_i - mean over P_i of l_ip
              const T positives = T(1 + cnt_masked[r]);
              total = logaddexp(total, acc_f[r].value());
              loss_p[i] = total - (l_pos + sum_f[r]) / positives;
              row_of(RowState::INV_NUM_POSITIVES)[i] = T(1) / positives;
              log_share = l_pos - total;
            }
            if (sh.soft) {
              // KL(p || q) = lse - T + sum_j p_j (t'_j - x_j) - offset (1 - p+), T the teacher's logsumexp
              const T teacher = acc_soft[r].lse();
              const T p_pos = std::exp(t_pos[r] - teacher);
              T kl;
              if (W == Weighting::SIMANS) {
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
              const T w = T(plan.soft_weight);
              loss_p[i] = (T(1) - w) * (total - l_pos) + w * kl;
              row_of(RowState::TEACHER_LOGSUMEXP)[i] = teacher;
            }
            lse_p[i] = total;
            row_of(RowState::LOG_POSITIVE_SHARE)[i] = log_share;
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
    T* clse_p = row_of(RowState::COLUMN_LOGSUMEXP);
    T* coff_p = row_of(RowState::COLUMN_OFFSET);
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
        if (plan.kind == Weighting::SIMANS && total.negatives > 0)
          col_off = std::log(T(total.negatives)) - total.lse_w.value();
        const T col_total = logaddexp(l_pos, total.lse.value() + col_off);
        loss_p[o] = (loss_p[o] + (col_total - l_pos)) / T(2);
        clse_p[o] = col_total;
        coff_p[o] = col_off;
      }
    });
  }
  return {loss, state, n_masked, n_neg};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives, const at::Tensor& temperature,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
    const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
    const std::optional<at::Tensor>& exclude, at::ArrayRef<double> scalars, int64_t flags) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs in = make_inputs(query, keys, positives, query_labels, key_labels, guide_query, guide_keys, exclude);
  const Plan plan = Plan::decode(scalars, flags);
  check_plan_use(plan, in);
  const double tau = temperature.item<double>();
  std::vector<at::Tensor> out = with_row_kernels([&]<typename K>() {
    return in.query.scalar_type() == at::kDouble ? forward_impl<double, K>(in, tau, plan)
                                                 : forward_impl<float, K>(in, tau, plan);
  });
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace fastneg

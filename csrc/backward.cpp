// The fused backward on CPU: recomputes each score tile with the forward's products and reads the
// per-row state the forward saved (thresholds included, so masks cannot flip between passes),
// overwrites the tile with dS = dL/ds, and accumulates dq = dS k and, per thread group, one [N, D]
// key-gradient partial dk = dS^T q, summed in group order (deterministic for a thread count). With
// the symmetric loss the column direction's dS is added to the same tile before the two products.
#include "ops.h"
#include "columns.h"
#include "kernels.h"
#include "row_states.h"

namespace fastneg {
namespace {

template <typename T, typename K>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_loss_in, const Inputs& in, double temperature,
                                      const at::Tensor& state_in, const Plan& plan) {
  const bool symmetric = plan.symmetric, query_grad = plan.query_grad, keys_grad = plan.keys_grad;
  const Geometry g(in.query.size(0), in.keys.size(0), in.query.size(1));
  const auto opts = in.query.options();
  const at::Tensor grad_loss = grad_loss_in.to(in.query.scalar_type()).contiguous();
  const at::Tensor state = state_in.to(in.query.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(state.dim() == 2 && state.size(0) == RowState::COUNT && state.size(1) == g.B,
                    "fastneg cpu backend: row_state must be [", RowState::COUNT, ", B] (fastneg.plan.RowState), got ",
                    state.sizes());
  const T* const state_p = state.data_ptr<T>();
  auto row_of = [&](int slot) { return state_p + slot * g.B; };
  const T* const lse_p = row_of(RowState::LOGSUMEXP);
  const T* const off_p = row_of(RowState::OFFSET);
  const T* const clse_p = row_of(RowState::COLUMN_LOGSUMEXP);
  const T* const coff_p = row_of(RowState::COLUMN_OFFSET);
  const T* const coef_p = row_of(RowState::POSITIVE_COEF);
  const T* const hcl_mass_p = row_of(RowState::HCL_MASS);
  const T* const hcl_shift_p = row_of(RowState::HCL_SHIFT);
  const T* const hcl_ref_p = row_of(RowState::HCL_REFERENCE);
  const T* const hcl_wref_p = row_of(RowState::HCL_WEIGHT_REFERENCE);
  const T* const pos_share_p = row_of(RowState::LOG_POSITIVE_SHARE);
  const T* const neg_max_p = row_of(RowState::NEGATIVE_MAX);
  const T* const teacher_p = row_of(RowState::TEACHER_LOGSUMEXP);
  const T* const inv_p_p = row_of(RowState::INV_NUM_POSITIVES);
  at::Tensor dq = query_grad ? at::zeros({g.B, g.D}, opts) : at::empty({0}, opts);
  at::Tensor tau_rowsum = at::zeros({g.B}, opts.dtype(at::kDouble));

  const Shared<T> sh(in, g, temperature, plan);
  const T inv_temp = sh.inv_temp, a = sh.a, b = sh.b;
  const T* const spos_p = row_of(RowState::POSITIVE_SCORE);
  const T* const thr_p = row_of(RowState::THRESHOLD);
  const T* const gthr_p = row_of(RowState::GUIDE_THRESHOLD);
  const T* const grad_p = grad_loss.data_ptr<T>();
  // symmetric: loss_i = (row_i + column_{p_i}) / 2, so each direction's dL/ds carries half of g_i
  const T half = symmetric ? T(0.5) : T(1);
  const std::vector<int64_t> owner = symmetric ? column_owners(in) : std::vector<int64_t>();

  const int64_t groups = row_groups(g);
  const int64_t padded_n = g.num_key_tiles * g.key_tile;
  std::vector<at::Tensor> dk_parts(keys_grad ? groups : 0);

  dispatch_flags(plan.kind, in.labels(), in.guide(), [&]<int W, bool LABELS, bool GUIDE>() {
    at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
      BlockTiles<T> blk(in, g, opts);
      at::Tensor dq_blk = at::empty({kRowBlock, g.D}, opts);
      std::vector<T> x(g.key_tile), log_w(g.key_tile), tx(sh.soft ? g.key_tile : 0);
      std::vector<T> xf(plan.attract ? g.key_tile : 0), dsf(plan.attract ? g.key_tile : 0);
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
                const T c_lse = clse_p[o];
                const T scale = grad_p[o] * half * inv_temp;
                rowsum[0] += K::grad(x.data(), T(0), coff_p[o] - c_lse, scale, spos_p[o], scol, nr);
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
                                                      sh.soft ? tx.data() : nullptr, plan.attract ? xf.data() : nullptr);
              // dL_i/ds_ij = g_i / tau * (P_ij - [j == p_i]); P_ij = exp(x_ij + offset_i - lse_i)
              const T shift = off_p[i] - lse_p[i];
              const T scale = grad_p[i] * half * inv_temp;
              const T w = T(plan.soft_weight);
              T acc_f = T(0);
              if (plan.attract) {
                // flagged keys are positives: dL_i/ds_ij = g_i / tau * (e^{l_ij - lse_i} - 1 / |P_i|)
                const T inv_p = inv_p_p[i], row_lse = lse_p[i];
                for (int64_t c = 0; c < nc; ++c) {
                  if (!(xf[c] > neg_inf<T>())) continue;
                  dsf[c] = scale * (std::exp(xf[c] - row_lse) - inv_p);
                  acc_f += dsf[c] * (srow[c] - row.positive_score);
                }
              }
              // sum_j dS_ij s_ij for the temperature gradient, written as sum_j dS_ij (s_ij - s_i+)
              // (equal, since sum_j dS_ij = 0) to avoid cancelling two large sums
              T acc;
              if (W == Weighting::HCL)  // (1 + beta) P_ij - beta R softmax_k(beta l_ik)_j, x = s (RowState)
                acc = K::hcl_grad(x.data(), a, inv_temp, hcl_ref_p[i], off_p[i], scale * (T(1) + a), hcl_wref_p[i],
                                  hcl_shift_p[i], scale * hcl_mass_p[i], row.positive_score, srow, nc);
              else if (sh.soft)  // P_ij - w p_ij, p the teacher's softmax
                acc = K::grad2(x.data(), shift, scale, tx.data(), -teacher_p[i], scale * w,
                               row.positive_score, srow, nc);
              else if (plan.debias)  // (x - max) + offset (RowState.NEGATIVE_MAX)
                acc = K::grad(x.data(), neg_max_p[i], off_p[i], scale, row.positive_score, srow, nc);
              else
                acc = K::grad(x.data(), T(0), shift, scale, row.positive_score, srow, nc);
              std::fill(srow + nc, srow + g.key_tile, T(0));
              if (plan.attract) {
                for (int64_t c = 0; c < nc; ++c)
                  if (xf[c] > neg_inf<T>()) srow[c] = dsf[c];
                acc += acc_f;
              }
              const int64_t pc = row.positive - j0;
              if (pc >= 0 && pc < nc) {
                // dL/dl+ = c+ e^{l+ - lse} - 1 (c+ = 1 but with DCL's debiasing); soft labels:
                // e^{l+ - lse} - (1 - w) - w p+
                // l+ - lse (HCL and DCL: kept by the forward, from its relative terms)
                const T d = (W == Weighting::HCL || plan.debias) ? pos_share_p[i]
                                                                : row.positive_score * inv_temp - lse_p[i];
                srow[pc] = scale * (coef_p[i] == T(1) ? std::expm1(d) : coef_p[i] * std::exp(d) - T(1));
                if (plan.attract) srow[pc] = scale * (std::exp(d) - inv_p_p[i]);
                if (sh.soft) srow[pc] += scale * w * (T(1) - std::exp(tx[pc] - teacher_p[i]));
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
    const at::Tensor& temperature, const std::optional<at::Tensor>& query_labels,
    const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& guide_query,
    const std::optional<at::Tensor>& guide_keys, const std::optional<at::Tensor>& exclude,
    const at::Tensor& row_state, at::ArrayRef<double> scalars, int64_t flags) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs in = make_inputs(query, keys, positives, query_labels, key_labels, guide_query, guide_keys, exclude);
  const Plan plan = Plan::decode(scalars, flags);
  check_plan_use(plan, in);
  const double tau = temperature.item<double>();
  std::vector<at::Tensor> out = with_row_kernels([&]<typename K>() {
    return in.query.scalar_type() == at::kDouble ? backward_impl<double, K>(grad_loss, in, tau, row_state, plan)
                                                 : backward_impl<float, K>(grad_loss, in, tau, row_state, plan);
  });
  return {out[0], out[1], out[2]};
}

}  // namespace fastneg

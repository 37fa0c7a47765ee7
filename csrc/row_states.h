// The per-row state pre-pass: s_i+ (and t_i+) of every row and the thresholds derived from them.
#pragma once

#include <ATen/Parallel.h>

#include "tiles.h"

namespace fastneg {

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

}  // namespace fastneg

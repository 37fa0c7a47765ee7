// Negative sampling on CPU (SPEC section 5): the loss's tiles, rules and classification, each row
// keeping a running top-k of its unmasked negatives.
#include "ops.h"
#include "kernels.h"
#include "row_states.h"

namespace fastneg {
namespace {

// ---- Negative sampling (SPEC section 5) -----------------------------------------------------------
//
// The same tiles, plan and classification as the loss; each row keeps a running top-k (a heap
// of its k best candidates) over the unmasked negatives, scored by
//   top:     s_ij
//   simans:  log w_ij + G_ij   (Gumbel-top-k: a draw without replacement, P(j) ~ w_ij)
//   uniform: G_ij
// with G_ij standard Gumbel noise that is a pure function of (seed, i, j), so draws do not depend
// on tiling or threads (and the Triton sampler computes the same bits). ``first_key`` is the global
// index of keys[0] when the keys are one shard of a larger set: the noise is keyed by the global
// index, so shards drawn apart and merged by value give the one-process draw.

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
  // best first, padded with -1 (value -inf)
  void write(int64_t* out, T* values) {
    std::sort_heap(heap_.begin(), heap_.end(), better);
    for (int64_t c = 0; c < k_; ++c) {
      const bool has = c < static_cast<int64_t>(heap_.size());
      out[c] = has ? heap_[c].second : -1;
      values[c] = has ? heap_[c].first : neg_inf<T>();
    }
  }

 private:
  static bool better(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
  int64_t k_;
  std::vector<std::pair<T, int64_t>> heap_;
};

template <typename T, typename K>
std::tuple<at::Tensor, at::Tensor> sample_impl(const Inputs& in, const Plan& plan, int64_t k, uint32_t seed,
                                              int64_t first_key) {
  const int strategy = plan.kind;
  const Geometry g(in.query.size(0), in.keys.size(0), in.query.size(1));
  const auto opts = in.query.options();
  at::Tensor out = at::empty({g.B, k}, opts.dtype(at::kLong));
  at::Tensor out_values = at::empty({g.B, k}, opts.dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat));
  at::Tensor pos_score = at::empty({g.B}, opts), thr = at::empty({g.B}, opts), gthr = at::empty({g.B}, opts);
  const Shared<T> sh(in, g, 1.0, plan);  // temperature 1: the "logits" are the raw scores
  row_states<T>(in, g, sh, plan, pos_score.data_ptr<T>(), thr.data_ptr<T>(), gthr.data_ptr<T>());
  const T a = sh.a, b = sh.b;
  const int weighting = strategy == Strategy::SIMANS ? Weighting::SIMANS : Weighting::NONE;

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
            const T* value = W == Weighting::SIMANS ? log_w.data() : x.data();  // -inf off the negatives
            RunningTopK<T>& top = best[r];
            const int64_t i = r0 + r;
            for (int64_t c = 0; c < nc; ++c) {
              T v = value[c];
              if (!(v > neg_inf<T>())) continue;  // masked, the positive, or NaN: never drawn
              if (strategy == Strategy::SIMANS) v += T(gumbel_noise(seed, i, first_key + j0 + c));
              else if (strategy == Strategy::UNIFORM) v = T(gumbel_noise(seed, i, first_key + j0 + c));
              if (v > top.floor()) top.offer(v, j0 + c);
            }
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          best[r].write(out.data_ptr<int64_t>() + (r0 + r) * k, out_values.data_ptr<T>() + (r0 + r) * k);
        }
      }
    });
  });
  return {out, out_values};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sample_negatives_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                                const std::optional<at::Tensor>& query_labels,
                                const std::optional<at::Tensor>& key_labels,
                                const std::optional<at::Tensor>& guide_query,
                                const std::optional<at::Tensor>& guide_keys, at::ArrayRef<double> scalars,
                                int64_t flags, int64_t num_negatives, int64_t seed, int64_t first_key) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs in = make_inputs(query, keys, positives, query_labels, key_labels, guide_query, guide_keys);
  const Plan plan = Plan::decode(scalars, flags);
  TORCH_CHECK_VALUE(plan.kind >= Strategy::TOP && plan.kind <= Strategy::UNIFORM, "unknown strategy ", plan.kind);
  TORCH_CHECK_VALUE(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
  TORCH_CHECK_VALUE(first_key >= 0, "first_key must be >= 0, got ", first_key);
  const uint32_t s = static_cast<uint32_t>(seed);
  return with_row_kernels([&]<typename K>() {
    return in.query.scalar_type() == at::kDouble ? sample_impl<double, K>(in, plan, num_negatives, s, first_key)
                                                 : sample_impl<float, K>(in, plan, num_negatives, s, first_key);
  });
}

}  // namespace fastneg

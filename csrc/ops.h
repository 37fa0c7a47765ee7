// The CPU operators registered as torch.ops.fastneg.* (csrc/register.cpp). Every op takes the
// plan as a packed block of scalars and a flags word (plan.h, fastneg/plan.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastneg {

// -> (loss [B], row_state [RowState::COUNT, B], num_masked [B], num_negatives [B])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives, const at::Tensor& temperature,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
    const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
    const std::optional<at::Tensor>& exclude, at::ArrayRef<double> scalars, int64_t flags);

// -> (dL/dquery or [0], dL/dkeys or [0], per-row sum_j dS_ij s_ij (float64, for dL/dtemperature))
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
    const at::Tensor& temperature, const std::optional<at::Tensor>& query_labels,
    const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& guide_query,
    const std::optional<at::Tensor>& guide_keys, const std::optional<at::Tensor>& exclude,
    const at::Tensor& row_state, at::ArrayRef<double> scalars, int64_t flags);

// -> [B, num_negatives] int64 key indices, best first, -1 where a row has fewer negatives, and
// their values (the score, or the perturbed log-weight; -inf at -1). first_key: the global index
// of keys[0] (the noise is keyed by it).
std::tuple<at::Tensor, at::Tensor> sample_negatives_cpu(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                                const std::optional<at::Tensor>& query_labels,
                                const std::optional<at::Tensor>& key_labels,
                                const std::optional<at::Tensor>& guide_query,
                                const std::optional<at::Tensor>& guide_keys, at::ArrayRef<double> scalars,
                                int64_t flags, int64_t num_negatives, int64_t seed, int64_t first_key);

}  // namespace fastneg

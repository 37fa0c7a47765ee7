// Input checks and the plan's combination checks of the CPU ops (the Python layer checks the
// same with friendlier messages; these hold for direct calls of torch.ops.fastneg.*).
#include "inputs.h"

namespace fastneg {

Inputs make_inputs(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                   const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
                   const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
                   const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(query.device().is_cpu(), "fastneg cpu backend: query must be a CPU tensor");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "fastneg cpu backend: query must be float32 or float64");
  TORCH_CHECK(keys.scalar_type() == query.scalar_type(), "fastneg cpu backend: keys dtype must match query");
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2 && query.size(1) == keys.size(1),
              "fastneg cpu backend: query [B, D] and keys [N, D] expected");
  Inputs in;
  // detached: the parallel workers do not inherit the caller's below-autograd dispatch state
  in.query = query.detach().contiguous();
  in.keys = keys.detach().contiguous();
  in.positives = positives.to(at::kLong).contiguous();
  TORCH_CHECK(in.positives.numel() == query.size(0), "fastneg cpu backend: positives must have B entries");
  {
    // checked here as well as in Python, which skips the check while torch.compile traces
    const int64_t* p = in.positives.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.positives.numel(); ++i)
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < keys.size(0), "positives must be in [0, N) = [0, ", keys.size(0),
                        "), got ", p[i], " at row ", i);
  }
  if (key_labels.has_value() && key_labels->defined()) {
    TORCH_CHECK(query_labels.has_value() && query_labels->defined(), "query_labels and key_labels go together");
    // [N] or [levels, N] (and [B] or [levels, B]): a key is masked when any level matches
    in.key_labels = key_labels->to(at::kLong);
    in.query_labels = query_labels->to(at::kLong);
    if (in.key_labels.dim() == 1) in.key_labels = in.key_labels.unsqueeze(0);
    if (in.query_labels.dim() == 1) in.query_labels = in.query_labels.unsqueeze(0);
    in.key_labels = in.key_labels.contiguous();
    in.query_labels = in.query_labels.contiguous();
    TORCH_CHECK_VALUE(in.key_labels.dim() == 2 && in.key_labels.size(1) == keys.size(0) &&
                          in.query_labels.dim() == 2 && in.query_labels.size(1) == query.size(0) &&
                          in.query_labels.size(0) == in.key_labels.size(0),
                      "fastneg cpu backend: labels must be [N]/[B] or [levels, N]/[levels, B]");
    TORCH_CHECK_VALUE(in.key_labels.size(0) >= 1 && in.key_labels.size(0) <= kMaxLabelLevels,
                      "fastneg cpu backend: at most ", kMaxLabelLevels, " label levels");
  }
  if (exclude.has_value() && exclude->defined()) {
    in.exclude = exclude->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(in.exclude.numel() == query.size(0), "fastneg cpu backend: exclude must have B entries");
    const int64_t* e = in.exclude.data_ptr<int64_t>();
    const int64_t* p = in.positives.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.exclude.numel(); ++i)
      TORCH_CHECK_VALUE(e[i] >= -1 && e[i] < keys.size(0) && e[i] != p[i], "exclude must be in [-1, N) = [-1, ",
                        keys.size(0), ") and not the row's positive, got ", e[i], " at row ", i);
  }
  if (guide_query.has_value() && guide_query->defined()) {
    TORCH_CHECK(guide_keys.has_value() && guide_keys->defined(), "guide_query and guide_keys go together");
    in.guide_query = guide_query->detach().to(query.scalar_type()).contiguous();
    in.guide_keys = guide_keys->detach().to(query.scalar_type()).contiguous();
  }
  return in;
}

void check_plan_use(const Plan& plan, const Inputs& in) {
  const bool symmetric = plan.symmetric;
  const int weighting = plan.kind;
  TORCH_CHECK_VALUE(weighting >= Weighting::NONE && weighting <= Weighting::GCSE, "unknown weighting ", weighting);
  TORCH_CHECK_VALUE(!plan.debias || (*plan.debias >= 0.0 && *plan.debias < 1.0), "debias must be in [0, 1)");
  TORCH_CHECK_VALUE(!plan.debias || !symmetric, "debias cannot be combined with symmetric");
  TORCH_CHECK_VALUE(weighting != Weighting::GUIDE_HARDNESS || in.guide(), "guide-score hardness needs a guide");
  TORCH_CHECK_VALUE(weighting != Weighting::GCSE || in.guide(), "GCSE needs a guide (the reference model)");
  TORCH_CHECK_VALUE(weighting != Weighting::GCSE || plan.weight_a > 0.0, "GCSE alpha must be > 0");
  TORCH_CHECK_VALUE(weighting != Weighting::HCL || !symmetric, "HCL cannot be combined with symmetric");
  TORCH_CHECK_VALUE(!plan.attract || (!symmetric && !plan.debias && !plan.soft_temperature && weighting != Weighting::HCL),
                    "attraction (false_negatives='attract') cannot be combined with symmetric, debias, soft labels or HCL");
  TORCH_CHECK_VALUE(!in.exclude.defined() || !symmetric, "exclude cannot be combined with symmetric");
  if (plan.soft_temperature) {
    TORCH_CHECK_VALUE(in.guide(), "soft labels need a guide (the teacher)");
    TORCH_CHECK_VALUE(*plan.soft_temperature > 0.0, "soft-label temperature must be > 0");
    TORCH_CHECK_VALUE(!symmetric && !plan.debias && weighting != Weighting::HCL,
                      "soft labels cannot be combined with symmetric, debias or HCL");
  }
}

}  // namespace fastneg

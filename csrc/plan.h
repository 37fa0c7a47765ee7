// The plan of one call as the C++ kernels read it: the encoding of fastneg/plan.py (a packed
// block of scalars and a flags word) unpacked into named fields. The enums repeat Python's
// names and values; `layout()` lists them, and importing fastneg's CPU backend checks that list
// against fastneg.plan.layout(), so the two cannot drift apart.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fastneg {

struct Weighting {  // the loss's negative weighting (SPEC section 3)
  enum : int { NONE = 0, SIMANS = 1, HARDNESS = 2, GUIDE_HARDNESS = 3, HCL = 4, GCSE = 5 };
};

struct Strategy {  // the sampler's draw (SPEC section 5)
  enum : int { TOP = 0, SIMANS = 1, UNIFORM = 2 };
};

struct Scalar {  // slots of the packed scalar block
  enum : int {
    MARGIN = 0, RELATIVE_MARGIN = 1, MAX_SCORE = 2, GUIDE_MARGIN = 3, WEIGHT_A = 4, WEIGHT_B = 5, DEBIAS = 6,
    SOFT_TEMPERATURE = 7, SOFT_WEIGHT = 8, COUNT = 9
  };
};

struct Flag {  // bits of the flags word
  enum : int64_t {
    HAS_MARGIN = 1 << 0, HAS_RELATIVE_MARGIN = 1 << 1, HAS_MAX_SCORE = 1 << 2, GUIDE_RELATIVE = 1 << 3,
    SYMMETRIC = 1 << 4, DEBIAS = 1 << 5, SOFT = 1 << 6, ATTRACT = 1 << 7, QUERY_GRAD = 1 << 8, KEYS_GRAD = 1 << 9,
    TEMPERATURE_GRAD = 1 << 10  // the backward's per-row temperature sum is needed (the Triton kernels read it)
  };
};

constexpr int kKindShift = 16;  // the weighting (loss) or strategy (sampler) sits from this bit on

struct RowState {  // rows of the forward's [COUNT, B] per-row state
  enum : int {
    LOGSUMEXP = 0, POSITIVE_SCORE = 1, OFFSET = 2, THRESHOLD = 3, GUIDE_THRESHOLD = 4, COLUMN_LOGSUMEXP = 5,
    COLUMN_OFFSET = 6, POSITIVE_COEF = 7, HCL_MASS = 8, HCL_SHIFT = 9, TEACHER_LOGSUMEXP = 10,
    INV_NUM_POSITIVES = 11, HCL_REFERENCE = 12, HCL_WEIGHT_REFERENCE = 13, LOG_POSITIVE_SHARE = 14,
    NEGATIVE_MAX = 15, COUNT = 16
  };
};

constexpr int64_t kMaxLabelLevels = 8;

struct Plan {
  std::optional<double> margin, relative_margin, max_score;
  double guide_margin = 0.0;
  bool guide_relative = false;
  int kind = Weighting::NONE;  // the weighting, or the sampler's strategy
  double weight_a = 0.0, weight_b = 0.0;
  std::optional<double> debias;            // DCL's tau_plus
  std::optional<double> soft_temperature;  // soft labels: the teacher's temperature
  double soft_weight = 1.0;                // loss = (1 - w) CE + w KL(teacher || student)
  bool attract = false;  // flagged keys join the positives (SupCon's outside form) instead of leaving the row
  bool symmetric = false, query_grad = false, keys_grad = false;

  static Plan decode(c10::ArrayRef<double> scalars, int64_t flags) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(scalars.size()) == Scalar::COUNT, "scalars must have ", Scalar::COUNT,
                      " entries (fastneg.plan.Scalar), got ", scalars.size());
    Plan p;
    auto opt = [&](int64_t flag, int slot) -> std::optional<double> {
      if (flags & flag) return scalars[slot];
      return std::nullopt;
    };
    p.margin = opt(Flag::HAS_MARGIN, Scalar::MARGIN);
    p.relative_margin = opt(Flag::HAS_RELATIVE_MARGIN, Scalar::RELATIVE_MARGIN);
    p.max_score = opt(Flag::HAS_MAX_SCORE, Scalar::MAX_SCORE);
    p.guide_margin = scalars[Scalar::GUIDE_MARGIN];
    p.guide_relative = flags & Flag::GUIDE_RELATIVE;
    p.kind = static_cast<int>(flags >> kKindShift);
    p.weight_a = scalars[Scalar::WEIGHT_A];
    p.weight_b = scalars[Scalar::WEIGHT_B];
    p.debias = opt(Flag::DEBIAS, Scalar::DEBIAS);
    p.soft_temperature = opt(Flag::SOFT, Scalar::SOFT_TEMPERATURE);
    p.soft_weight = scalars[Scalar::SOFT_WEIGHT];
    p.attract = flags & Flag::ATTRACT;
    p.symmetric = flags & Flag::SYMMETRIC;
    p.query_grad = flags & Flag::QUERY_GRAD;
    p.keys_grad = flags & Flag::KEYS_GRAD;
    return p;
  }
};

// Every value above by its Python name (fastneg.plan.layout()).
inline std::vector<std::pair<std::string, int64_t>> layout() {
  return {
      {"Weighting.NONE", Weighting::NONE}, {"Weighting.SIMANS", Weighting::SIMANS},
      {"Weighting.HARDNESS", Weighting::HARDNESS}, {"Weighting.GUIDE_HARDNESS", Weighting::GUIDE_HARDNESS},
      {"Weighting.HCL", Weighting::HCL}, {"Weighting.GCSE", Weighting::GCSE},
      {"Strategy.TOP", Strategy::TOP}, {"Strategy.SIMANS", Strategy::SIMANS}, {"Strategy.UNIFORM", Strategy::UNIFORM},
      {"Scalar.MARGIN", Scalar::MARGIN}, {"Scalar.RELATIVE_MARGIN", Scalar::RELATIVE_MARGIN},
      {"Scalar.MAX_SCORE", Scalar::MAX_SCORE}, {"Scalar.GUIDE_MARGIN", Scalar::GUIDE_MARGIN},
      {"Scalar.WEIGHT_A", Scalar::WEIGHT_A}, {"Scalar.WEIGHT_B", Scalar::WEIGHT_B}, {"Scalar.DEBIAS", Scalar::DEBIAS},
      {"Scalar.SOFT_TEMPERATURE", Scalar::SOFT_TEMPERATURE}, {"Scalar.SOFT_WEIGHT", Scalar::SOFT_WEIGHT},
      {"Flag.HAS_MARGIN", Flag::HAS_MARGIN}, {"Flag.HAS_RELATIVE_MARGIN", Flag::HAS_RELATIVE_MARGIN},
      {"Flag.HAS_MAX_SCORE", Flag::HAS_MAX_SCORE}, {"Flag.GUIDE_RELATIVE", Flag::GUIDE_RELATIVE},
      {"Flag.SYMMETRIC", Flag::SYMMETRIC}, {"Flag.DEBIAS", Flag::DEBIAS}, {"Flag.SOFT", Flag::SOFT},
      {"Flag.ATTRACT", Flag::ATTRACT}, {"Flag.QUERY_GRAD", Flag::QUERY_GRAD}, {"Flag.KEYS_GRAD", Flag::KEYS_GRAD},
      {"Flag.TEMPERATURE_GRAD", Flag::TEMPERATURE_GRAD},
      {"RowState.LOGSUMEXP", RowState::LOGSUMEXP}, {"RowState.POSITIVE_SCORE", RowState::POSITIVE_SCORE},
      {"RowState.OFFSET", RowState::OFFSET}, {"RowState.THRESHOLD", RowState::THRESHOLD},
      {"RowState.GUIDE_THRESHOLD", RowState::GUIDE_THRESHOLD},
      {"RowState.COLUMN_LOGSUMEXP", RowState::COLUMN_LOGSUMEXP},
      {"RowState.COLUMN_OFFSET", RowState::COLUMN_OFFSET}, {"RowState.POSITIVE_COEF", RowState::POSITIVE_COEF},
      {"RowState.HCL_MASS", RowState::HCL_MASS}, {"RowState.HCL_SHIFT", RowState::HCL_SHIFT},
      {"RowState.TEACHER_LOGSUMEXP", RowState::TEACHER_LOGSUMEXP},
      {"RowState.INV_NUM_POSITIVES", RowState::INV_NUM_POSITIVES},
      {"RowState.HCL_REFERENCE", RowState::HCL_REFERENCE},
      {"RowState.HCL_WEIGHT_REFERENCE", RowState::HCL_WEIGHT_REFERENCE},
      {"RowState.LOG_POSITIVE_SHARE", RowState::LOG_POSITIVE_SHARE},
      {"RowState.NEGATIVE_MAX", RowState::NEGATIVE_MAX},
      {"KIND_SHIFT", kKindShift}, {"MAX_LABEL_LEVELS", kMaxLabelLevels}, {"NUM_SCALARS", Scalar::COUNT},
      {"NUM_ROW_STATES", RowState::COUNT},
  };
}

}  // namespace fastneg

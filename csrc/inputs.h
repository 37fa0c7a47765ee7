// The checked inputs of one call and what forward, backward and sampler share for it (key
// tiles, label tables, scalars).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "geometry.h"
#include "plan.h"

namespace fastneg {

struct Inputs {
  at::Tensor query, keys, positives, query_labels, key_labels, guide_query, guide_keys;
  at::Tensor exclude;  // [B] int64, -1 = none (undefined: no exclusions)
  bool labels() const { return key_labels.defined(); }
  int64_t label_levels() const { return labels() ? key_labels.size(0) : 0; }
  bool guide() const { return guide_query.defined(); }
};

// Checked, contiguous inputs of one call (csrc/inputs.cpp); labels as [levels, rows].
Inputs make_inputs(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positives,
                   const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
                   const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
                   const std::optional<at::Tensor>& exclude = std::nullopt);

// The combinations the fused loss refuses (also checked in Python, with friendlier messages).
void check_plan_use(const Plan& plan, const Inputs& in);

// What forward and backward share for one call: the key tiles and the scalars.
template <typename T>
struct Shared {
  KeyTiles<T> key_tiles;
  std::optional<KeyTiles<T>> guide_tiles;
  const int64_t* positives;
  const int64_t* key_labels;    // nullptr without labels
  const int64_t* query_labels;  // nullptr without labels
  const int64_t* exclude;       // nullptr without exclusions
  int64_t levels, B, N;
  T inv_temp, a, b, soft_inv;
  bool soft;
  Shared(const Inputs& in, const Geometry& g, double temperature, const Plan& plan)
      : key_tiles(in.keys, g),
        positives(in.positives.data_ptr<int64_t>()),
        key_labels(in.labels() ? in.key_labels.data_ptr<int64_t>() : nullptr),
        query_labels(in.labels() ? in.query_labels.data_ptr<int64_t>() : nullptr),
        exclude(in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr),
        levels(in.label_levels()),
        B(in.query.size(0)),
        N(in.keys.size(0)),
        inv_temp(T(1) / T(temperature)),
        a(T(plan.weight_a)),
        b(T(plan.weight_b)),
        soft_inv(plan.soft_temperature ? T(1) / T(*plan.soft_temperature) : T(0)),
        soft(plan.soft_temperature.has_value()) {
    if (in.guide()) guide_tiles.emplace(in.guide_keys, g);
  }
};

}  // namespace fastneg

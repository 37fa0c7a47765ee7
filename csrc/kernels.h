// The element-wise row kernels (row_kernels.h), compiled twice, generic and AVX2+FMA, the choice
// of build per call, and the dispatch of the runtime flags to template arguments.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "common.h"
#include "rules.h"

namespace fastneg {

namespace generic {
#include "row_kernels.h"
}  // namespace generic

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTNEG_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "row_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

// Calls f.template operator()<W, LABELS, GUIDE>() with the runtime flags as template args.
template <typename F>
void dispatch_flags(int weighting, bool labels, bool guide, F&& f) {
  auto with_w = [&](auto w) {
    if (labels) {
      if (guide) f.template operator()<decltype(w)::value, true, true>();
      else f.template operator()<decltype(w)::value, true, false>();
    } else {
      if (guide) f.template operator()<decltype(w)::value, false, true>();
      else f.template operator()<decltype(w)::value, false, false>();
    }
  };
  if (weighting == Weighting::SIMANS) with_w(std::integral_constant<int, Weighting::SIMANS>{});
  else if (weighting == Weighting::HARDNESS) with_w(std::integral_constant<int, Weighting::HARDNESS>{});
  else if (weighting == Weighting::GUIDE_HARDNESS) with_w(std::integral_constant<int, Weighting::GUIDE_HARDNESS>{});
  else if (weighting == Weighting::HCL) with_w(std::integral_constant<int, Weighting::HCL>{});
  else if (weighting == Weighting::GCSE) with_w(std::integral_constant<int, Weighting::GCSE>{});
  else with_w(std::integral_constant<int, Weighting::NONE>{});
}

// The element-wise kernels' build: AVX2+FMA where the processor has it, else the generic one.
// FASTNEG_CPU_KERNELS=generic forces the generic build (tests compare the two).
template <typename F>
decltype(auto) with_row_kernels(F&& f) {
#ifdef FASTNEG_HAVE_AVX2_BUILD
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* forced = std::getenv("FASTNEG_CPU_KERNELS");
  if (has_avx2 && !(forced && std::string(forced) == "generic")) return f.template operator()<avx2::RowKernels>();
#endif
  return f.template operator()<generic::RowKernels>();
}

}  // namespace fastneg

// Registration of the CPU operators (torch.ops.fastneg.*) and the encoding check's table.
//
// The schemas are the ops' whole interface: the tensors, then the plan as `float[] scalars`
// (fastneg.plan.Scalar) and `int flags` (fastneg.plan.Flag, the weighting or strategy in the bits
// from KIND_SHIFT). The Triton ops (fastneg/backends/triton) take the same arguments.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"
#include "plan.h"

namespace fastneg {

TORCH_LIBRARY(fastneg, m) {
  m.def(
      "info_nce_fwd_cpu(Tensor query, Tensor keys, Tensor positives, Tensor temperature, Tensor? query_labels, "
      "Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, Tensor? exclude, float[] scalars, int flags) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "info_nce_bwd_cpu(Tensor grad_loss, Tensor query, Tensor keys, Tensor positives, Tensor temperature, "
      "Tensor? query_labels, Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, Tensor? exclude, "
      "Tensor row_state, float[] scalars, int flags) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sample_negatives_cpu(Tensor query, Tensor keys, Tensor positives, Tensor? query_labels, Tensor? key_labels, "
      "Tensor? guide_query, Tensor? guide_keys, float[] scalars, int flags, int num_negatives, int seed, "
      "int first_key=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastneg, CPU, m) {
  m.impl("info_nce_fwd_cpu", &info_nce_fwd_cpu);
  m.impl("info_nce_bwd_cpu", &info_nce_bwd_cpu);
  m.impl("sample_negatives_cpu", &sample_negatives_cpu);
}

}  // namespace fastneg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastneg CPU kernels (registered as torch.ops.fastneg.*)";
  m.def("layout", &fastneg::layout, "The plan encoding's values by name (checked against fastneg.plan.layout()).");
}

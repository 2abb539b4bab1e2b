// The two ops' argument checks (shapes, dtypes, one device), shared by the CPU and CUDA kernels.
// Index ranges are checked where the indices are read: on the host by the CPU kernels, by
// device-side asserts in the CUDA kernels (no sync per call).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

namespace weightablate {

struct PairSizes {
  int64_t I, J, N, K;  // units, inputs, samples, weights
};

inline PairSizes check_pair_deltas_args(const at::Tensor& a_t, const at::Tensor& z_t, const at::Tensor& rows,
                                        const at::Tensor& cols, const at::Tensor& w, const at::Tensor& gain,
                                        const at::Tensor& shift, const at::Tensor& slope) {
  TORCH_CHECK(a_t.dim() == 2 && z_t.dim() == 2, "pair_deltas: a_t (J, N) and z_t (I, N) must be 2-D");
  TORCH_CHECK(a_t.size(1) == z_t.size(1), "pair_deltas: a_t and z_t need the same number of samples");
  TORCH_CHECK(a_t.scalar_type() == z_t.scalar_type() && w.scalar_type() == a_t.scalar_type(),
              "pair_deltas: a_t, z_t and w must share one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong, "pair_deltas: rows, cols must be int64");
  TORCH_CHECK(rows.dim() == 1 && cols.sizes() == rows.sizes() && w.sizes() == rows.sizes(),
              "pair_deltas: rows, cols and w must be 1-D of one length K");
  for (const auto* t : {&z_t, &rows, &cols, &w, &gain, &shift, &slope}) {
    TORCH_CHECK(t->device() == a_t.device(), "pair_deltas: every tensor must be on ", a_t.device());
  }
  const PairSizes s{z_t.size(0), a_t.size(0), a_t.size(1), rows.size(0)};
  for (const auto* t : {&gain, &shift, &slope}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->dim() == 1 && t->size(0) == s.I,
                "pair_deltas: gain, shift and slope must be float64 of shape (I,)");
  }
  return s;
}

struct ScoreSizes {
  int64_t K, N, C, U;  // weights, samples, classes, head rows (C without a head)
  bool has_head, has_moments;
  int64_t order, M;  // moments (D, M, N): D = order
};

inline ScoreSizes check_score_deltas_args(const at::Tensor& d, const at::Tensor& unit,
                                          const std::optional<at::Tensor>& head, const at::Tensor& probs,
                                          const at::Tensor& logits, const at::Tensor& labels,
                                          const std::optional<at::Tensor>& moments,
                                          const std::optional<at::Tensor>& moment_slot) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kDouble, "score_deltas: d must be float64 (K, N)");
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kDouble && logits.sizes() == probs.sizes() &&
                  logits.scalar_type() == at::kDouble,
              "score_deltas: probs and logits must be float64 (N, C)");
  ScoreSizes s{d.size(0), d.size(1), probs.size(1), probs.size(1), false, false, 0, 0};
  TORCH_CHECK(probs.size(0) == s.N, "score_deltas: probs has ", probs.size(0), " samples, d has ", s.N);
  TORCH_CHECK(unit.scalar_type() == at::kLong && unit.dim() == 1 && unit.size(0) == s.K,
              "score_deltas: unit must be int64 (K,)");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == s.N,
              "score_deltas: labels must be int64 (N,)");
  for (const auto* t : {&unit, &probs, &logits, &labels}) {
    TORCH_CHECK(t->device() == d.device(), "score_deltas: every tensor must be on ", d.device());
  }
  s.has_head = head.has_value() && head->defined();
  if (s.has_head) {
    TORCH_CHECK(head->dim() == 2 && head->size(1) == s.C && head->scalar_type() == at::kDouble &&
                    head->device() == d.device(),
                "score_deltas: head must be float64 (U, C) on ", d.device());
    s.U = head->size(0);
  }
  s.has_moments = moments.has_value() && moments->defined();
  if (s.has_moments) {
    TORCH_CHECK(s.has_head, "score_deltas: moments need a head");
    TORCH_CHECK(moment_slot.has_value() && moment_slot->defined() && moment_slot->scalar_type() == at::kLong &&
                    moment_slot->dim() == 1 && moment_slot->size(0) == s.U,
                "score_deltas: moments need moment_slot int64 (U,)");
    TORCH_CHECK(moments->dim() == 3 && moments->size(2) == s.N && moments->scalar_type() == at::kDouble &&
                    moments->size(0) >= 2 && moments->device() == d.device() &&
                    moment_slot->device() == d.device(),
                "score_deltas: moments must be float64 (D >= 2, M, N) on ", d.device());
    s.order = moments->size(0);
    s.M = moments->size(1);
  }
  return s;
}

// score_deltas' outputs: (delta_loss, delta_kl, flips, new_errors, new_correct, nonzero, class_loss).
using ScoreOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// All seven zeroed on d's device; class_loss is (K, C) when by_class, else (K, 0).
inline ScoreOutputs zero_score_outputs(const at::Tensor& d, int64_t C, bool by_class) {
  const int64_t K = d.size(0);
  const auto f64 = d.options(), i64 = f64.dtype(at::kLong);
  return {at::zeros({K}, f64), at::zeros({K}, f64), at::zeros({K}, i64), at::zeros({K}, i64), at::zeros({K}, i64),
          at::zeros({K}, f64.dtype(at::kBool)), at::zeros({K, by_class ? C : 0}, f64)};
}

}  // namespace weightablate

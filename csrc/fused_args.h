// fused_scores' argument checks and outputs (pair_deltas' inputs plus score_deltas' inputs).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

namespace weightablate {

struct FusedSizes {
  int64_t I, J, N, K, C, U;  // units, inputs, samples, weights, classes, head rows
  bool has_head, has_moments;
  int64_t order, M;  // moments (D, M, N): D = order
};

inline FusedSizes check_fused_args(const at::Tensor& a_t, const at::Tensor& z_t, const at::Tensor& rows,
                                   const at::Tensor& cols, const at::Tensor& w, const at::Tensor& gain,
                                   const at::Tensor& shift, const at::Tensor& slope,
                                   const std::optional<at::Tensor>& head, const at::Tensor& probs,
                                   const at::Tensor& logits, const at::Tensor& labels,
                                   const std::optional<at::Tensor>& moments, const std::optional<at::Tensor>& mean_gap,
                                   const std::optional<at::Tensor>& moment_slot) {
  TORCH_CHECK(a_t.dim() == 2 && z_t.dim() == 2, "fused_scores: a_t (J, N) and z_t (I, N) must be 2-D");
  TORCH_CHECK(a_t.size(1) == z_t.size(1), "fused_scores: a_t and z_t need the same number of samples");
  TORCH_CHECK(a_t.scalar_type() == z_t.scalar_type() && w.scalar_type() == a_t.scalar_type(),
              "fused_scores: a_t, z_t and w must share one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong, "fused_scores: rows, cols must be int64");
  TORCH_CHECK(rows.dim() == 1 && cols.sizes() == rows.sizes() && w.sizes() == rows.sizes(),
              "fused_scores: rows, cols and w must be 1-D of one length K");
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kDouble && logits.sizes() == probs.sizes() &&
                  logits.scalar_type() == at::kDouble,
              "fused_scores: probs and logits must be float64 (N, C)");
  FusedSizes s{z_t.size(0), a_t.size(0), a_t.size(1), rows.size(0), probs.size(1), probs.size(1), false, false, 0, 0};
  TORCH_CHECK(probs.size(0) == s.N, "fused_scores: probs has ", probs.size(0), " samples, a_t has ", s.N);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == s.N,
              "fused_scores: labels must be int64 (N,)");
  for (const auto* t : {&z_t, &rows, &cols, &w, &gain, &shift, &slope, &probs, &logits, &labels}) {
    TORCH_CHECK(t->device() == a_t.device(), "fused_scores: every tensor must be on ", a_t.device());
  }
  for (const auto* t : {&gain, &shift, &slope}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->dim() == 1 && t->size(0) == s.I,
                "fused_scores: gain, shift and slope must be float64 of shape (I,)");
  }
  s.has_head = head.has_value() && head->defined();
  if (s.has_head) {
    TORCH_CHECK(head->dim() == 2 && head->size(1) == s.C && head->scalar_type() == at::kDouble &&
                    head->device() == a_t.device(),
                "fused_scores: head must be float64 (U, C) on ", a_t.device());
    s.U = head->size(0);
  } else {
    TORCH_CHECK(s.I == s.C, "fused_scores: without a head the units are the logits: I must equal C");
  }
  s.has_moments = moments.has_value() && moments->defined();
  if (s.has_moments) {
    TORCH_CHECK(s.has_head, "fused_scores: moments need a head");
    TORCH_CHECK(moment_slot.has_value() && moment_slot->defined() && moment_slot->scalar_type() == at::kLong &&
                    moment_slot->dim() == 1 && moment_slot->size(0) == s.U && moment_slot->device() == a_t.device(),
                "fused_scores: moments need moment_slot int64 (U,)");
    TORCH_CHECK(moments->dim() == 3 && moments->size(2) == s.N && moments->scalar_type() == at::kDouble &&
                    moments->size(0) >= 2 && moments->size(0) <= 8 && moments->device() == a_t.device(),
                "fused_scores: moments must be float64 (D, M, N) with 2 <= D <= 8 on ", a_t.device());
    s.order = moments->size(0);
    s.M = moments->size(1);
    TORCH_CHECK(mean_gap.has_value() && mean_gap->defined() && mean_gap->scalar_type() == at::kDouble &&
                    mean_gap->dim() == 2 && mean_gap->size(0) == s.M && mean_gap->size(1) == s.N &&
                    mean_gap->device() == a_t.device(),
                "fused_scores: moments need mean_gap float64 (M, N)");
  }
  return s;
}

// (delta_loss, delta_kl, flips, new_errors, new_correct, nonzero, class_loss, exact_pairs, active_pairs)
using FusedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor>;

inline FusedOutputs zero_fused_outputs(const at::Tensor& like, int64_t K, int64_t C, bool by_class) {
  const auto f64 = like.options().dtype(at::kDouble), i64 = f64.dtype(at::kLong);
  return {at::zeros({K}, f64), at::zeros({K}, f64), at::zeros({K}, i64), at::zeros({K}, i64), at::zeros({K}, i64),
          at::zeros({K}, f64.dtype(at::kBool)), at::zeros({K, by_class ? C : 0}, f64), at::zeros({K}, i64),
          at::zeros({K}, i64)};
}

}  // namespace weightablate

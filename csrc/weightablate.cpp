// Every op schema, once. Each backend registers its kernels in its own file
// (csrc/cpu/*.cpp, csrc/cuda/*.cu) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing weightablate._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(weightablate, m) {
  // Stage 1: d[k, n] = s(u_n,i - gain_i * w_k * a_n,j) - s(u_n,i), u = gain * z + shift,
  // s = leaky ReLU with per-unit slope; (i, j) = (rows[k], cols[k]).
  m.def(
      "pair_deltas(Tensor a_t, Tensor z_t, Tensor rows, Tensor cols, Tensor w, "
      "Tensor gain, Tensor shift, Tensor slope) -> Tensor");
  // Stage 2: the rank-one logit correction l' = l + d[k, n] * head[unit[k]] (head=None: the
  // target is the logits layer, l'_unit += d), summed over samples in float64:
  // (delta_loss, delta_kl, flips, new_errors, new_correct, nonzero, class_loss); class_loss is
  // delta_loss split by the samples' labels, (K, C) when by_class else (K, 0).
  m.def(
      "score_deltas(Tensor d, Tensor unit, Tensor? head, Tensor probs, Tensor logits, "
      "Tensor labels, Tensor? moments, Tensor? moment_slot, bool flips, bool by_class=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Both stages fused for a piecewise or logits head, d never stored: score_deltas' seven outputs
  // plus exact_pairs (pairs the exact O(C) loop scored) and active_pairs (pairs with d != 0).
  // moments (D, M, N) are about each sample's top class: sum_c p_nc (v_c - v_top(n))^k;
  // mean_gap (M, N) = E_p[v] - v_y.
  m.def(
      "fused_scores(Tensor a_t, Tensor z_t, Tensor rows, Tensor cols, Tensor w, Tensor gain, Tensor shift, "
      "Tensor slope, Tensor? head, Tensor probs, Tensor logits, Tensor labels, Tensor? moments, "
      "Tensor? mean_gap, Tensor? moment_slot, bool flips, bool by_class=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The LayerNorm closed form's moment path (weightablate/token_moments.py, score_pairs): per (pair k, token t)
  // of alpha, beta (K, M) float64, from the mixed moments (U, 27, M) of unit slot[k] (orders 1..6 in _PAIRS'
  // order), gap_a (M,), gap_b (U, M), the per-token a_max, q (M,) and the per-unit range (U,): (dce, kl (K, M)
  // float64, undecided (K, M) bool: left to the exact form).
  m.def(
      "token_moment_scores(Tensor alpha, Tensor beta, Tensor slot, Tensor moments, Tensor gap_a, Tensor gap_b, "
      "Tensor a_max, Tensor q, Tensor unit_range, int n_vocab, float certify) -> (Tensor, Tensor, Tensor)");
}

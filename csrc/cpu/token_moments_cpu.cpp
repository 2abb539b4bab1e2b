// The LayerNorm closed form's moment path on the CPU: per (pair k, token t), the truncated mixed-moment series
// of the log-partition change -> (dCE, KL), its truncation certificate -> undecided (the flip test is
// weightablate.token_moments.flip_size's). The math and
// the reference (same operations, same order) are weightablate/token_moments.py (score_pairs_reference).
#pragma GCC optimize("fp-contract=off")  // the reference's roundings: no fused multiply-adds
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "clones.h"

namespace weightablate {
namespace {

constexpr int kOrder = 6;                           // token_moments.ORDER
constexpr int kMoments = kOrder * (kOrder + 3) / 2;  // mixed moments of order 1..kOrder: 27
constexpr double kLogSeriesMax = 6.5e-3;            // token_moments.LOG_SERIES_MAX
constexpr double kMaxX = 0.5;                       // beyond: the exact form
constexpr double kCancel = 64.0 / 4503599627370496.0;  // token_moments.CANCEL: 64 * 2^-52
constexpr int64_t kTile = 512;                      // tokens per pass: a unit's moment tile stays in L2
constexpr double kFact = 720.0, kFact1 = 5040.0;    // D!, (D + 1)!

// exp(x) on [0, 1/2] (the only x whose bound is used): Taylor to degree 17, within an ulp or two of exp
// (the truncation is below 1e-19 relative); vectorises where a call to exp would not.
WA_INLINE double exp_small(double x) {
  double p = 1.0 / 355687428096000.0;  // 1/17!
  p = p * x + 1.0 / 20922789888000.0;
  p = p * x + 1.0 / 1307674368000.0;
  p = p * x + 1.0 / 87178291200.0;
  p = p * x + 1.0 / 6227020800.0;
  p = p * x + 1.0 / 479001600;
  p = p * x + 1.0 / 39916800;
  p = p * x + 1.0 / 3628800;
  p = p * x + 1.0 / 362880;
  p = p * x + 1.0 / 40320;
  p = p * x + 1.0 / 5040;
  p = p * x + 1.0 / 720;
  p = p * x + 1.0 / 120;
  p = p * x + 1.0 / 24;
  p = p * x + 1.0 / 6;
  p = p * x + 1.0 / 2;
  p = p * x + 1.0;
  return p * x + 1.0;
}

struct Args {
  const double *alpha, *beta;  // (K, M)
  const int64_t* slot;         // (K,)
  const double* mom;           // (U, kMoments, M)
  const double *gap_a, *a_max, *q;  // (M,)
  const double* gap_b;                                           // (U, M)
  const double* range;  // (U,)
  int64_t K, M;
  double round_coef, certify;  // (V + 2D + 4) 4.4e-16 2^D; CERTIFY
  double *dce, *kl;
  uint8_t* undecided;
};

struct Entry {
  double dce, kl, und;  // und: 1 or 0
  double s, s2, bound, und_x, t2;  // for the log1p pass: S, S_2, the truncation bound, x's own tests (1 or 0),
                                   // the order-2 terms' size (the cancellation guard)
};

// Whether a scored entry is left to the exact form: x's tests, the truncation bound, the cancellation guard,
// or a non-finite result (x - x is 0 only for finite x).
WA_INLINE double undecided(double und_x, double bound, double t2, double kl, double dce, double certify) {
  const bool finite = (kl - kl == 0.0) && (dce - dce == 0.0);
  return und_x != 0.0 || bound > certify * kl || kCancel * t2 > certify * kl || !finite ? 1.0 : 0.0;
}

// One (pair, token): the reference's operations in its order (the moments in _PAIRS' order: order n = 1..D,
// r = 0..n, s = n - r). log1p(S) - S by its series throughout: finish_log redoes the entries whose |S| is
// beyond the series' range.
WA_INLINE Entry entry(const Args& a, const double* mu, const double* gb, double rng, double al, double be,
                      int64_t t) {
  const int64_t M = a.M;
  const double a1 = al, a2 = a1 * al / 2, a3 = a2 * al / 3, a4 = a3 * al / 4, a5 = a4 * al / 5, a6 = a5 * al / 6;
  const double b1 = be, b2 = b1 * be / 2, b3 = b2 * be / 3, b4 = b3 * be / 4, b5 = b4 * be / 5, b6 = b5 * be / 6;
  const double s1 = al * mu[1 * M + t] + be * mu[0 * M + t];  // (1, 0) is _PAIRS[1], (0, 1) _PAIRS[0]
  double s2 = 0.0, top = 0.0, term;
  // apow[0] = bpow[0] = 1: 1 * x is x exactly
#define WA_TERM(i, ar, bs) term = (ar) * (bs) * mu[(i) * M + t], s2 = s2 + term
#define WA_TOP(i, ar, bs) WA_TERM(i, ar, bs), top = top + term
  WA_TERM(2, 1.0, b2); WA_TERM(3, a1, b1); WA_TERM(4, a2, 1.0);
  WA_TERM(5, 1.0, b3); WA_TERM(6, a1, b2); WA_TERM(7, a2, b1); WA_TERM(8, a3, 1.0);
  WA_TERM(9, 1.0, b4); WA_TERM(10, a1, b3); WA_TERM(11, a2, b2); WA_TERM(12, a3, b1); WA_TERM(13, a4, 1.0);
  WA_TERM(14, 1.0, b5); WA_TERM(15, a1, b4); WA_TERM(16, a2, b3); WA_TERM(17, a3, b2); WA_TERM(18, a4, b1);
  WA_TERM(19, a5, 1.0);
  WA_TOP(20, 1.0, b6); WA_TOP(21, a1, b5); WA_TOP(22, a2, b4); WA_TOP(23, a3, b3); WA_TOP(24, a4, b2);
  WA_TOP(25, a5, b1); WA_TOP(26, a6, 1.0);
#undef WA_TOP
#undef WA_TERM
  const double s = s1 + s2;
  double series = (0.0 + 1.0 / 9) * s;  // sum_{k=2..9} (-1)^(k+1) s^k / k, by Horner
  series = (series + -1.0 / 8) * s;
  series = (series + 1.0 / 7) * s;
  series = (series + -1.0 / 6) * s;
  series = (series + 1.0 / 5) * s;
  series = (series + -1.0 / 4) * s;
  series = (series + 1.0 / 3) * s;
  series = (series + -1.0 / 2) * s;
  series = series * s;
  const double kl = s2 + series;
  const double dce = kl + al * a.gap_a[t] + be * gb[t];
  const double x = std::fabs(al) * a.a_max[t] + std::fabs(be) * rng;
  const double x2 = x * x, x6 = x2 * x2 * x2;
  const double qx = a.q[t] * x6;
  const double mD = (top < 0.0 ? 0.0 : top) * kFact + a.round_coef * a.q[t] * x6;  // NaN stays NaN, as clamp_min
  const double lo = qx != qx ? qx : (mD < qx ? mD : qx);                          // torch.minimum: NaN wins
  const double bound = lo * x * exp_small(x) / kFact1;
  const double und_x = x > kMaxX ? 1.0 : 0.0;
  const double m20 = mu[4 * M + t], m02 = mu[2 * M + t];  // (2, 0) is _PAIRS[4], (0, 2) _PAIRS[2]
  double t2 = std::fabs(al) * std::sqrt(m20 < 0.0 ? 0.0 : m20) + std::fabs(be) * std::sqrt(m02 < 0.0 ? 0.0 : m02);
  t2 = t2 * t2 / 2;
  const double und = undecided(und_x, bound, t2, kl, dce, a.certify);
  return {dce, kl, und, s, s2, bound, und_x, t2};
}

WA_CLONES void score_rows(const Args& a, int64_t kb, int64_t ke) {
  double und[kTile], sv[kTile], s2v[kTile], bv[kTile], uxv[kTile], t2v[kTile];
  const int64_t M = a.M;
  for (int64_t t0 = 0; t0 < M; t0 += kTile) {
    const int64_t n = std::min(M, t0 + kTile) - t0;
    const double *ga = a.gap_a + t0;
    for (int64_t k = kb; k < ke; ++k) {
      const int64_t u = a.slot[k];
      const double* mu = a.mom + u * kMoments * M + t0;
      const double* gb = a.gap_b + u * M + t0;
      const double rng = a.range[u];
      const double* al = a.alpha + k * M + t0;
      const double* be = a.beta + k * M + t0;
      double* dce = a.dce + k * M + t0;
      double* kl = a.kl + k * M + t0;
      const Args at{a.alpha, a.beta, a.slot, a.mom, ga, a.a_max + t0, a.q + t0, a.gap_b, a.range, a.K, M,
                    a.round_coef, a.certify, a.dce, a.kl, a.undecided};
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const Entry e = entry(at, mu, gb, rng, al[i], be[i], i);
        dce[i] = e.dce;
        kl[i] = e.kl;
        und[i] = e.und;
        sv[i] = e.s;
        s2v[i] = e.s2;
        bv[i] = e.bound;
        uxv[i] = e.und_x;
        t2v[i] = e.t2;
      }
      for (int64_t i = 0; i < n; ++i) {  // |S| beyond the log series: log1p(S) - S (log1p_minus)
        const double s = sv[i];
        if (!(std::fabs(s) <= kLogSeriesMax)) {
          const double k_ = s2v[i] + (std::log1p(s) - s);
          kl[i] = k_;
          dce[i] = k_ + al[i] * ga[i] + be[i] * gb[i];
          und[i] = undecided(uxv[i], bv[i], t2v[i], k_, dce[i], a.certify);
        }
      }
      uint8_t* out = a.undecided + k * M + t0;
      for (int64_t i = 0; i < n; ++i) out[i] = und[i] != 0.0;
    }
  }
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> token_moment_scores_cpu(
    const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& slot, const at::Tensor& moments,
    const at::Tensor& gap_a, const at::Tensor& gap_b, const at::Tensor& a_max, const at::Tensor& q,
    const at::Tensor& unit_range, int64_t n_vocab, double certify) {
  const char* op = "token_moment_scores: ";
  TORCH_CHECK(alpha.dim() == 2 && beta.sizes() == alpha.sizes(), op, "alpha and beta must be (K, M)");
  const int64_t K = alpha.size(0), M = alpha.size(1);
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == K && slot.scalar_type() == at::kLong, op, "slot must be int64 (K,)");
  TORCH_CHECK(moments.dim() == 3 && moments.size(1) == kMoments && moments.size(2) == M, op,
              "moments must be (U, ", kMoments, ", M): the mixed moments of order 1..", kOrder);
  const int64_t U = moments.size(0);
  TORCH_CHECK(gap_b.dim() == 2 && gap_b.size(0) == U && gap_b.size(1) == M, op, "gap_b must be (U, M)");
  for (const auto* v : {&gap_a, &a_max, &q}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == M, op, "the per-token tensors must be (M,)");
  }
  TORCH_CHECK(unit_range.dim() == 1 && unit_range.size(0) == U, op, "unit_range must be (U,)");
  for (const auto* v : {&alpha, &beta, &moments, &gap_a, &gap_b, &a_max, &q, &unit_range}) {
    TORCH_CHECK(v->scalar_type() == at::kDouble, op, "every tensor but slot must be float64");
    TORCH_CHECK(v->device().is_cpu(), op, "every tensor must be on the CPU");
  }
  TORCH_CHECK(slot.device().is_cpu(), op, "every tensor must be on the CPU");
  auto dce = at::empty({K, M}, alpha.options());
  auto kl = at::empty({K, M}, alpha.options());
  auto undecided = at::empty({K, M}, alpha.options().dtype(at::kBool));
  if (K == 0 || M == 0) return {dce, kl, undecided};
  auto slot_c = slot.contiguous();
  if (K > 0) {
    TORCH_CHECK(slot_c.min().item<int64_t>() >= 0 && slot_c.max().item<int64_t>() < U, op, "slot out of range");
  }
  auto al = alpha.contiguous(), be = beta.contiguous(), mo = moments.contiguous(), gb = gap_b.contiguous();
  auto ga = gap_a.contiguous(), am = a_max.contiguous(), qc = q.contiguous(), rg = unit_range.contiguous();
  Args a;
  a.alpha = al.data_ptr<double>();
  a.beta = be.data_ptr<double>();
  a.slot = slot_c.data_ptr<int64_t>();
  a.mom = mo.data_ptr<double>();
  a.gap_a = ga.data_ptr<double>();
  a.a_max = am.data_ptr<double>();
  a.q = qc.data_ptr<double>();
  a.gap_b = gb.data_ptr<double>();
  a.range = rg.data_ptr<double>();
  a.K = K;
  a.M = M;
  a.round_coef = static_cast<double>(n_vocab + 2 * kOrder + 4) * 4.4e-16 * double(1 << kOrder);  // as Python
  a.certify = certify;
  a.dce = dce.data_ptr<double>();
  a.kl = kl.data_ptr<double>();
  a.undecided = reinterpret_cast<uint8_t*>(undecided.data_ptr<bool>());
  const int64_t grain = std::max<int64_t>(1, 8192 / M);
  at::parallel_for(0, K, grain, [&](int64_t b, int64_t e) { score_rows(a, b, e); });
  return {dce, kl, undecided};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightablate, CPU, m) { m.impl("token_moment_scores", &token_moment_scores_cpu); }

}  // namespace weightablate

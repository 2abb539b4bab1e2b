// Stage 2 on the CPU: rank-one logit corrections -> dCE, dKL and flips, summed per weight in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../numerics.h"
#include "../op_args.h"

#include "clones.h"

namespace weightablate {
namespace {

WA_INLINE double dot(const double* p, const double* v, int64_t C) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += p[c] * v[c];
  return s;
}

// 1/k!, k = 0..14: phi_series' coefficients.
constexpr double kInvFact[15] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
                                 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0,
                                 1.0 / 87178291200.0};

// phi(x) = sum_{k=2..Deg} x^k/k! (Horner), for |x| below the bound its Deg is chosen for.
template <int Deg>
WA_INLINE double phi_poly(double x) {
  double s = kInvFact[Deg];
#pragma GCC unroll 16
  for (int k = Deg - 1; k >= 2; --k) s = s * x + kInvFact[k];
  return s * x * x;
}

// 1/k, k = 0..20 (0 unused): multiplications instead of divisions in the moment path.
constexpr double kInv[21] = {0.0,       1.0,        1.0 / 2,  1.0 / 3,  1.0 / 4,  1.0 / 5,  1.0 / 6,
                             1.0 / 7,   1.0 / 8,    1.0 / 9,  1.0 / 10, 1.0 / 11, 1.0 / 12, 1.0 / 13,
                             1.0 / 14,  1.0 / 15,   1.0 / 16, 1.0 / 17, 1.0 / 18, 1.0 / 19, 1.0 / 20};
WA_INLINE double inv(int64_t k) { return k <= 20 ? kInv[k] : 1.0 / static_cast<double>(k); }

// log1p(s) - s = sum_{k=2..Deg} (-1)^(k+1) s^k / k (Horner, as numerics.h's log1p_minus).
template <int Deg>
WA_INLINE double log1p_minus_poly(double s) {
  double acc = ((Deg % 2 == 0) ? -1.0 : 1.0) * kInv[Deg];
#pragma GCC unroll 20
  for (int k = Deg - 1; k >= 2; --k) acc = acc * s + ((k % 2 == 0) ? -kInv[k] : kInv[k]);
  return acc * s * s;
}

// numerics.h's log1p_minus with the fewest terms whose truncation stays below 1e-18 relative for
// |s| up to the bound (Deg 5: 4.2e-5, 7: 1.26e-3, 9: 6.9e-3, 12: 2.7e-2, 19: 0.1; mpmath).
WA_INLINE double log1p_minus_tiered(double s) {
  const double a = std::fabs(s);
  if (a <= 4e-5) return log1p_minus_poly<5>(s);
  if (a <= 1.2e-3) return log1p_minus_poly<7>(s);
  if (a <= 6.5e-3) return log1p_minus_poly<9>(s);
  if (a <= 2.7e-2) return log1p_minus_poly<12>(s);
  if (a < 0.1) return log1p_minus_poly<19>(s);
  return std::log1p(s) - s;
}

// One pair's exact O(C) result, shifted by m1 (E_p[v] up to rounding): lse = log sum_c p_c e^(d (v_c - m1))
// gives dCE = lse + d (m1 - v_y) exactly; kl = lse - d r with r = sum_c p_c (v_c - m1) = E_p[v] - m1, so
// the rounding of m1 drops out of the KL (it would decide the sign of a tiny KL otherwise).
struct Shifted {
  double lse, kl;
};

// From t = sum_c p_c phi(d w_c) >= 0 and r: S = t + d r = sum_c p_c (e^(d w_c) - 1), lse = log1p(S),
// kl = t + (log1p(S) - S) for small S; log1p(S) - d r for large S, where the first form would cancel.
WA_INLINE Shifted from_sums(double t, double r, double d) {
  const double s = t + d * r;
  if (std::fabs(s) >= 0.1) {
    const double lse = std::log1p(s);
    return {lse, lse - d * r};
  }
  const double lm = log1p_minus_tiered(s);
  return {s + lm, t + lm};
}

// t and r over the classes, every |d (v_c - m1)| <= the bound Deg is chosen for.
template <int Deg>
WA_INLINE Shifted centered_sum_deg(const double* p, const double* v, int64_t C, double d, double m1) {
  double t = 0.0, r = 0.0;
#pragma omp simd reduction(+ : t, r)
  for (int64_t c = 0; c < C; ++c) {
    const double w = v[c] - m1;
    t += p[c] * phi_poly<Deg>(d * w);
    r += p[c] * w;
  }
  return from_sums(t, r, d);
}

// The fewest Horner terms whose truncation stays below 1e-18 relative to phi(x) for |x| <= bound
// (Deg 5: 1.38e-4, 7: 5.2e-3, 9: 3.4e-2, 11: 0.109, 14: 0.25; mpmath); most pairs have x << 0.25.
WA_INLINE Shifted centered_sum_series(const double* p, const double* v, int64_t C, double d, double m1, double x) {
  if (x <= 1e-4) return centered_sum_deg<5>(p, v, C, d, m1);
  if (x <= 5e-3) return centered_sum_deg<7>(p, v, C, d, m1);
  if (x <= 3e-2) return centered_sum_deg<9>(p, v, C, d, m1);
  if (x <= 0.1) return centered_sum_deg<11>(p, v, C, d, m1);
  return centered_sum_deg<14>(p, v, C, d, m1);
}

Shifted centered_sum_general(const double* p, const double* v, int64_t C, double d, double m1) {
  double t = 0.0, r = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double w = v[c] - m1;
    t += p[c] * phi(d * w);
    r += p[c] * w;
  }
  return from_sums(t, r, d);
}

// log_mean_exp for the rare pairs beyond kLogSpaceMin (v null: the logits layer's unit i).
WA_COLD double logits_kl(const double* l, const double* v, int64_t C, double d, double m1, int64_t i, double qi) {
  return log_mean_exp(l, v, C, d, m1, i, qi);
}

// The pair's Shifted without cancellation; range = max(v) - min(v) bounds |d (v_c - m1)| / |d|;
// l = the sample's logits, for the pairs beyond kLogSpaceMin (KL >> the rounding of m1 there).
WA_INLINE Shifted exact_kl(const double* p, const double* l, const double* v, int64_t C, double d, double m1,
                           double range) {
  const double x = std::fabs(d) * range;
  if (x <= kPhiSeriesMax) return centered_sum_series(p, v, C, d, m1, x);
  if (x <= kLogSpaceMin) return centered_sum_general(p, v, C, d, m1);
  const double lse = logits_kl(l, v, C, d, m1, -1, 0.0);
  return {lse, lse};
}

// Moment path (docs/DESIGN.md): S = sum_k d^k/k! m_k; KL = S2 + (log1p(S) - S), S2 = S - d m1.
// Returns false when the truncation tail is not certified below kMomentCertTol x KL.
WA_INLINE bool moment_kl(const double* m, int64_t order, int64_t stride, double d, double vabs, double* kl) {
  const double x = std::fabs(d) * vabs;
  if (x > 0.5) return false;
  const double m1 = m[0], m2 = m[stride];
  const double var = m2 - m1 * m1;
  if (!(var > kMomentMinVarRatio * m2)) return false;
  double tail = 1.6487212707001282;  // e^0.5 >= e^x
  for (int64_t k = 1; k <= order + 1; ++k) tail *= x * inv(k);
  if (!(tail <= kMomentCertTol * 0.5 * d * d * var)) return false;
  double s2 = 0.0, dk = d * d * 0.5;
  for (int64_t k = 2; k <= order; ++k) {
    s2 += dk * m[(k - 1) * stride];
    dk *= d * inv(k + 1);
  }
  *kl = s2 + log1p_minus_tiered(d * m1 + s2);
  return true;
}

// Large C: kGroup samples of one weight share each pass over v. A single pair's pass is latency-bound
// (one FMA accumulator chain); kGroup independent chains and accumulators overlap instead. Each
// sample keeps the same vectorised reduction as dot / centered_sum_deg, so its sums are unchanged.
constexpr int kGroup = 4;

WA_INLINE void dot_group(const double* const* p, const double* v, int64_t C, double* m1) {
  const double *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < C; ++c) {
    const double vc = v[c];
    s0 += p0[c] * vc;
    s1 += p1[c] * vc;
    s2 += p2[c] * vc;
    s3 += p3[c] * vc;
  }
  m1[0] = s0, m1[1] = s1, m1[2] = s2, m1[3] = s3;
}

// centered_sum_deg<Deg> for kGroup samples at once; with Next, also dot_group of the next group's
// rows pn into m1n: their first read (from L3) overlaps this pass's arithmetic.
template <int Deg, bool Next>
WA_INLINE void centered_sum_group(const double* const* p, const double* v, int64_t C, const double* d,
                                  const double* m1, Shifted* out, const double* const* pn, double* m1n) {
  const double *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
  const double *n0 = pn[0], *n1 = pn[1], *n2 = pn[2], *n3 = pn[3];
  const double d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  const double a0 = m1[0], a1 = m1[1], a2 = m1[2], a3 = m1[3];
  double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0, r0 = 0.0, r1 = 0.0, r2 = 0.0, r3 = 0.0;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : t0, t1, t2, t3, r0, r1, r2, r3, s0, s1, s2, s3)
  for (int64_t c = 0; c < C; ++c) {
    const double vc = v[c];
    const double w0 = vc - a0, w1 = vc - a1, w2 = vc - a2, w3 = vc - a3;
    t0 += p0[c] * phi_poly<Deg>(d0 * w0);
    t1 += p1[c] * phi_poly<Deg>(d1 * w1);
    t2 += p2[c] * phi_poly<Deg>(d2 * w2);
    t3 += p3[c] * phi_poly<Deg>(d3 * w3);
    r0 += p0[c] * w0;
    r1 += p1[c] * w1;
    r2 += p2[c] * w2;
    r3 += p3[c] * w3;
    if constexpr (Next) {
      s0 += n0[c] * vc;
      s1 += n1[c] * vc;
      s2 += n2[c] * vc;
      s3 += n3[c] * vc;
    }
  }
  out[0] = from_sums(t0, r0, d0), out[1] = from_sums(t1, r1, d1);
  out[2] = from_sums(t2, r2, d2), out[3] = from_sums(t3, r3, d3);
  if constexpr (Next) m1n[0] = s0, m1n[1] = s1, m1n[2] = s2, m1n[3] = s3;
}

// exact_kl's choice for x = |d| range: 0..4 = centered_sum_series' Horner degrees, 5 = the rest.
constexpr int kTiers = 6;
WA_INLINE int series_tier(double x) {
  return x <= 1e-4 ? 0 : x <= 5e-3 ? 1 : x <= 3e-2 ? 2 : x <= 0.1 ? 3 : x <= kPhiSeriesMax ? 4 : 5;
}

template <int Deg>
WA_INLINE void group_deg(const double* const* p, const double* v, int64_t C, const double* d, const double* m1,
                         Shifted* out, const double* const* pn, double* m1n) {
  if (pn[0]) centered_sum_group<Deg, true>(p, v, C, d, m1, out, pn, m1n);
  else centered_sum_group<Deg, false>(p, v, C, d, m1, out, pn, m1n);
}

WA_INLINE void group_tier(int tier, const double* const* p, const double* v, int64_t C, const double* d,
                          const double* m1, Shifted* out, const double* const* pn, double* m1n) {
  switch (tier) {
    case 0: return group_deg<5>(p, v, C, d, m1, out, pn, m1n);
    case 1: return group_deg<7>(p, v, C, d, m1, out, pn, m1n);
    case 2: return group_deg<9>(p, v, C, d, m1, out, pn, m1n);
    case 3: return group_deg<11>(p, v, C, d, m1, out, pn, m1n);
    default: return group_deg<14>(p, v, C, d, m1, out, pn, m1n);
  }
}

WA_INLINE int64_t argmax_shifted(const double* l, const double* v, int64_t C, double d, int64_t unit) {
  int64_t best = 0;
  double best_val = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    const double val = v ? l[c] + d * v[c] : (c == unit ? l[c] + d : l[c]);
    if (val > best_val) best_val = val, best = c;  // first maximum, as torch.argmax
  }
  return best;
}

struct SampleStats {
  std::vector<int64_t> top;      // base prediction
  std::vector<double> margin;    // top-1 minus top-2 logit
  std::vector<double> q_top;     // sum of p over the classes other than top (1 - p_top, accurately)
};

SampleStats sample_stats(const double* l, const double* p, int64_t N, int64_t C) {
  SampleStats s{std::vector<int64_t>(N), std::vector<double>(N), std::vector<double>(N)};
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const double* ln = l + n * C;
      const int64_t top = argmax_shifted(ln, nullptr, C, 0.0, -1);
      double second = -std::numeric_limits<double>::infinity(), q = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        if (c == top) continue;
        second = ln[c] > second ? ln[c] : second;  // std::fmax without its libm call (NaN skipped too)
        q += p[n * C + c];
      }
      s.top[n] = top;
      s.margin[n] = ln[top] - second;  // +inf when C == 1: nothing can flip
      s.q_top[n] = q;
    }
  });
  return s;
}

// Small C (digits: 10 classes): an O(C) loop across classes is too short to vectorise, so the
// exact path runs across kLanes samples of one weight instead, reading probs transposed (C, N).
constexpr int64_t kSmallC = 32;
constexpr int kLanes = 8;

// t[j] = sum_c p_c phi(d_j (v_c - m1_j)), r[j] = sum_c p_c (v_c - m1_j) for the lanes' samples;
// pb holds their probabilities, gathered once per block (C x kLanes, contiguous).
template <int Deg>
WA_INLINE void lanes_series(const double* pb, const double* v, int64_t C, const double* dd, const double* m1,
                            double* t, double* r) {
  for (int j = 0; j < kLanes; ++j) t[j] = r[j] = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double vc = v[c];
    const double* pc = pb + c * kLanes;
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const double p = pc[j], w = vc - m1[j];
      t[j] += p * phi_poly<Deg>(dd[j] * w);
      r[j] += p * w;
    }
  }
}

// Everything the per-weight loop reads and writes (raw pointers into contiguous tensors).
struct ScoreArgs {
  const double *d, *probs, *probs_t, *logits, *head, *moments, *range, *vabs;
  const int64_t *unit, *labels, *slot;
  const SampleStats* st;
  int64_t N, C, order, M;
  bool want_flips;
  double *loss, *kl, *cls;
  int64_t *flips, *err, *corr;
  bool* nonzero;
};

// Weights [begin, end): one clone per instruction set; the helpers above are inlined into it.
WA_CLONES void score_rows(const ScoreArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.N, C = a.C;
  std::vector<int64_t> nz(N);  // the samples with d != 0 of one weight, found without a branch
  std::vector<double> dce_buf(N), kl_buf(N);
  std::vector<int64_t> tier[kTiers];
  for (auto& b : tier) b.reserve(N);
  std::vector<std::pair<int, int64_t>> groups;
  groups.reserve(N / kGroup + 1);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t i = a.unit[k];
    const double* v = a.head ? a.head + i * C : nullptr;
    const double range = a.range[i], vabs = a.vabs[i];
    const int64_t slot = a.slot ? a.slot[i] : -1;
    const double* dk = a.d + k * N;
    int64_t cnt = 0;
    for (int64_t n = 0; n < N; ++n) {
      nz[cnt] = n;
      cnt += dk[n] != 0.0;
    }
    double sum_loss = 0.0, sum_kl = 0.0;
    int64_t n_flips = 0, n_err = 0, n_corr = 0;
    // one sample's dCE and KL are done: add them up, count a flip
    auto finish = [&](int64_t n, double dd, double dce, double kl) {
      const int64_t y = a.labels[n];
      sum_loss += dce;
      sum_kl += kl;
      if (a.cls) a.cls[k * C + y] += dce;
      if (a.want_flips && std::fabs(dd) * range >= a.st->margin[n]) {
        const int64_t pred = a.st->top[n], now = argmax_shifted(a.logits + n * C, v, C, dd, i);
        if (now != pred) {
          ++n_flips;
          n_err += (pred == y);
          n_corr += (now == y);
        }
      }
    };
    int64_t first = 0;  // samples nz[first..cnt) take the per-sample loop below
    if (v && a.probs_t && slot < 0) {
      first = cnt;
      double pb[kSmallC * kLanes];
      for (int64_t b = 0; b < cnt; b += kLanes) {
        const int nl = static_cast<int>(std::min<int64_t>(kLanes, cnt - b));
        int64_t idx[kLanes];
        double dd[kLanes], m1[kLanes], t[kLanes], r[kLanes], xmax = 0.0;
        for (int j = 0; j < kLanes; ++j) {
          idx[j] = nz[b + (j < nl ? j : 0)];  // idle lanes repeat a sample with d = 0
          dd[j] = j < nl ? dk[idx[j]] : 0.0;
          m1[j] = 0.0;
        }
#pragma omp simd reduction(max : xmax)
        for (int j = 0; j < kLanes; ++j) {
          const double x = std::fabs(dd[j]) * range;
          xmax = x > xmax ? x : xmax;  // as std::fmax (NaN skipped) without its libm call
        }
        // one gather of the block's probabilities (strided reads of probs_t) serves m1 and the series
        for (int64_t c = 0; c < C; ++c) {
          const double vc = v[c];
          const double* pc = a.probs_t + c * N;
          double* bc = pb + c * kLanes;
#pragma omp simd
          for (int j = 0; j < kLanes; ++j) {
            const double p = pc[idx[j]];
            bc[j] = p;
            m1[j] += p * vc;
          }
        }
        // one Horner degree for the lanes, from their largest bound (as centered_sum_series)
        if (xmax <= 1e-4) lanes_series<5>(pb, v, C, dd, m1, t, r);
        else if (xmax <= 5e-3) lanes_series<7>(pb, v, C, dd, m1, t, r);
        else if (xmax <= 3e-2) lanes_series<9>(pb, v, C, dd, m1, t, r);
        else if (xmax <= 0.1) lanes_series<11>(pb, v, C, dd, m1, t, r);
        else if (xmax <= kPhiSeriesMax) lanes_series<14>(pb, v, C, dd, m1, t, r);
        for (int j = 0; j < nl; ++j) {
          const int64_t n = idx[j];
          const Shifted e = xmax <= kPhiSeriesMax ? from_sums(t[j], r[j], dd[j])
                                                  : exact_kl(a.probs + n * C, a.logits + n * C, v, C, dd[j],
                                                             m1[j], range);
          finish(n, dd[j], e.lse + dd[j] * (m1[j] - v[a.labels[n]]), e.kl);
        }
      }
    }
    // nz[first..cnt): moment path or logits layer at once; exact O(C) pairs are sorted by Horner
    // degree and run kGroup at a time; then all are finished in sample order (same sums as before).
    for (auto& b : tier) b.clear();
    for (int64_t j = first; j < cnt; ++j) {
      const int64_t n = nz[j];
      const double dd = dk[n];
      const int64_t y = a.labels[n];
      const double* p = a.probs + n * C;
      if (v) {
        if (slot >= 0 && moment_kl(a.moments + slot * N + n, a.order, a.M * N, dd, vabs, &kl_buf[j])) {
          dce_buf[j] = kl_buf[j] + dd * (a.moments[slot * N + n] - v[y]);  // CE change = KL + d (E_p[v] - v_y)
        } else {
          tier[series_tier(std::fabs(dd) * range)].push_back(j);
        }
      } else {
        const double pi = p[i];
        const double qi = (i == a.st->top[n] && pi > 0.5) ? a.st->q_top[n] : 1.0 - pi;
        kl_buf[j] = unit_needs_logits(dd, pi, qi) ? logits_kl(a.logits + n * C, nullptr, C, dd, pi, i, qi)
                                                  : std::log1p(pi * phi(dd * qi) + qi * phi(-dd * pi));
        dce_buf[j] = kl_buf[j] + dd * (i == y ? -qi : pi);
      }
    }
    groups.clear();  // (tier, first position in tier[tier]) of each full group
    for (int tr = 0; tr < kTiers - 1; ++tr)
      for (int64_t g = 0; g + kGroup <= static_cast<int64_t>(tier[tr].size()); g += kGroup) groups.push_back({tr, g});
    const double* pg[kGroup] = {};
    const double* pn[kGroup] = {};
    double m1[kGroup] = {}, m1n[kGroup] = {};  // set before use; {} only quiets -Wmaybe-uninitialized
    auto rows = [&](size_t gi, const double** out) {
      for (int q = 0; q < kGroup; ++q) out[q] = a.probs + nz[tier[groups[gi].first][groups[gi].second + q]] * C;
    };
    if (!groups.empty()) rows(0, pg), dot_group(pg, v, C, m1);
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const int tr = groups[gi].first;
      const int64_t* js = tier[tr].data() + groups[gi].second;
      double dg[kGroup];
      Shifted e[kGroup];
      for (int q = 0; q < kGroup; ++q) dg[q] = dk[nz[js[q]]];
      if (gi + 1 < groups.size()) rows(gi + 1, pn);
      else pn[0] = nullptr;
      group_tier(tr, pg, v, C, dg, m1, e, pn, m1n);
      for (int q = 0; q < kGroup; ++q) {
        kl_buf[js[q]] = e[q].kl;
        dce_buf[js[q]] = e[q].lse + dg[q] * (m1[q] - v[a.labels[nz[js[q]]]]);
      }
      for (int q = 0; q < kGroup; ++q) pg[q] = pn[q], m1[q] = m1n[q];
    }
    for (int tr = 0; tr < kTiers; ++tr) {  // the rest one by one
      const std::vector<int64_t>& js = tier[tr];
      const int64_t full = tr < kTiers - 1 ? static_cast<int64_t>(js.size()) / kGroup * kGroup : 0;
      for (int64_t g = full; g < static_cast<int64_t>(js.size()); ++g) {
        const int64_t j = js[g], n = nz[j];
        const double* p = a.probs + n * C;
        const double m1 = dot(p, v, C);
        const Shifted e = exact_kl(p, a.logits + n * C, v, C, dk[n], m1, range);
        kl_buf[j] = e.kl;
        dce_buf[j] = e.lse + dk[n] * (m1 - v[a.labels[n]]);
      }
    }
    for (int64_t j = first; j < cnt; ++j) finish(nz[j], dk[nz[j]], dce_buf[j], kl_buf[j]);
    a.loss[k] = sum_loss;
    a.kl[k] = sum_kl;
    a.flips[k] = n_flips;
    a.err[k] = n_err;
    a.corr[k] = n_corr;
    a.nonzero[k] = cnt > 0;
  }
}

// Per unit: range = max(v) - min(v) (bounds |d (v_c - m1)| / |d|) and max |v_c|; v = e_i for a
// logits layer. Once per call instead of once per weight.
void unit_bounds(const double* head, int64_t U, int64_t C, double* range, double* vabs) {
  at::parallel_for(0, U, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double vmin = 0.0, vmax = 1.0;
      if (head) {
        const double* v = head + i * C;
        // simd min/max instead of std::fmin/fmax (a libm call per element: ~20% of the call for
        // AlexNet's 4096 x 1000 head); NaNs are skipped as by fmin/fmax (NaN if all are)
        vmin = std::numeric_limits<double>::infinity(), vmax = -vmin;
#pragma omp simd reduction(min : vmin) reduction(max : vmax)
        for (int64_t c = 0; c < C; ++c) {
          vmin = v[c] < vmin ? v[c] : vmin;
          vmax = v[c] > vmax ? v[c] : vmax;
        }
        if (vmin > vmax) vmin = vmax = std::numeric_limits<double>::quiet_NaN();
      }
      range[i] = C > 1 ? vmax - vmin : 0.0;
      vabs[i] = std::fmax(std::fabs(vmin), std::fabs(vmax));
    }
  });
}

ScoreOutputs score_deltas_cpu(
    const at::Tensor& d, const at::Tensor& unit, const std::optional<at::Tensor>& head, const at::Tensor& probs,
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& moments,
    const std::optional<at::Tensor>& moment_slot, bool want_flips, bool by_class) {
  const ScoreSizes sizes = check_score_deltas_args(d, unit, head, probs, logits, labels, moments, moment_slot);
  const int64_t K = sizes.K, N = sizes.N, C = sizes.C, U = sizes.U, order = sizes.order, M = sizes.M;
  const bool has_head = sizes.has_head, has_moments = sizes.has_moments;
  ScoreOutputs out = zero_score_outputs(d, C, by_class);
  if (K == 0 || N == 0) return out;
  auto& [dloss, dkl, flips, new_err, new_corr, nonzero, class_loss] = out;

  auto d_c = d.contiguous(), unit_c = unit.contiguous(), p_c = probs.contiguous(), l_c = logits.contiguous(),
       y_c = labels.contiguous();
  TORCH_CHECK(unit_c.min().item<int64_t>() >= 0 && unit_c.max().item<int64_t>() < U, "score_deltas: unit out of range");
  TORCH_CHECK(y_c.min().item<int64_t>() >= 0 && y_c.max().item<int64_t>() < C, "score_deltas: labels out of range");
  at::Tensor head_c, mom_c, slot_c;
  if (has_head) head_c = head->contiguous();
  if (has_moments) {
    mom_c = moments->contiguous();
    slot_c = moment_slot->contiguous();
    TORCH_CHECK(slot_c.max().item<int64_t>() < M, "score_deltas: moment_slot out of range");
  }
  const double* dp = d_c.data_ptr<double>();
  const int64_t* up = unit_c.data_ptr<int64_t>();
  const double* pp = p_c.data_ptr<double>();
  const double* lp = l_c.data_ptr<double>();
  const int64_t* yp = y_c.data_ptr<int64_t>();
  const double* hp = has_head ? head_c.data_ptr<double>() : nullptr;
  const double* mp = has_moments ? mom_c.data_ptr<double>() : nullptr;
  const int64_t* sp = has_moments ? slot_c.data_ptr<int64_t>() : nullptr;
  const SampleStats st = sample_stats(lp, pp, N, C);

  std::vector<double> range(U), vabs(U);
  unit_bounds(hp, U, C, range.data(), vabs.data());
  at::Tensor probs_t;
  if (has_head && C <= kSmallC) probs_t = p_c.t().contiguous();
  ScoreArgs args{dp, pp, probs_t.defined() ? probs_t.data_ptr<double>() : nullptr, lp, hp, mp, range.data(), vabs.data(), up, yp, sp, &st, N, C, order, M, want_flips,
                 dloss.data_ptr<double>(), dkl.data_ptr<double>(), by_class ? class_loss.data_ptr<double>() : nullptr,
                 flips.data_ptr<int64_t>(), new_err.data_ptr<int64_t>(), new_corr.data_ptr<int64_t>(),
                 nonzero.data_ptr<bool>()};
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) { score_rows(args, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightablate, CPU, m) { m.impl("score_deltas", &score_deltas_cpu); }

}  // namespace weightablate

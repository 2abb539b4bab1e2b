// Cancellation-free scalar helpers shared by the CPU and CUDA kernels (docs/DESIGN.md).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define WA_HD __host__ __device__ __forceinline__
#else
#define WA_HD inline
#endif

namespace weightablate {

// Relative tolerance a moment-path pair must certify (truncation tail <= this x its KL).
constexpr double kMomentCertTol = 1e-10;
// A moment-path pair also needs var >= this x m2, or m2 - m1^2 loses too many digits.
constexpr double kMomentMinVarRatio = 1e-6;
// |x| below which phi() uses its Taylor series.
constexpr double kPhiSeriesMax = 0.25;
// A pair whose logit shifts d (v_c - E_p v) span more than this is scored from the logits
// (log_mean_exp): beyond it p_c e^(d w_c) can overflow, or carry a class whose p_c underflowed to 0
// (below it such a class adds less than e^-678 to the sums: nothing).
constexpr double kLogSpaceMin = 30.0;
// A logits-layer pair keeps its two-term closed form beyond kLogSpaceMin while its shift stays below
// kExpMax (no overflow) and p_i, 1 - p_i are both above kTinyP (far from float64's subnormals).
constexpr double kExpMax = 700.0;
constexpr double kTinyP = 1e-290;

// Whether a logits-layer pair (shift d on unit i, p_i and q_i = 1 - p_i) needs log_mean_exp.
WA_HD bool unit_needs_logits(double d, double p_i, double q_i) {
  const double a = fabs(d);
  return a > kLogSpaceMin && (a > kExpMax || fmin(p_i, q_i) < kTinyP);
}

// phi(x) = e^x - 1 - x, accurate to a few ulps relative to phi(x) itself.
WA_HD double phi_series(double x) {
  // Horner over x^k/k!, k = 2..14: truncation < 1e-18 relative for |x| <= 0.25.
  double s = 1.0 / 87178291200.0;  // 1/14!
  s = s * x + 1.0 / 6227020800.0;
  s = s * x + 1.0 / 479001600.0;
  s = s * x + 1.0 / 39916800.0;
  s = s * x + 1.0 / 3628800.0;
  s = s * x + 1.0 / 362880.0;
  s = s * x + 1.0 / 40320.0;
  s = s * x + 1.0 / 5040.0;
  s = s * x + 1.0 / 720.0;
  s = s * x + 1.0 / 120.0;
  s = s * x + 1.0 / 24.0;
  s = s * x + 1.0 / 6.0;
  s = s * x + 0.5;
  return s * x * x;
}

WA_HD double phi(double x) {
  return fabs(x) <= kPhiSeriesMax ? phi_series(x) : expm1(x) - x;
}

// log1p(s) - s, accurate relative to itself.
WA_HD double log1p_minus(double s) {
  if (fabs(s) >= 0.1) return log1p(s) - s;
  // -s^2/2 + s^3/3 - ... ; 18 terms: truncation < 1e-17 relative for |s| < 0.1.
  double acc = 0.0;
  for (int k = 19; k >= 2; --k) acc = acc * s + ((k % 2 == 0) ? -1.0 : 1.0) / k;
  return acc * s * s;
}

// log sum_c p_c e^(d w_c), p = softmax(l), w_c = v_c - m1; without v (a logits-layer target, v = e_unit)
// w_c = q_unit at unit and -m1 elsewhere (q_unit = 1 - p_unit, passed accurately). Computed from the
// logits with the maxima shifted out: exact when some p_c underflows in float64 (logit gaps above
// ~745, log p_c = -inf would drop the class, which may be the new argmax), and free of any common
// offset of the logits. O(C); for the rare pairs beyond kLogSpaceMin.
WA_HD double log_mean_exp(const double* l, const double* v, int64_t C, double d, double m1, int64_t unit,
                          double q_unit) {
  double lmax = -INFINITY, umax = -INFINITY;
  for (int64_t c = 0; c < C; ++c) lmax = fmax(lmax, l[c]);
  for (int64_t c = 0; c < C; ++c) {
    const double w = v ? v[c] - m1 : (c == unit ? q_unit : -m1);
    umax = fmax(umax, l[c] - lmax + d * w);
  }
  double z = 0.0, s = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double w = v ? v[c] - m1 : (c == unit ? q_unit : -m1);
    z += exp(l[c] - lmax);
    s += exp(l[c] - lmax + d * w - umax);
  }
  return umax + log(s) - log(z);
}

// The leaky-ReLU family with slope `slope` for u <= 0 (ReLU: 0, identity: 1).
WA_HD double leaky(double u, double slope) { return u > 0 ? u : slope * u; }

// s(u + du) - s(u) without cancellation: exact when both sides are on one piece.
WA_HD double leaky_delta(double u, double du, double slope) {
  const double up = u + du;
  if (u > 0 && up > 0) return du;
  if (u <= 0 && up <= 0) return slope * du;
  return leaky(up, slope) - leaky(u, slope);  // mixed: the two terms have the same sign
}

}  // namespace weightablate

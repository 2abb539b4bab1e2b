// Cancellation-free scalar helpers shared by the CPU and CUDA kernels (docs/DESIGN.md).
#pragma once
#include <cmath>

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

// The fused whole-layer op on the CPU: d, the moment series, flips and the per-weight float64 sums
// in one pass, d never leaving registers (pair_deltas + score_deltas without the K x N round trip).
//
// Weights are taken in runs of one unit (consecutive equal rows), samples in tiles of kTile. Per
// (run, tile) the unit's per-sample values are laid out once (u = gain z + shift, the moments
// divided by k!, the certificate's scale); then each weight of the run is one vectorised loop over
// the tile, lanes across samples. Pairs the loop cannot finish (series not certified, or a flip
// candidate) are marked and resolved one by one after it: the scalar moment path, else the exact
// O(C) loop, which is counted (exact_pairs). Runs that are whole rows (kRowMin+ consecutive inputs)
// take the row path instead (below): lanes across the run's weights, a few samples per pass.
#pragma GCC optimize("fp-contract=off")  // d bit-identical to pair_deltas; the series' FMAs are explicit
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../fused_args.h"
#include "../numerics.h"
#include "clones.h"

namespace weightablate {
namespace {

constexpr int64_t kTile = 256;   // samples per tile: the unit's tile values stay in L1
constexpr int kMaxOrder = 8;     // moments up to this order
constexpr double kLogSeriesMax = 6.5e-3;  // |S| up to which the loop's log1p series (degree 9) is exact
constexpr double kMinQ = 1e-200;  // below this (but > 0) q's moments may be subnormal: exact loop
// Flip test: the kNear classes closest to the top logit are checked one by one (d (v_c - v_top) vs
// their gap), the rest at once (d times the largest v_c - v_top on d's side vs the next gap). A
// candidate is resolved by argmax; kFlipSlack (relative to the logits and |d v|) keeps the test
// conservative under rounding. The plain |d| range >= margin test marks ~100x more pairs when C is large.
constexpr int kNear = 4;
constexpr int kNearRow = 16;  // the row path's per-sample thresholds take more classes one by one (free there)
constexpr int kNearMax = kNearRow;
constexpr double kFlipSlack = 1e-12;

constexpr double kInvFact[kMaxOrder + 2] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720,
                                            1.0 / 5040, 1.0 / 40320, 1.0 / 362880};

// log1p(s) - s = sum_{k=2..9} (-1)^(k+1) s^k / k, |s| <= kLogSeriesMax (truncation < 1e-18 relative).
WA_INLINE double log1p_minus_9(double s) {
  double acc = 1.0 / 9;
  acc = std::fma(acc, s, -1.0 / 8);
  acc = std::fma(acc, s, 1.0 / 7);
  acc = std::fma(acc, s, -1.0 / 6);
  acc = std::fma(acc, s, 1.0 / 5);
  acc = std::fma(acc, s, -1.0 / 4);
  acc = std::fma(acc, s, 1.0 / 3);
  acc = std::fma(acc, s, -1.0 / 2);
  return acc * s * s;
}

// pair_deltas' d (same operations, same values): s(u - g delta) - s(u), delta = w a. Where
// delta = 0 this is +-0 (du = -g delta is, and u, u + du are on one piece) where pair_deltas
// writes +0: the same for every use here. (Its select on delta == 0 keeps GCC from vectorising
// the loop that calls this.)
WA_INLINE double leaky_d(double wk, double a, double u, double g, double sl) {
  const double delta = wk * a;
  const double du = -g * delta, up = u + du;
  const double su = sl * u, sup = sl * up, sdu = sl * du;
  const bool pos = u > 0, pos_up = up > 0;
  const double mixed = (pos_up ? up : sup) - (pos ? u : su);
  return pos == pos_up ? (pos ? du : sdu) : mixed;
}

struct SampleStats {
  std::vector<int64_t> top;    // base prediction (first maximum, as torch.argmax)
  std::vector<double> margin;  // top-1 minus top-2 logit (+inf for one class), less the slack
  std::vector<double> q;       // sum of p over the classes other than top
  std::vector<int64_t> near;   // (N, kNearMax): the next classes by logit (-1: none)
  std::vector<double> gap;     // (N, kNearMax + 1): l_top - l_c of those, then of the next class, less the slack
};

SampleStats sample_stats(const double* l, const double* p, int64_t N, int64_t C) {
  const double inf = std::numeric_limits<double>::infinity();
  SampleStats s{std::vector<int64_t>(N), std::vector<double>(N), std::vector<double>(N),
                std::vector<int64_t>(N * kNearMax, -1), std::vector<double>(N * (kNearMax + 1), inf)};
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const double* ln = l + n * C;
      int64_t top = 0;
      for (int64_t c = 1; c < C; ++c) top = ln[c] > ln[top] ? c : top;
      double q = 0.0, lmax = std::fabs(ln[top]);
      // the kNearMax + 1 largest logits after the top, by insertion (ties: any order is conservative)
      int64_t best[kNearMax + 1];
      double val[kNearMax + 1];
      for (int j = 0; j <= kNearMax; ++j) best[j] = -1, val[j] = -inf;
      for (int64_t c = 0; c < C; ++c) {
        if (c == top) continue;
        q += p[n * C + c];
        lmax = std::fmax(lmax, std::fabs(ln[c]));
        if (!(ln[c] > val[kNearMax]) && best[kNearMax] >= 0) continue;
        int j = kNearMax;
        while (j > 0 && (ln[c] > val[j - 1] || best[j - 1] < 0)) best[j] = best[j - 1], val[j] = val[j - 1], --j;
        best[j] = c, val[j] = ln[c];
      }
      const double slack = kFlipSlack * (lmax + 1.0);
      for (int j = 0; j <= kNearMax; ++j) {
        if (j < kNearMax) s.near[n * kNearMax + j] = best[j];
        s.gap[n * (kNearMax + 1) + j] = best[j] >= 0 ? ln[top] - val[j] - slack : inf;
      }
      s.top[n] = top, s.margin[n] = s.gap[n * (kNearMax + 1)], s.q[n] = q;
    }
  });
  return s;
}

// The pair's exact O(C) result (score_deltas' exact_kl, shifted by m1 = E_p v): {dCE, KL}.
struct Pair {
  double dce, kl;
};

WA_INLINE Pair from_sums(double t, double r, double d, double gap) {
  // t = sum p phi(d w), r = sum p w, w = v - m1: S = t + d r; KL = log1p(S) - d r; dCE = lse + d gap
  const double s = t + d * r;
  double lse, kl;
  if (std::fabs(s) >= 0.1) {
    lse = std::log1p(s), kl = lse - d * r;
  } else {
    const double lm = log1p_minus(s);
    lse = s + lm, kl = t + lm;
  }
  return {lse + d * gap, kl};
}

Pair exact_pair(const double* p, const double* l, const double* v, int64_t C, int64_t y, double d, double range) {
  double m1 = 0.0;
  for (int64_t c = 0; c < C; ++c) m1 += p[c] * v[c];
  const double gap = m1 - v[y];
  if (std::fabs(d) * range <= 30.0) {
    double t = 0.0, r = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double w = v[c] - m1;
      t += p[c] * phi(d * w);
      r += p[c] * w;
    }
    return from_sums(t, r, d, gap);
  }
  // huge d: from the logits (numerics.h log_mean_exp), where a class whose p underflowed still counts
  const double lse = log_mean_exp(l, v, C, d, m1, -1, 0.0);
  return {lse + d * gap, lse};
}

int64_t argmax_shifted(const double* l, const double* v, int64_t C, double d, int64_t unit) {
  int64_t best = 0;
  double best_val = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    const double val = v ? l[c] + d * v[c] : (c == unit ? l[c] + d : l[c]);
    if (val > best_val) best_val = val, best = c;
  }
  return best;
}

struct FusedArgs {
  const void *a_t, *z_t;  // scalar_t
  const int64_t *rows, *cols, *labels, *slot, *run_begin;
  const void* w;
  const double *gain, *shift, *slope, *head, *probs, *logits, *moments, *gap, *range, *vmin, *vmax;
  const SampleStats* st;
  int64_t N, C, M, order;
  bool want_flips;
  const uint8_t* row_path;  // per run: taken by the row path (else the tile path)
  const void* a_nj;         // (N, J) scalar_t: the inputs sample-major, for the row path
  const double* amax;       // (N,): max_j |a[n, j]|
  int64_t J;
  double *loss, *kl, *cls;
  int64_t *flips, *err, *corr, *exact, *active;
  bool* nonzero;
};

// Per-(run, tile) values of one unit, and the per-weight results of the tile's marked pairs.
struct Tile {
  double u[kTile], ck[kMaxOrder][kTile], gap[kTile], cap[kTile], tc[kTile];
  double dv[kNear][kTile], gn[kNear][kTile], hi[kTile], lo[kTile], rest[kTile];  // the flip test
  double d[kTile], dce[kTile];
  int64_t code[kTile];  // bit 0: KL not done by the loop; bit 1: flip candidate (64-bit: one lane width)
};

// Sums of one weight over one tile's samples [n0, n0 + nt).
struct Sums {
  double loss = 0.0, kl = 0.0;
  int64_t flips = 0, err = 0, corr = 0, exact = 0, active = 0;
};

// The moment path's certificate for one (unit, sample): KL's truncation error <= tc |d|^(D+1), and
// the pair is certified when that is <= cap d^2 (cap = kMomentCertTol x var / 2 ~ that share of the KL;
// cap < 0: var fails its gate, nothing is certified). tc is the smaller of two bounds on the
// remainder sum_c p_c R(y_c), y_c = d (v_c - v_top), |y_c| <= x = |d| range <= 1/2, with
// |R(y)| <= e^x |y|^(D+1) / (D+1)! and the log's 1/(1 + S) <= e^(1/2):
//   q range^(D+1) e^1.5 / (D+1)!                    (|y_c| <= x for every class)
//   range^(D+1-E) mu_E e^1.5 / (D+1)!, E = D or D-1 even (|y_c|^(D+1) <= |y_c|^E x^(D+1-E))
// mu_E = sum_c p_c (v_c - v_top)^E >= 0 taken with its rounding bound added: the second is often
// ~100x smaller (the widest class gap is rare), which certifies pairs with x up to ~3x larger.
struct Cert {
  double tc, cap;
};

WA_INLINE Cert certificate(const double* moments, int64_t M, int64_t N, int64_t slot, int64_t n, int D, double q,
                           double rg, int64_t C) {
  const double m1 = moments[slot * N + n], m2 = moments[(M + slot) * N + n];
  const double var = m2 - m1 * m1;
  const bool gate = q == 0.0 || (q > kMinQ && var >= kMomentMinVarRatio * 4.0 * q * rg * rg);
  const int E = D % 2 == 0 ? D : D - 1;
  const double muE = moments[((E - 1) * M + slot) * N + n];
  double rE = 1.0;
  for (int k = 0; k < E; ++k) rE *= rg;
  // top_moments' rounding: a (C + 2E + 4)-term sum of terms within 2^E q range^E, unit roundoff 1.1e-16
  const double mu_bound = std::fmax(muE, 0.0) + static_cast<double>(C + 2 * E + 4) * 4.4e-16 * (1 << E) * q * rE;
  double rest = 1.0;
  for (int k = E; k <= D; ++k) rest *= rg;  // range^(D+1-E)
  const double coef = std::exp(1.5) * kInvFact[D + 1];
  const double tc = std::fmin(q * rE * rest, mu_bound * rest) * coef;
  return {tc, gate ? kMomentCertTol * 0.5 * var : -1.0};
}

// The flip test's per-sample values for unit i (v = e_i without a head: the margin test).
WA_INLINE void lay_out_flips(const FusedArgs& a, Tile& t, int64_t i, int64_t n0, int64_t nt) {
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t C = a.C;
  const double* v = a.head ? a.head + i * C : nullptr;
  for (int64_t n = 0; n < nt; ++n) {
    const int64_t sample = n0 + n;
    if (!a.want_flips) {
      for (int j = 0; j < kNear; ++j) t.dv[j][n] = 0.0, t.gn[j][n] = inf;
      t.hi[n] = t.lo[n] = 0.0, t.rest[n] = inf;
      continue;
    }
    if (!v) {
      for (int j = 0; j < kNear; ++j) t.dv[j][n] = 0.0, t.gn[j][n] = inf;
      t.hi[n] = t.lo[n] = a.range[i], t.rest[n] = a.st->margin[sample];
      continue;
    }
    const double vt = v[a.st->top[sample]];
    for (int j = 0; j < kNear; ++j) {
      const int64_t c = a.st->near[sample * kNearMax + j];
      t.dv[j][n] = c >= 0 ? v[c] - vt : 0.0;
      t.gn[j][n] = a.st->gap[sample * (kNearMax + 1) + j];
    }
    t.hi[n] = a.vmax[i] - vt, t.lo[n] = vt - a.vmin[i], t.rest[n] = a.st->gap[sample * (kNearMax + 1) + kNear];
  }
}

// The unit's tile values; slot < 0 (no moments): every pair marked for the exact loop.
WA_INLINE void lay_out_tile(const FusedArgs& a, Tile& t, const double* z_row_d, const float* z_row_f, int64_t i,
                            int64_t n0, int64_t nt, int D) {
  const int64_t N = a.N;
  const double g = a.gain[i], s = a.shift[i], rg = a.range[i];
  const int64_t slot = a.slot ? a.slot[i] : -1;
  for (int64_t n = 0; n < nt; ++n) {
    const double z = z_row_d ? z_row_d[n0 + n] : static_cast<double>(z_row_f[n0 + n]);
    t.u[n] = g * z + s;
  }
  lay_out_flips(a, t, i, n0, nt);
  if (slot < 0 || !a.head) {
    for (int k = 0; k < D; ++k) std::fill(t.ck[k], t.ck[k] + nt, 0.0);
    std::fill(t.gap, t.gap + nt, 0.0), std::fill(t.tc, t.tc + nt, 0.0), std::fill(t.cap, t.cap + nt, -1.0);
    return;
  }
  for (int k = 0; k < D; ++k) {
    const double* mk = a.moments + (k * a.M + slot) * N + n0;
    for (int64_t n = 0; n < nt; ++n) t.ck[k][n] = mk[n] * kInvFact[k + 1];
  }
  const double* gp = a.gap + slot * N + n0;
  for (int64_t n = 0; n < nt; ++n) {
    const double q = a.st->q[n0 + n];
    const Cert c = certificate(a.moments, a.M, N, slot, n0 + n, D, q, rg, a.C);
    t.gap[n] = gp[n];
    t.tc[n] = c.tc;
    t.cap[n] = c.cap;
  }
}

// One weight over one tile, lanes across samples: the loop sums the certified pairs and marks the rest.
// Its own clones (not inlined into fused_runs'): inlined there GCC kept only the scalar copy of
// this loop; one indirect call per 256 pairs costs nothing.
template <int D, bool ByClass, typename scalar_t>
WA_CLONES void weight_tile(Tile& t, const scalar_t* a_row, double wk, double g, double sl, double range,
                           double vs, int64_t nt, double& sum_loss, double& sum_kl, int64_t& n_marked, int64_t& n_active) {
  double sl_ = 0.0, sk = 0.0;
  int64_t marked = 0, active = 0;
#pragma omp simd reduction(+ : sl_, sk, marked, active)
  for (int64_t n = 0; n < nt; ++n) {
    const double d = leaky_d(wk, static_cast<double>(a_row[n]), t.u[n], g, sl);
    const double ad = std::fabs(d), x = ad * range, d2 = d * d;
    // S2 = sum_{k=2..D} d^k mu_k / k! (Horner on d), S = d mu_1 + S2, KL = S2 + (log1p(S) - S)
    double h = t.ck[D - 1][n];
#pragma GCC unroll 8
    for (int k = D - 2; k >= 1; --k) h = std::fma(h, d, t.ck[k][n]);
    const double s2 = d2 * h, s = std::fma(d, t.ck[0][n], s2);
    const double kl = s2 + log1p_minus_9(s);
    const double dce = std::fma(d, t.gap[n], kl);
    double dp = ad;
#pragma GCC unroll 8
    for (int k = 0; k < D; ++k) dp *= ad;  // |d|^(D+1)
    // every load and comparison unconditional (& and |, not && and ||): the loop if-converts
    const double tc = t.tc[n], cap = t.cap[n], hi = t.hi[n], lo = t.lo[n], rest = t.rest[n];
    const bool nz = d != 0.0;
    const bool ok = (x <= 0.5) & (std::fabs(s) <= kLogSeriesMax) & (dp * tc <= d2 * cap);
    const double slack = ad * vs;  // the rounding of d v_c, d v_top
    const double side = d > 0 ? d * hi : -d * lo;
    bool cand = side + slack >= rest;
#pragma GCC unroll 8
    for (int j = 0; j < kNear; ++j) cand = cand | (std::fma(d, t.dv[j][n], slack) >= t.gn[j][n]);
    const bool take = nz & ok;
    sl_ += take ? dce : 0.0;
    sk += take ? kl : 0.0;
    const int64_t code = static_cast<int64_t>(nz & !ok) | (static_cast<int64_t>(nz & cand) << 1);
    t.code[n] = code;
    if constexpr (ByClass) t.d[n] = d, t.dce[n] = take ? dce : 0.0;  // else no stores but code's
    marked += code != 0;
    active += nz;
  }
  sum_loss += sl_, sum_kl += sk;
  n_marked += marked, n_active += active;
}

// The marked pairs of one weight's tile, one by one: the moment path with the full log1p, else the
// exact O(C) loop; flip candidates by argmax.
// d is recomputed from the same values by the same operations (fp-contract off): the lane's d.
template <typename scalar_t>
WA_INLINE void resolve_marked(const FusedArgs& a, Tile& t, int D, int64_t i, const scalar_t* a_row, double wk,
                              int64_t n0, int64_t nt, Sums& s) {
  const int64_t C = a.C;
  const double* v = a.head ? a.head + i * C : nullptr;
  const double range = a.range[i];
  for (int64_t n = 0; n < nt; ++n) {
    if (!t.code[n]) continue;
    const double d = leaky_d(wk, static_cast<double>(a_row[n]), t.u[n], a.gain[i], a.slope[i]);
    const int64_t sample = n0 + n, y = a.labels[sample];
    if (t.code[n] & 1) {
      Pair r;
      const double ad = std::fabs(d), x = ad * range, d2 = d * d;
      double dp = ad;
      for (int q = 0; q < D; ++q) dp *= ad;
      if (v && x <= 0.5 && dp * t.tc[n] <= d2 * t.cap[n]) {
        double h = t.ck[D - 1][n];
        for (int q = D - 2; q >= 1; --q) h = std::fma(h, d, t.ck[q][n]);
        const double s2 = d2 * h, sm = std::fma(d, t.ck[0][n], s2);
        r.kl = s2 + log1p_minus(sm);
        r.dce = std::fma(d, t.gap[n], r.kl);
      } else if (v) {
        r = exact_pair(a.probs + sample * C, a.logits + sample * C, v, C, y, d, range);
        ++s.exact;
      } else {  // logits layer (v = e_i): score_deltas' O(1) form
        const double pi = a.probs[sample * C + i];
        const double qi = (i == a.st->top[sample] && pi > 0.5) ? a.st->q[sample] : 1.0 - pi;
        r.kl = unit_needs_logits(d, pi, qi) ? log_mean_exp(a.logits + sample * C, nullptr, C, d, pi, i, qi)
                                             : std::log1p(pi * phi(d * qi) + qi * phi(-d * pi));
        r.dce = r.kl + d * (i == y ? -qi : pi);
      }
      s.loss += r.dce, s.kl += r.kl;
      t.dce[n] = r.dce;  // read by by_class only
    }
    if (t.code[n] & 2) {
      const int64_t pred = a.st->top[sample];
      const int64_t now = argmax_shifted(a.logits + sample * C, v, C, d, i);
      if (now != pred) {
        ++s.flips;
        s.err += pred == y;
        s.corr += now == y;
      }
    }
  }
}


// ---------------------------------------------------------------------------------------------
// The row path: a run of consecutive inputs of one unit (whole rows), lanes across its weights and
// kGroup samples per pass, so the per-weight sums are read and written once per kGroup samples and
// each pair loads only its input a[n, j]. Every per-(unit, sample) value is a scalar in the pass:
// the certificate and the flip test become two thresholds on d (conservative by kThreshSafety:
// a pair beyond either is marked and resolved by the exact tests, as in the tile path).
// A ReLU unit off for a sample stays off for every weight of the run when |g w a| cannot reach
// -u (checked with the pass's own rounding): all its pairs have d = 0 and the sample is skipped.

constexpr int kGroup = 4;
constexpr int64_t kRowMin = 32;             // runs at least this long take the row path
constexpr double kThreshSafety = 1.0 - 1e-9;  // covers the thresholds' own rounding (~1e-15)

// One sample's scalars for one unit.
struct RowSample {
  double u, ck[kMaxOrder], gap, hp, hn;  // d in [-hn, hp]: certified and no flip candidate
  double fp, fn;                         // d > fp or d < -fn: flip candidate (resolve's test)
  double rp, rn;                         // d within [-rn, rp]: only the top and its kNearRow next can win
  double tc, cap;                        // the certificate (resolve's exact test)
  int64_t n;
  bool on;                               // u > 0
};

// d beyond g / coef (coef > 0, g > 0) can make coef d reach g; never (coef <= 0); always (g <= 0).
WA_INLINE double reach(double g, double coef) {
  if (!(g > 0.0)) return 0.0;
  if (!(coef > 0.0)) return std::numeric_limits<double>::infinity();
  return g / coef * kThreshSafety;
}

// The scalars of unit i (slot >= 0, a head) for sample n; false when the sample is skipped.
WA_INLINE bool row_sample(const FusedArgs& a, int64_t i, int64_t slot, int64_t n, int D, double zn, double bound,
                          RowSample& r) {
  const double inf = std::numeric_limits<double>::infinity();
  const double g = a.gain[i], sl = a.slope[i], rg = a.range[i];
  r.u = g * zn + a.shift[i];
  if (sl == 0.0 && !(r.u > 0.0) && r.u + std::fabs(g) * bound <= 0.0) return false;
  const int64_t N = a.N;
  for (int k = 0; k < D; ++k) r.ck[k] = a.moments[(k * a.M + slot) * N + n] * kInvFact[k + 1];
  r.gap = a.gap[slot * N + n];
  r.n = n;
  const Cert c = certificate(a.moments, a.M, N, slot, n, D, a.st->q[n], rg, a.C);
  r.tc = c.tc, r.cap = c.cap;
  // certified: |d| range <= 1/2 and tc |d|^(D+1) <= cap d^2, i.e. |d| <= (cap / tc)^(1 / (D - 1))
  double cert = c.cap < 0.0 ? 0.0 : inf;
  if (c.cap >= 0.0 && c.tc > 0.0) cert = c.cap == 0.0 ? 0.0 : std::exp((std::log(c.cap) - std::log(c.tc)) / (D - 1));
  if (rg > 0.0) cert = std::fmin(cert, 0.5 / rg);
  if (!(cert >= 0.0)) cert = 0.0;  // NaN
  cert *= kThreshSafety;
  double fp = inf, fn = inf;
  r.rp = r.rn = 0.0;
  if (a.want_flips) {
    const double* v = a.head + i * a.C;
    const double vt = v[a.st->top[n]];
    const double vs = kFlipSlack * 2.0 * std::fmax(std::fabs(a.vmin[i]), std::fabs(a.vmax[i]));
    const double rest = a.st->gap[n * (kNearMax + 1) + kNearRow];
    fp = reach(rest, a.vmax[i] - vt + vs), fn = reach(rest, vt - a.vmin[i] + vs);
    r.rp = fp, r.rn = fn;
    for (int j = 0; j < kNearRow; ++j) {
      const int64_t cl = a.st->near[n * kNearMax + j];
      if (cl < 0) break;
      const double gn = a.st->gap[n * (kNearMax + 1) + j], dv = v[cl] - vt;
      fp = std::fmin(fp, reach(gn, dv + vs)), fn = std::fmin(fn, reach(gn, vs - dv));
    }
    if (!(fp >= 0.0)) fp = 0.0;
    if (!(fn >= 0.0)) fn = 0.0;
  }
  r.fp = fp, r.fn = fn;
  r.hp = std::fmin(cert, fp), r.hn = std::fmin(cert, fn);
  // the loop's log1p series needs |S| <= kLogSeriesMax; |S| <= B(|d|) = |d| |c_0| + d^2 sum_k |c_k| |d|^(k-1)
  // (increasing): bisect for the largest |d| within, from below (rounding: safety factor)
  auto B = [&](double t) {
    double h = std::fabs(r.ck[D - 1]);
    for (int k = D - 2; k >= 1; --k) h = h * t + std::fabs(r.ck[k]);
    return t * std::fabs(r.ck[0]) + t * t * h;
  };
  const double lim = kLogSeriesMax * kThreshSafety, top = std::fmax(r.hp, r.hn);
  if (!(B(top) <= lim)) {
    double lo = 0.0, hi = std::isfinite(top) ? top : 1e300;
    if (!std::isfinite(top)) {  // bracket: halve until within
      while (hi > 1e-300 && !(B(hi) <= lim)) hi *= 0.5;
      lo = hi, hi *= 2.0;
    }
    for (int it = 0; it < 12; ++it) {
      const double mid = 0.5 * (lo + hi);
      (B(mid) <= lim ? lo : hi) = mid;
    }
    r.hp = std::fmin(r.hp, lo), r.hn = std::fmin(r.hn, lo);
  }
  r.on = r.u > 0.0;
  return true;
}

// One pass over the run's L weights for S samples: certified pairs summed, the rest marked in code.
// Its own clones, like weight_tile (one call per pass over a whole run). On: every sample's u > 0,
// else u <= 0: d is leaky_d's value with its per-sample branch taken outside the loop.
template <int D, int S, bool On, typename scalar_t>
WA_CLONES int64_t row_pass(const RowSample* rs, const scalar_t* const* arow, const scalar_t* w, int64_t L, double g,
                           double sl, double* loss, double* kl, int64_t* active, int64_t* code) {
  double u[S], su[S], c[S][D], gp[S], hp[S], hn[S];
  const scalar_t* ar[S];
  const double ng = -g;
  for (int s = 0; s < S; ++s) {
    u[s] = rs[s].u, su[s] = sl * rs[s].u, gp[s] = rs[s].gap, hp[s] = rs[s].hp, hn[s] = -rs[s].hn, ar[s] = arow[s];
    for (int k = 0; k < D; ++k) c[s][k] = rs[s].ck[k];
  }
  int64_t marked = 0;
#pragma omp simd reduction(+ : marked)
  for (int64_t j = 0; j < L; ++j) {
    const double wk = static_cast<double>(w[j]);
    double sum_loss = 0.0, sum_kl = 0.0;
    int64_t act = 0, m = 0;
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      // leaky_d: du = -g (w a), up = u + du; on: up > 0 ? du : sl up - u; off: up > 0 ? up - sl u : sl du
      const double du = ng * (wk * static_cast<double>(ar[s][j])), up = u[s] + du;
      const double d = On ? (up > 0.0 ? du : sl * up - u[s]) : (up > 0.0 ? up - su[s] : sl * du);
      double h = c[s][D - 1];
#pragma GCC unroll 8
      for (int k = D - 2; k >= 1; --k) h = std::fma(h, d, c[s][k]);
      const double s2 = d * d * h, sm = std::fma(d, c[s][0], s2);
      const double klv = s2 + log1p_minus_9(sm);
      const double dce = std::fma(d, gp[s], klv);
      // d = 0 gives kl = dce = 0 and is within [-hn, hp] (both >= 0): no test of d != 0 but the count
      const bool in = (d <= hp[s]) & (d >= hn[s]);
      sum_loss += in ? dce : 0.0;
      sum_kl += in ? klv : 0.0;
      act += d != 0.0;
      m |= static_cast<int64_t>(!in) << s;
    }
    loss[j] += sum_loss, kl[j] += sum_kl, active[j] += act;
    code[j] = m;
    marked += m != 0;
  }
  return marked;
}

// argmax_shifted over the top class and its kNearRow next (the others provably stay below the top,
// by the flip test's margin): the same values, ties to the first index as torch.argmax.
WA_INLINE int64_t argmax_near(const double* l, const double* v, const int64_t* near, int64_t top, double d) {
  int64_t best = top;
  double best_val = l[top] + d * v[top];
  for (int j = 0; j < kNearRow; ++j) {
    const int64_t c = near[j];
    if (c < 0) break;
    const double val = l[c] + d * v[c];
    if (val > best_val || (val == best_val && c < best)) best_val = val, best = c;
  }
  return best;
}

// The marked pairs of one pass, one by one (as resolve_marked): the series where the exact
// certificate holds, else the exact O(C) loop; flip candidates by argmax.
template <typename scalar_t>
WA_COLD void row_resolve(const FusedArgs& a, int D, int64_t i, int64_t kb, const RowSample* rs,
                         const scalar_t* const* arow, const scalar_t* w, int64_t L, int S, const int64_t* code) {
  const int64_t C = a.C;
  const double* v = a.head + i * C;
  const double g = a.gain[i], sl = a.slope[i], range = a.range[i];
  for (int64_t j = 0; j < L; ++j) {
    if (!code[j]) continue;
    const int64_t k = kb + j;
    for (int s = 0; s < S; ++s) {
      if (!((code[j] >> s) & 1)) continue;
      const RowSample& r = rs[s];
      const double d = leaky_d(static_cast<double>(w[j]), static_cast<double>(arow[s][j]), r.u, g, sl);
      const int64_t n = r.n, y = a.labels[n];
      const double ad = std::fabs(d), x = ad * range, d2 = d * d;
      double dp = ad;
      for (int q = 0; q < D; ++q) dp *= ad;
      Pair p;
      if (x <= 0.5 && dp * r.tc <= d2 * r.cap) {
        double h = r.ck[D - 1];
        for (int q = D - 2; q >= 1; --q) h = std::fma(h, d, r.ck[q]);
        const double s2 = d2 * h, sm = std::fma(d, r.ck[0], s2);
        p.kl = s2 + log1p_minus(sm);
        p.dce = std::fma(d, r.gap, p.kl);
      } else {
        p = exact_pair(a.probs + n * C, a.logits + n * C, v, C, y, d, range);
        ++a.exact[k];
      }
      a.loss[k] += p.dce, a.kl[k] += p.kl;
      if (d > r.fp || -d > r.fn) {
        const int64_t pred = a.st->top[n];
        const bool near_only = d <= r.rp && -d <= r.rn;
        const int64_t now = near_only ? argmax_near(a.logits + n * C, v, a.st->near.data() + n * kNearMax, pred, d)
                                      : argmax_shifted(a.logits + n * C, v, C, d, i);
        if (now != pred) {
          ++a.flips[k];
          a.err[k] += pred == y;
          a.corr[k] += now == y;
        }
      }
    }
  }
}

// Run r, all samples, by the row path. a.a_nj: the inputs (N, J); a.amax: max_j |a[n, j]| (NaN if any is).
template <int D, typename scalar_t>
WA_INLINE void row_run(const FusedArgs& a, int64_t kb, int64_t ke, std::vector<int64_t>& code) {
  const int64_t N = a.N, J = a.J, L = ke - kb, i = a.rows[kb], c0 = a.cols[kb];
  const int64_t slot = a.slot[i];
  const auto* a_nj = static_cast<const scalar_t*>(a.a_nj);
  const auto* z_t = static_cast<const scalar_t*>(a.z_t) + i * N;
  const auto* w = static_cast<const scalar_t*>(a.w) + kb;
  if (static_cast<int64_t>(code.size()) < L) code.resize(L);
  double wmax = 0.0;
  for (int64_t j = 0; j < L; ++j) {
    const double x = std::fabs(static_cast<double>(w[j]));
    wmax = (x > wmax || x != x) ? x : wmax;  // NaN stays
  }
  const double g = a.gain[i], sl = a.slope[i];
  // two groups: samples with the unit on (u > 0) and off, each flushed when kGroup are in
  RowSample rs[2][kGroup];
  const scalar_t* arow[2][kGroup];
  int S[2] = {0, 0};
  auto flush = [&](int on, int count) {
    RowSample* r = rs[on];
    const scalar_t* const* ar = arow[on];
    double *lp = a.loss + kb, *kp = a.kl + kb;
    int64_t* ap = a.active + kb;
    int64_t marked;
    if (count == kGroup) {
      marked = on ? row_pass<D, kGroup, true>(r, ar, w, L, g, sl, lp, kp, ap, code.data())
                  : row_pass<D, kGroup, false>(r, ar, w, L, g, sl, lp, kp, ap, code.data());
    } else {
      marked = on ? row_pass<D, 1, true>(r, ar, w, L, g, sl, lp, kp, ap, code.data())
                  : row_pass<D, 1, false>(r, ar, w, L, g, sl, lp, kp, ap, code.data());
    }
    if (marked) row_resolve(a, D, i, kb, r, ar, w, L, count, code.data());
  };
  for (int64_t n = 0; n < N; ++n) {
    // |w a| <= wmax amax, rounded up by the same operations' monotonicity
    const double bound = wmax * a.amax[n];
    RowSample r;
    if (!row_sample(a, i, slot, n, D, static_cast<double>(z_t[n]), bound, r)) continue;
    const int on = r.on;
    rs[on][S[on]] = r, arow[on][S[on]] = a_nj + n * J + c0;
    if (++S[on] == kGroup) flush(on, kGroup), S[on] = 0;
  }
  for (int on = 0; on < 2; ++on) {
    for (int s = 0; s < S[on]; ++s) {  // the last samples one at a time
      rs[on][0] = rs[on][s], arow[on][0] = arow[on][s];
      flush(on, 1);
    }
  }
}

// Runs [rb, re): tiles outermost, so a tile of a_t is reused by every run of this block.
template <int D, typename scalar_t>
WA_INLINE void fused_runs_impl(const FusedArgs& a, int64_t rb, int64_t re) {
  const int64_t N = a.N, C = a.C;
  const auto* a_t = static_cast<const scalar_t*>(a.a_t);
  const auto* z_t = static_cast<const scalar_t*>(a.z_t);
  const auto* w = static_cast<const scalar_t*>(a.w);
  if (a.row_path) {
    std::vector<int64_t> code;
    for (int64_t r = rb; r < re; ++r)
      if (a.row_path[r]) row_run<D, scalar_t>(a, a.run_begin[r], a.run_begin[r + 1], code);
  }
  bool any_tile = !a.row_path;
  for (int64_t r = rb; r < re && !any_tile; ++r) any_tile = !a.row_path[r];
  if (!any_tile) return;
  auto tile = std::make_unique<Tile>();
  Tile& t = *tile;
  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    const int64_t nt = std::min(kTile, N - n0);
    for (int64_t r = rb; r < re; ++r) {
      if (a.row_path && a.row_path[r]) continue;
      const int64_t kb = a.run_begin[r], ke = a.run_begin[r + 1], i = a.rows[kb];
      const scalar_t* z_row = z_t + i * N;
      if constexpr (std::is_same_v<scalar_t, double>) lay_out_tile(a, t, z_row, nullptr, i, n0, nt, D);
      else lay_out_tile(a, t, nullptr, z_row, i, n0, nt, D);
      if (!a.head) std::fill(t.cap, t.cap + nt, -1.0);  // logits layer: every active pair is marked
      const double g = a.gain[i], sl = a.slope[i], range = a.range[i];
      const double vs = kFlipSlack * 2.0 * std::fmax(std::fabs(a.vmin[i]), std::fabs(a.vmax[i]));
      for (int64_t k = kb; k < ke; ++k) {
        Sums s;
        int64_t marked = 0;
        const scalar_t* a_row = a_t + a.cols[k] * N + n0;
        const double wk = static_cast<double>(w[k]);
        if (a.cls) weight_tile<D, true>(t, a_row, wk, g, sl, range, vs, nt, s.loss, s.kl, marked, s.active);
        else weight_tile<D, false>(t, a_row, wk, g, sl, range, vs, nt, s.loss, s.kl, marked, s.active);
        if (marked) resolve_marked(a, t, D, i, a_row, wk, n0, nt, s);
        if (a.cls) {
          double* row = a.cls + k * C;
          for (int64_t n = 0; n < nt; ++n)
            if (t.d[n] != 0.0) row[a.labels[n0 + n]] += t.dce[n];
        }
        a.loss[k] += s.loss, a.kl[k] += s.kl;
        a.flips[k] += s.flips, a.err[k] += s.err, a.corr[k] += s.corr;
        a.exact[k] += s.exact, a.active[k] += s.active;
      }
    }
  }
}

template <typename scalar_t>
WA_INLINE void fused_runs_order(const FusedArgs& a, int64_t rb, int64_t re) {
  switch (a.order) {
    case 2: return fused_runs_impl<2, scalar_t>(a, rb, re);
    case 3: return fused_runs_impl<3, scalar_t>(a, rb, re);
    case 4: return fused_runs_impl<4, scalar_t>(a, rb, re);
    case 5: return fused_runs_impl<5, scalar_t>(a, rb, re);
    case 6: return fused_runs_impl<6, scalar_t>(a, rb, re);
    case 7: return fused_runs_impl<7, scalar_t>(a, rb, re);
    default: return fused_runs_impl<8, scalar_t>(a, rb, re);
  }
}

WA_CLONES void fused_runs(const FusedArgs& a, int64_t rb, int64_t re, float) { fused_runs_order<float>(a, rb, re); }
WA_CLONES void fused_runs(const FusedArgs& a, int64_t rb, int64_t re, double) { fused_runs_order<double>(a, rb, re); }

// Per unit: min and max of v, range = max - min (bounds |v_c - v_top|); v = e_i for a logits layer.
struct UnitBounds {
  std::vector<double> vmin, vmax, range;
};

UnitBounds unit_bounds(const double* head, int64_t U, int64_t C) {
  UnitBounds b{std::vector<double>(U, 0.0), std::vector<double>(U, 1.0), std::vector<double>(U, C > 1 ? 1.0 : 0.0)};
  if (!head) return b;
  at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* v = head + i * C;
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      for (int64_t c = 0; c < C; ++c) lo = v[c] < lo ? v[c] : lo, hi = v[c] > hi ? v[c] : hi;
      if (lo > hi) lo = hi = std::numeric_limits<double>::quiet_NaN();  // NaN everywhere: marked, exact loop
      b.vmin[i] = lo, b.vmax[i] = hi, b.range[i] = C > 1 ? hi - lo : 0.0;
    }
  });
  return b;
}

FusedOutputs fused_scores_cpu(const at::Tensor& a_t, const at::Tensor& z_t, const at::Tensor& rows,
                              const at::Tensor& cols, const at::Tensor& w, const at::Tensor& gain,
                              const at::Tensor& shift, const at::Tensor& slope, const std::optional<at::Tensor>& head,
                              const at::Tensor& probs, const at::Tensor& logits, const at::Tensor& labels,
                              const std::optional<at::Tensor>& moments, const std::optional<at::Tensor>& mean_gap,
                              const std::optional<at::Tensor>& moment_slot, bool want_flips, bool by_class) {
  const FusedSizes sz = check_fused_args(a_t, z_t, rows, cols, w, gain, shift, slope, head, probs, logits, labels,
                                         moments, mean_gap, moment_slot);
  FusedOutputs out = zero_fused_outputs(a_t, sz.K, sz.C, by_class);
  if (sz.K == 0 || sz.N == 0) return out;
  auto& [dloss, dkl, flips, new_err, new_corr, nonzero, class_loss, exact, active] = out;
  auto rows_c = rows.contiguous(), cols_c = cols.contiguous(), y_c = labels.contiguous();
  TORCH_CHECK(rows_c.min().item<int64_t>() >= 0 && rows_c.max().item<int64_t>() < sz.I, "fused_scores: rows out of range");
  TORCH_CHECK(cols_c.min().item<int64_t>() >= 0 && cols_c.max().item<int64_t>() < sz.J, "fused_scores: cols out of range");
  TORCH_CHECK(y_c.min().item<int64_t>() >= 0 && y_c.max().item<int64_t>() < sz.C, "fused_scores: labels out of range");
  TORCH_CHECK(!sz.has_head || sz.U == sz.I, "fused_scores: head has ", sz.U, " rows for ", sz.I, " units");
  at::Tensor head_c, mom_c, gap_c, slot_c;
  if (sz.has_head) head_c = head->contiguous();
  if (sz.has_moments) {
    mom_c = moments->contiguous(), gap_c = mean_gap->contiguous(), slot_c = moment_slot->contiguous();
    TORCH_CHECK(slot_c.max().item<int64_t>() < sz.M, "fused_scores: moment_slot out of range");
  }
  auto a_c = a_t.contiguous(), z_c = z_t.contiguous(), w_c = w.contiguous(), p_c = probs.contiguous(),
       l_c = logits.contiguous(), g_c = gain.contiguous(), s_c = shift.contiguous(), sl_c = slope.contiguous();
  const SampleStats st = sample_stats(l_c.data_ptr<double>(), p_c.data_ptr<double>(), sz.N, sz.C);
  const UnitBounds ub = unit_bounds(sz.has_head ? head_c.data_ptr<double>() : nullptr, sz.I, sz.C);
  const int64_t* rp = rows_c.data_ptr<int64_t>();
  std::vector<int64_t> run_begin{0};  // runs of consecutive weights of one unit
  for (int64_t k = 1; k < sz.K; ++k)
    if (rp[k] != rp[k - 1]) run_begin.push_back(k);
  run_begin.push_back(sz.K);
  const int64_t n_runs = static_cast<int64_t>(run_begin.size()) - 1;

  // the row path: runs of >= kRowMin consecutive inputs of a unit with moments, a head, no by_class
  const int64_t* cp = cols_c.data_ptr<int64_t>();
  std::vector<uint8_t> row_path(n_runs, 0);
  bool any_row = false;
  if (sz.has_head && sz.has_moments && !by_class) {
    const int64_t* sp = slot_c.data_ptr<int64_t>();
    for (int64_t r = 0; r < n_runs; ++r) {
      const int64_t kb = run_begin[r], ke = run_begin[r + 1];
      bool ok = ke - kb >= kRowMin && sp[rp[kb]] >= 0;
      for (int64_t k = kb + 1; ok && k < ke; ++k) ok = cp[k] == cp[k - 1] + 1;
      row_path[r] = ok, any_row |= ok;
    }
  }
  at::Tensor a_nj;
  std::vector<double> amax;
  if (any_row) {
    a_nj = a_c.t().contiguous();
    // max_j |a[n, j]| in float64; NaN when any a[n, j] is (amax propagates it): no sample skipped
    auto m = a_nj.abs().amax(1).to(at::kDouble).contiguous();
    amax.assign(m.data_ptr<double>(), m.data_ptr<double>() + sz.N);
  }

  FusedArgs args{a_c.data_ptr(), z_c.data_ptr(), rp, cols_c.data_ptr<int64_t>(), y_c.data_ptr<int64_t>(),
                 sz.has_moments ? slot_c.data_ptr<int64_t>() : nullptr, run_begin.data(), w_c.data_ptr(),
                 g_c.data_ptr<double>(), s_c.data_ptr<double>(), sl_c.data_ptr<double>(),
                 sz.has_head ? head_c.data_ptr<double>() : nullptr, p_c.data_ptr<double>(), l_c.data_ptr<double>(),
                 sz.has_moments ? mom_c.data_ptr<double>() : nullptr,
                 sz.has_moments ? gap_c.data_ptr<double>() : nullptr, ub.range.data(), ub.vmin.data(), ub.vmax.data(), &st, sz.N, sz.C, sz.M,
                 sz.has_moments ? sz.order : 2, want_flips, any_row ? row_path.data() : nullptr,
                 any_row ? a_nj.data_ptr() : nullptr, any_row ? amax.data() : nullptr, sz.J, dloss.data_ptr<double>(), dkl.data_ptr<double>(),
                 by_class ? class_loss.data_ptr<double>() : nullptr, flips.data_ptr<int64_t>(),
                 new_err.data_ptr<int64_t>(), new_corr.data_ptr<int64_t>(), exact.data_ptr<int64_t>(),
                 active.data_ptr<int64_t>(), nonzero.data_ptr<bool>()};
  // blocks of runs of about kBlockWeights weights: a tile of a_t is reused across a block's runs
  // while the block's per-weight sums stay in cache
  constexpr int64_t kBlockWeights = 1 << 14;
  const int64_t grain = std::max<int64_t>(1, n_runs * kBlockWeights / sz.K);
  // blocks handed out one at a time (not a fixed share per thread): on a shared machine a thread
  // that loses its core for a while leaves its blocks to the others instead of the call waiting for it
  const int64_t n_blocks = (n_runs + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "fused_scores_cpu", [&] {
    at::parallel_for(0, std::min<int64_t>(n_blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      for (int64_t b = next++; b < n_blocks; b = next++)
        fused_runs(args, b * grain, std::min(n_runs, (b + 1) * grain), scalar_t{});
    });
  });
  const int64_t* ap = active.data_ptr<int64_t>();
  bool* nzp = nonzero.data_ptr<bool>();
  for (int64_t k = 0; k < sz.K; ++k) nzp[k] = ap[k] > 0;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightablate, CPU, m) { m.impl("fused_scores", &fused_scores_cpu); }

}  // namespace weightablate

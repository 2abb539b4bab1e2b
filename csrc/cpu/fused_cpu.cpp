// The fused whole-layer op on the CPU: d, the moment series, flips and the per-weight float64 sums
// in one pass, d never leaving registers (pair_deltas + score_deltas without the K x N round trip).
//
// Weights are taken in runs of one unit (consecutive equal rows), samples in tiles of kTile. Per
// (run, tile) the unit's per-sample values are laid out once (u = gain z + shift, the moments
// divided by k!, the certificate's scale); then each weight of the run is one vectorised loop over
// the tile, lanes across samples. Pairs the loop cannot finish (series not certified, or a flip
// candidate) are marked and resolved one by one after it: the scalar moment path, else the exact
// O(C) loop, which is counted (exact_pairs).
#pragma GCC optimize("fp-contract=off")  // d bit-identical to pair_deltas; the series' FMAs are explicit
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
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
  std::vector<int64_t> near;   // (N, kNear): the next classes by logit (-1: none)
  std::vector<double> gap;     // (N, kNear + 1): l_top - l_c of those, then of the next class, less the slack
};

SampleStats sample_stats(const double* l, const double* p, int64_t N, int64_t C) {
  const double inf = std::numeric_limits<double>::infinity();
  SampleStats s{std::vector<int64_t>(N), std::vector<double>(N), std::vector<double>(N),
                std::vector<int64_t>(N * kNear, -1), std::vector<double>(N * (kNear + 1), inf)};
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const double* ln = l + n * C;
      int64_t top = 0;
      for (int64_t c = 1; c < C; ++c) top = ln[c] > ln[top] ? c : top;
      double q = 0.0, lmax = std::fabs(ln[top]);
      // the kNear + 1 largest logits after the top, by insertion (ties: any order is conservative)
      int64_t best[kNear + 1];
      double val[kNear + 1];
      for (int j = 0; j <= kNear; ++j) best[j] = -1, val[j] = -inf;
      for (int64_t c = 0; c < C; ++c) {
        if (c == top) continue;
        q += p[n * C + c];
        lmax = std::fmax(lmax, std::fabs(ln[c]));
        if (!(ln[c] > val[kNear]) && best[kNear] >= 0) continue;
        int j = kNear;
        while (j > 0 && (ln[c] > val[j - 1] || best[j - 1] < 0)) best[j] = best[j - 1], val[j] = val[j - 1], --j;
        best[j] = c, val[j] = ln[c];
      }
      const double slack = kFlipSlack * (lmax + 1.0);
      for (int j = 0; j <= kNear; ++j) {
        if (j < kNear) s.near[n * kNear + j] = best[j];
        s.gap[n * (kNear + 1) + j] = best[j] >= 0 ? ln[top] - val[j] - slack : inf;
      }
      s.top[n] = top, s.margin[n] = s.gap[n * (kNear + 1)], s.q[n] = q;
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
      const int64_t c = a.st->near[sample * kNear + j];
      t.dv[j][n] = c >= 0 ? v[c] - vt : 0.0;
      t.gn[j][n] = a.st->gap[sample * (kNear + 1) + j];
    }
    t.hi[n] = a.vmax[i] - vt, t.lo[n] = vt - a.vmin[i], t.rest[n] = a.st->gap[sample * (kNear + 1) + kNear];
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

// Runs [rb, re): tiles outermost, so a tile of a_t is reused by every run of this block.
template <int D, typename scalar_t>
WA_INLINE void fused_runs_impl(const FusedArgs& a, int64_t rb, int64_t re) {
  const int64_t N = a.N, C = a.C;
  const auto* a_t = static_cast<const scalar_t*>(a.a_t);
  const auto* z_t = static_cast<const scalar_t*>(a.z_t);
  const auto* w = static_cast<const scalar_t*>(a.w);
  auto tile = std::make_unique<Tile>();
  Tile& t = *tile;
  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    const int64_t nt = std::min(kTile, N - n0);
    for (int64_t r = rb; r < re; ++r) {
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

  FusedArgs args{a_c.data_ptr(), z_c.data_ptr(), rp, cols_c.data_ptr<int64_t>(), y_c.data_ptr<int64_t>(),
                 sz.has_moments ? slot_c.data_ptr<int64_t>() : nullptr, run_begin.data(), w_c.data_ptr(),
                 g_c.data_ptr<double>(), s_c.data_ptr<double>(), sl_c.data_ptr<double>(),
                 sz.has_head ? head_c.data_ptr<double>() : nullptr, p_c.data_ptr<double>(), l_c.data_ptr<double>(),
                 sz.has_moments ? mom_c.data_ptr<double>() : nullptr,
                 sz.has_moments ? gap_c.data_ptr<double>() : nullptr, ub.range.data(), ub.vmin.data(), ub.vmax.data(), &st, sz.N, sz.C, sz.M,
                 sz.has_moments ? sz.order : 2, want_flips, dloss.data_ptr<double>(), dkl.data_ptr<double>(),
                 by_class ? class_loss.data_ptr<double>() : nullptr, flips.data_ptr<int64_t>(),
                 new_err.data_ptr<int64_t>(), new_corr.data_ptr<int64_t>(), exact.data_ptr<int64_t>(),
                 active.data_ptr<int64_t>(), nonzero.data_ptr<bool>()};
  // blocks of runs of about kBlockWeights weights: a tile of a_t is reused across a block's runs
  // while the block's per-weight sums stay in cache
  constexpr int64_t kBlockWeights = 1 << 14;
  const int64_t grain = std::max<int64_t>(1, n_runs * kBlockWeights / sz.K);
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "fused_scores_cpu", [&] {
    at::parallel_for(0, n_runs, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; b += grain) fused_runs(args, b, std::min(end, b + grain), scalar_t{});
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

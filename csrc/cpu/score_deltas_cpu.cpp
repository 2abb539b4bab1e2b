// Stage 2 on the CPU: rank-one logit corrections -> dCE, dKL and flips, summed per weight in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../numerics.h"

// One clone per instruction set, picked at load time: AVX-512 here, AVX2 or SSE elsewhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WA_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define WA_CLONES
#endif

namespace weightablate {
namespace {

WA_CLONES double dot(const double* p, const double* v, int64_t C) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += p[c] * v[c];
  return s;
}

// sum_c p_c phi(d (v_c - m1)), every |d (v_c - m1)| <= kPhiSeriesMax.
WA_CLONES double centered_sum_series(const double* p, const double* v, int64_t C, double d, double m1) {
  double t = 0.0;
#pragma omp simd reduction(+ : t)
  for (int64_t c = 0; c < C; ++c) t += p[c] * phi_series(d * (v[c] - m1));
  return t;
}

double centered_sum_general(const double* p, const double* v, int64_t C, double d, double m1) {
  double t = 0.0;
  for (int64_t c = 0; c < C; ++c) t += p[c] * phi(d * (v[c] - m1));
  return t;
}

// KL(p || softmax(l + d v)) = log sum_c p_c exp(d (v_c - m1)) = log1p(sum_c p_c phi(d (v_c - m1))):
// the first-order term d sum_c p_c (v_c - m1) is exactly 0, and its rounded value (an ulp of m1
// times d) is left out: it would be the largest error of a tiny KL (a confident sample). Every
// term is >= 0, so the KL is too.
// range = max(v) - min(v) bounds |d (v_c - m1)| / |d|.
double exact_kl(const double* p, const double* v, int64_t C, double d, double m1, double range) {
  const double x = std::fabs(d) * range;
  if (x <= kPhiSeriesMax) return std::log1p(centered_sum_series(p, v, C, d, m1));
  if (x <= 30.0) return std::log1p(centered_sum_general(p, v, C, d, m1));
  double mx = -std::numeric_limits<double>::infinity();  // huge d: log-sum-exp
  for (int64_t c = 0; c < C; ++c) mx = std::fmax(mx, std::log(p[c]) + d * (v[c] - m1));
  double s = 0.0;
  for (int64_t c = 0; c < C; ++c) s += std::exp(std::log(p[c]) + d * (v[c] - m1) - mx);
  return mx + std::log(s);
}

// Moment path (DESIGN.md): S = sum_k d^k/k! m_k; KL = S2 + (log1p(S) - S), S2 = S - d m1.
// Returns false when the truncation tail is not certified below kMomentCertTol x KL.
bool moment_kl(const double* m, int64_t order, int64_t stride, double d, double vabs, double* kl) {
  const double x = std::fabs(d) * vabs;
  if (x > 0.5) return false;
  const double m1 = m[0], m2 = m[stride];
  const double var = m2 - m1 * m1;
  if (!(var > kMomentMinVarRatio * m2)) return false;
  double tail = 1.6487212707001282;  // e^0.5 >= e^x
  for (int64_t k = 1; k <= order + 1; ++k) tail *= x / k;
  if (!(tail <= kMomentCertTol * 0.5 * d * d * var)) return false;
  double s2 = 0.0, dk = d * d * 0.5;
  for (int64_t k = 2; k <= order; ++k) {
    s2 += dk * m[(k - 1) * stride];
    dk *= d / (k + 1);
  }
  *kl = s2 + log1p_minus(d * m1 + s2);
  return true;
}

int64_t argmax_shifted(const double* l, const double* v, int64_t C, double d, int64_t unit) {
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
        second = std::fmax(second, ln[c]);
        q += p[n * C + c];
      }
      s.top[n] = top;
      s.margin[n] = ln[top] - second;  // +inf when C == 1: nothing can flip
      s.q_top[n] = q;
    }
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_deltas_cpu(
    const at::Tensor& d, const at::Tensor& unit, const std::optional<at::Tensor>& head, const at::Tensor& probs,
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& moments,
    const std::optional<at::Tensor>& moment_slot, bool want_flips, bool by_class) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kDouble, "score_deltas: d must be float64 (K, N)");
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kDouble && logits.sizes() == probs.sizes() &&
                  logits.scalar_type() == at::kDouble,
              "score_deltas: probs and logits must be float64 (N, C)");
  const int64_t K = d.size(0), N = d.size(1), C = probs.size(1);
  TORCH_CHECK(probs.size(0) == N, "score_deltas: probs has ", probs.size(0), " samples, d has ", N);
  TORCH_CHECK(unit.scalar_type() == at::kLong && unit.dim() == 1 && unit.size(0) == K, "score_deltas: unit must be int64 (K,)");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == N,
              "score_deltas: labels must be int64 (N,)");
  const bool has_head = head.has_value() && head->defined();
  const int64_t U = has_head ? head->size(0) : C;
  if (has_head) {
    TORCH_CHECK(head->dim() == 2 && head->size(1) == C && head->scalar_type() == at::kDouble,
                "score_deltas: head must be float64 (U, C)");
  }
  const bool has_moments = moments.has_value() && moments->defined();
  int64_t order = 0, M = 0;
  if (has_moments) {
    TORCH_CHECK(has_head, "score_deltas: moments need a head");
    TORCH_CHECK(moment_slot.has_value() && moment_slot->defined() && moment_slot->scalar_type() == at::kLong &&
                    moment_slot->dim() == 1 && moment_slot->size(0) == U,
                "score_deltas: moments need moment_slot int64 (U,)");
    TORCH_CHECK(moments->dim() == 3 && moments->size(2) == N && moments->scalar_type() == at::kDouble &&
                    moments->size(0) >= 2,
                "score_deltas: moments must be float64 (D >= 2, M, N)");
    order = moments->size(0);
    M = moments->size(1);
  }
  auto opts = d.options();
  auto dloss = at::zeros({K}, opts), dkl = at::zeros({K}, opts);
  auto flips = at::zeros({K}, opts.dtype(at::kLong)), new_err = at::zeros({K}, opts.dtype(at::kLong)),
       new_corr = at::zeros({K}, opts.dtype(at::kLong));
  auto nonzero = at::zeros({K}, opts.dtype(at::kBool));
  auto class_loss = at::zeros({K, by_class ? C : 0}, opts);
  if (K == 0 || N == 0) return {dloss, dkl, flips, new_err, new_corr, nonzero, class_loss};

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

  double* out_loss = dloss.data_ptr<double>();
  double* out_kl = dkl.data_ptr<double>();
  int64_t* out_flips = flips.data_ptr<int64_t>();
  int64_t* out_err = new_err.data_ptr<int64_t>();
  int64_t* out_corr = new_corr.data_ptr<int64_t>();
  bool* out_nz = nonzero.data_ptr<bool>();
  double* out_cls = by_class ? class_loss.data_ptr<double>() : nullptr;

  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = up[k];
      const double* v = has_head ? hp + i * C : nullptr;
      double vmin = 0.0, vmax = 1.0;  // logits layer: v = e_i
      if (v) {
        vmin = vmax = v[0];
        for (int64_t c = 1; c < C; ++c) vmin = std::fmin(vmin, v[c]), vmax = std::fmax(vmax, v[c]);
      }
      const double range = C > 1 ? vmax - vmin : 0.0;
      const double vabs = std::fmax(std::fabs(vmin), std::fabs(vmax));
      const int64_t slot = sp ? sp[i] : -1;
      double sum_loss = 0.0, sum_kl = 0.0;
      int64_t n_flips = 0, n_err = 0, n_corr = 0;
      bool any = false;
      for (int64_t n = 0; n < N; ++n) {
        const double dd = dp[k * N + n];
        if (dd == 0.0) continue;
        any = true;
        const int64_t y = yp[n];
        const double* p = pp + n * C;
        double kl, dce;
        if (v) {
          double m1;
          if (slot >= 0 && moment_kl(mp + slot * N + n, order, M * N, dd, vabs, &kl)) {
            m1 = mp[slot * N + n];
          } else {
            m1 = dot(p, v, C);
            kl = exact_kl(p, v, C, dd, m1, range);
          }
          dce = kl + dd * (m1 - v[y]);  // CE change = KL + d (E_p[v] - v_y)
        } else {
          const double pi = p[i];
          const double qi = (i == st.top[n] && pi > 0.5) ? st.q_top[n] : 1.0 - pi;
          kl = std::log1p(pi * phi(dd * qi) + qi * phi(-dd * pi));
          dce = kl + dd * (i == y ? -qi : pi);
        }
        sum_loss += dce;
        sum_kl += kl;
        if (out_cls) out_cls[k * C + y] += dce;
        if (want_flips && std::fabs(dd) * range >= st.margin[n]) {
          const int64_t pred = st.top[n], now = argmax_shifted(lp + n * C, v, C, dd, i);
          if (now != pred) {
            ++n_flips;
            n_err += (pred == y);
            n_corr += (now == y);
          }
        }
      }
      out_loss[k] = sum_loss;
      out_kl[k] = sum_kl;
      out_flips[k] = n_flips;
      out_err[k] = n_err;
      out_corr[k] = n_corr;
      out_nz[k] = any;
    }
  });
  return {dloss, dkl, flips, new_err, new_corr, nonzero, class_loss};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightablate, CPU, m) { m.impl("score_deltas", &score_deltas_cpu); }

}  // namespace weightablate

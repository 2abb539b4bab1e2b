// The two ops' GPU kernels and their launchers, written once for two compilers: nvcc
// (ablate_cuda.cu) and the host emulator the CPU test suite runs them under
// (tests/cuda_emulator), which is how CI executes this code without a GPU. The includer defines
// WA_DEVICE_GUARD(device), WA_STREAM(), WA_LAUNCH(kernel, blocks, threads, stream, args...) and
// WA_LAUNCH_CHECK(), and provides the CUDA built-ins (threadIdx, __syncthreads, ...).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros_like.h>

#include <climits>

#include "../numerics.h"
#include "../op_args.h"
#include "../fused_args.h"

// Out-of-range indices stop the kernel (a device-side assert, as in PyTorch's own index ops)
// instead of a host-side min/max check, which would cost a device sync per chunk.
#ifndef WA_KERNEL_ASSERT
#define WA_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif
#ifndef WA_EMPTY  // the emulator fills new buffers with NaN / INT64_MIN: an unwritten element shows
#define WA_EMPTY(...) at::empty(__VA_ARGS__)
#endif
#ifndef WA_THREADS
#define WA_THREADS 256
#endif
#ifndef WA_MAX_BLOCKS  // grid-stride loops cover what a capped grid does not
#define WA_MAX_BLOCKS (65535LL * 8)
#endif

namespace weightablate {
namespace {

constexpr int kThreads = WA_THREADS;

template <typename scalar_t>
__global__ void pair_deltas_kernel(const scalar_t* __restrict__ a_t, const scalar_t* __restrict__ z_t,
                                   const int64_t* __restrict__ rows, const int64_t* __restrict__ cols,
                                   const scalar_t* __restrict__ w, const double* __restrict__ gain,
                                   const double* __restrict__ shift, const double* __restrict__ slope, int64_t I,
                                   int64_t J, int64_t K, int64_t N, double* __restrict__ out) {
  const int64_t total = K * N;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = idx / N, n = idx - k * N;
    const int64_t i = rows[k], j = cols[k];
    WA_KERNEL_ASSERT(i >= 0 && i < I && j >= 0 && j < J);
    const double delta = static_cast<double>(w[k]) * static_cast<double>(a_t[j * N + n]);
    const double g = gain[i];
    out[idx] = delta == 0.0 ? 0.0
                            : leaky_delta(g * static_cast<double>(z_t[i * N + n]) + shift[i], -g * delta, slope[i]);
  }
}

at::Tensor pair_deltas_cuda(const at::Tensor& a_t, const at::Tensor& z_t, const at::Tensor& rows,
                            const at::Tensor& cols, const at::Tensor& w, const at::Tensor& gain,
                            const at::Tensor& shift, const at::Tensor& slope) {
  const PairSizes sizes = check_pair_deltas_args(a_t, z_t, rows, cols, w, gain, shift, slope);
  const int64_t I = sizes.I, J = sizes.J, N = sizes.N, K = sizes.K;
  WA_DEVICE_GUARD(a_t.device());
  auto out = WA_EMPTY({K, N}, a_t.options().dtype(at::kDouble));
  if (K == 0 || N == 0) return out;
  auto rows_c = rows.contiguous(), cols_c = cols.contiguous();
  auto a_c = a_t.contiguous(), z_c = z_t.contiguous(), w_c = w.contiguous();
  auto g_c = gain.contiguous(), s_c = shift.contiguous(), sl_c = slope.contiguous();
  const int64_t blocks = std::min<int64_t>((K * N + kThreads - 1) / kThreads, WA_MAX_BLOCKS);
  auto stream = WA_STREAM();
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "pair_deltas_cuda", [&] {
    WA_LAUNCH(pair_deltas_kernel<scalar_t>, blocks, kThreads, stream, a_c.data_ptr<scalar_t>(),
              z_c.data_ptr<scalar_t>(), rows_c.data_ptr<int64_t>(), cols_c.data_ptr<int64_t>(),
              w_c.data_ptr<scalar_t>(), g_c.data_ptr<double>(), s_c.data_ptr<double>(), sl_c.data_ptr<double>(), I,
              J, K, N, out.data_ptr<double>());
    WA_LAUNCH_CHECK();
  });
  return out;
}

// Per sample: base prediction, top-1 minus top-2 logit, and sum of p over the other classes.
__global__ void sample_stats_kernel(const double* __restrict__ l, const double* __restrict__ p, int64_t N, int64_t C,
                                    int64_t* __restrict__ top, double* __restrict__ margin,
                                    double* __restrict__ q_top) {
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x) {
    const double* ln = l + n * C;
    int64_t best = 0;
    for (int64_t c = 1; c < C; ++c)
      if (ln[c] > ln[best]) best = c;
    double second = -INFINITY, q = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      if (c == best) continue;
      second = fmax(second, ln[c]);
      q += p[n * C + c];
    }
    top[n] = best;
    margin[n] = ln[best] - second;
    q_top[n] = q;
  }
}

// KL(p || softmax(l + d v)) for one pair, as the cpu kernel's exact_kl: with m1 = E_p[v] rounded,
// t = sum_c p_c phi(d w_c) >= 0 and r = sum_c p_c w_c (rounding-sized), w = v - m1: S = t + d r,
// KL = log1p(S) - d r = t + log1p_minus(S), so the rounding of m1 does not reach the KL; *mean = m1 + r.
// l = the sample's logits, for the pairs beyond kLogSpaceMin (numerics.h's log_mean_exp).
__device__ double exact_kl_dev(const double* p, const double* l, const double* v, int64_t C, double d, double m1,
                               double range, double* mean) {
  const double x = fabs(d) * range;
  *mean = m1;
  if (x <= kLogSpaceMin) {
    double t = 0.0, r = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double w = v[c] - m1;
      t += p[c] * phi(d * w);
      r += p[c] * w;
    }
    *mean = m1 + r;
    const double s = t + d * r;
    return fabs(s) >= 0.1 ? log1p(s) - d * r : t + log1p_minus(s);
  }
  return log_mean_exp(l, v, C, d, m1, -1, 0.0);  // from the logits (the KL dwarfs the rounding of m1)
}

__device__ bool moment_kl_dev(const double* m, int64_t order, int64_t stride, double d, double vabs, double* kl) {
  const double x = fabs(d) * vabs;
  if (x > 0.5) return false;
  const double m1 = m[0], m2 = m[stride];
  const double var = m2 - m1 * m1;
  if (!(var > kMomentMinVarRatio * m2)) return false;
  double tail = 1.6487212707001282;
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

__device__ int64_t argmax_shifted_dev(const double* l, const double* v, int64_t C, double d, int64_t unit) {
  int64_t best = 0;
  double best_val = -INFINITY;
  for (int64_t c = 0; c < C; ++c) {
    const double val = v ? l[c] + d * v[c] : (c == unit ? l[c] + d : l[c]);
    if (val > best_val) best_val = val, best = c;
  }
  return best;
}

template <typename T>
__device__ T block_sum(T x, T* shared) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffff, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : T(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffff, x, off);
  return x;  // valid in thread 0
}

// One block per weight; threads stride over samples; float64 block sums.
__global__ void score_deltas_kernel(const double* __restrict__ dmat, const int64_t* __restrict__ unit,
                                    const double* __restrict__ head, const double* __restrict__ probs,
                                    const double* __restrict__ logits, const int64_t* __restrict__ labels,
                                    const double* __restrict__ moments, const int64_t* __restrict__ slot_of,
                                    int64_t order, int64_t M, int64_t U, const int64_t* __restrict__ top,
                                    const double* __restrict__ margin, const double* __restrict__ q_top, int64_t N,
                                    int64_t C, bool want_flips, double* __restrict__ out_loss,
                                    double* __restrict__ out_kl, int64_t* __restrict__ out_flips,
                                    int64_t* __restrict__ out_err, int64_t* __restrict__ out_corr,
                                    bool* __restrict__ out_nz, double* __restrict__ out_cls) {
  __shared__ double shared_d[32];
  __shared__ long long shared_i[32];
  __shared__ double s_vmin, s_vmax;
  const int64_t k = blockIdx.x;
  const int64_t i = unit[k];
  WA_KERNEL_ASSERT(i >= 0 && i < U);
  const double* v = head ? head + i * C : nullptr;
  // Simple and deterministic: thread 0 scans v once (O(C) per weight, negligible next to O(N)).
  if (threadIdx.x == 0) {
    double mn = 0.0, mxv = 1.0;
    if (v) {
      mn = mxv = v[0];
      for (int64_t c = 1; c < C; ++c) mn = fmin(mn, v[c]), mxv = fmax(mxv, v[c]);
    }
    s_vmin = mn;
    s_vmax = mxv;
  }
  __syncthreads();
  const double range = C > 1 ? s_vmax - s_vmin : 0.0;
  const double vabs = fmax(fabs(s_vmin), fabs(s_vmax));
  const int64_t slot = slot_of ? slot_of[i] : -1;
  WA_KERNEL_ASSERT(slot >= -1 && slot < M);
  double sum_loss = 0.0, sum_kl = 0.0;
  long long n_flips = 0, n_err = 0, n_corr = 0, any = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const double dd = dmat[k * N + n];
    if (dd == 0.0) continue;
    any = 1;
    const int64_t y = labels[n];
    WA_KERNEL_ASSERT(y >= 0 && y < C);
    const double* p = probs + n * C;
    double kl, dce;
    if (v) {
      double m1;
      if (slot >= 0 && moment_kl_dev(moments + slot * N + n, order, M * N, dd, vabs, &kl)) {
        m1 = moments[slot * N + n];
      } else {
        m1 = 0.0;
        for (int64_t c = 0; c < C; ++c) m1 += p[c] * v[c];
        kl = exact_kl_dev(p, logits + n * C, v, C, dd, m1, range, &m1);
      }
      dce = kl + dd * (m1 - v[y]);
    } else {
      const double pi = p[i];
      const double qi = (i == top[n] && pi > 0.5) ? q_top[n] : 1.0 - pi;
      kl = unit_needs_logits(dd, pi, qi) ? log_mean_exp(logits + n * C, nullptr, C, dd, pi, i, qi)
                                         : log1p(pi * phi(dd * qi) + qi * phi(-dd * pi));
      dce = kl + dd * (i == y ? -qi : pi);
    }
    sum_loss += dce;
    sum_kl += kl;
    if (out_cls) atomicAdd(out_cls + k * C + y, dce);
    if (want_flips && fabs(dd) * range >= margin[n]) {
      const int64_t pred = top[n], now = argmax_shifted_dev(logits + n * C, v, C, dd, i);
      if (now != pred) {
        ++n_flips;
        n_err += (pred == y);
        n_corr += (now == y);
      }
    }
  }
  sum_loss = block_sum(sum_loss, shared_d);
  sum_kl = block_sum(sum_kl, shared_d);
  n_flips = block_sum(n_flips, shared_i);
  n_err = block_sum(n_err, shared_i);
  n_corr = block_sum(n_corr, shared_i);
  any = block_sum(any, shared_i);
  if (threadIdx.x == 0) {
    out_loss[k] = sum_loss;
    out_kl[k] = sum_kl;
    out_flips[k] = n_flips;
    out_err[k] = n_err;
    out_corr[k] = n_corr;
    out_nz[k] = any > 0;
  }
}

ScoreOutputs score_deltas_cuda(
    const at::Tensor& d, const at::Tensor& unit, const std::optional<at::Tensor>& head, const at::Tensor& probs,
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& moments,
    const std::optional<at::Tensor>& moment_slot, bool want_flips, bool by_class) {
  const ScoreSizes sizes = check_score_deltas_args(d, unit, head, probs, logits, labels, moments, moment_slot);
  const int64_t K = sizes.K, N = sizes.N, C = sizes.C, U = sizes.U, order = sizes.order, M = sizes.M;
  const bool has_head = sizes.has_head, has_moments = sizes.has_moments;
  WA_DEVICE_GUARD(d.device());
  if (K == 0 || N == 0) return zero_score_outputs(d, C, by_class);
  auto opts = d.options();
  auto class_loss = at::zeros({K, by_class ? C : 0}, opts);  // accumulated by atomicAdd
  TORCH_CHECK(K <= INT_MAX, "score_deltas: at most ", INT_MAX, " weights per call (one block each)");
  // each block writes every output of its weight: no memset
  auto dloss = WA_EMPTY({K}, opts), dkl = WA_EMPTY({K}, opts);
  auto flips = WA_EMPTY({K}, opts.dtype(at::kLong)), new_err = WA_EMPTY({K}, opts.dtype(at::kLong)),
       new_corr = WA_EMPTY({K}, opts.dtype(at::kLong));
  auto nonzero = WA_EMPTY({K}, opts.dtype(at::kBool));
  auto d_c = d.contiguous(), unit_c = unit.contiguous(), p_c = probs.contiguous(), l_c = logits.contiguous(),
       y_c = labels.contiguous();
  at::Tensor head_c, mom_c, slot_c;
  if (has_head) head_c = head->contiguous();
  if (has_moments) {
    mom_c = moments->contiguous();
    slot_c = moment_slot->contiguous();
  }
  auto top = WA_EMPTY({N}, opts.dtype(at::kLong));
  auto margin = WA_EMPTY({N}, opts), q_top = WA_EMPTY({N}, opts);
  auto stream = WA_STREAM();
  WA_LAUNCH(sample_stats_kernel, std::min<int64_t>((N + kThreads - 1) / kThreads, WA_MAX_BLOCKS), kThreads, stream,
            l_c.data_ptr<double>(), p_c.data_ptr<double>(), N, C, top.data_ptr<int64_t>(), margin.data_ptr<double>(),
            q_top.data_ptr<double>());
  WA_LAUNCH_CHECK();
  WA_LAUNCH(score_deltas_kernel, K, kThreads, stream,
      d_c.data_ptr<double>(), unit_c.data_ptr<int64_t>(), has_head ? head_c.data_ptr<double>() : nullptr,
      p_c.data_ptr<double>(), l_c.data_ptr<double>(), y_c.data_ptr<int64_t>(),
      has_moments ? mom_c.data_ptr<double>() : nullptr, has_moments ? slot_c.data_ptr<int64_t>() : nullptr, order, M, U,
      top.data_ptr<int64_t>(), margin.data_ptr<double>(), q_top.data_ptr<double>(), N, C, want_flips,
      dloss.data_ptr<double>(), dkl.data_ptr<double>(), flips.data_ptr<int64_t>(), new_err.data_ptr<int64_t>(),
      new_corr.data_ptr<int64_t>(), nonzero.data_ptr<bool>(), by_class ? class_loss.data_ptr<double>() : nullptr);
  WA_LAUNCH_CHECK();
  return {dloss, dkl, flips, new_err, new_corr, nonzero, class_loss};
}


// ------------------------------------------------------------------------------------------------
// fused_scores: pair_deltas and score_deltas in one pass, d never stored (the design of
// csrc/cpu/fused_cpu.cpp, with the same certificate and flip test). One thread per weight walks
// every sample with its sums in registers (no atomics: a thread owns its weight's outputs). The
// inputs are read sample-major (a_nj = a_t^T), so a warp's threads, consecutive weights of one row,
// read consecutive inputs and share every per-(unit, sample) value (u, moments, sample stats).

constexpr int kFusedNear = 4;              // fused_cpu.cpp: kNear
constexpr double kFusedFlipSlack = 1e-12;  // kFlipSlack
constexpr double kFusedMinQ = 1e-200;      // kMinQ

struct FusedDev {
  const void *a_nj, *z_t, *w;  // scalar_t: (N, J), (I, N), (K,)
  const int64_t *rows, *cols, *labels, *slot;
  const double *gain, *shift, *slope, *head, *probs, *logits, *moments, *gap;
  const double *range, *vmin, *vmax;  // per unit
  const int64_t *top, *near;          // per sample: base prediction, (N, kFusedNear) next classes (-1: none)
  const double *q, *gaps;             // per sample: 1 - p_top, (N, kFusedNear + 1) gaps less the slack
  int64_t I, J, K, N, C, M, D;
  bool flips;
  double *loss, *kl, *cls;
  int64_t *nflips, *err, *corr, *exact, *active;
};

__device__ inline double fused_leaky_d(double wk, double a, double u, double g, double sl) {
  const double delta = wk * a;
  const double du = -g * delta, up = u + du;
  const double su = sl * u, sup = sl * up, sdu = sl * du;
  const bool pos = u > 0, pos_up = up > 0;
  const double mixed = (pos_up ? up : sup) - (pos ? u : su);
  return pos == pos_up ? (pos ? du : sdu) : mixed;
}

// fused_cpu.cpp: exact_pair ({dCE, KL} by the O(C) loop about m1 = E_p v).
__device__ inline void fused_exact_pair(const double* p, const double* l, const double* v, int64_t C, int64_t y,
                                        double d, double range, double& dce, double& kl) {
  double m1 = 0.0;
  for (int64_t c = 0; c < C; ++c) m1 += p[c] * v[c];
  const double gap = m1 - v[y];
  if (fabs(d) * range <= 30.0) {
    double t = 0.0, r = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double w = v[c] - m1;
      t += p[c] * phi(d * w);
      r += p[c] * w;
    }
    const double s = t + d * r;
    double lse;
    if (fabs(s) >= 0.1) {
      lse = log1p(s), kl = lse - d * r;
    } else {
      const double lm = log1p_minus(s);
      lse = s + lm, kl = t + lm;
    }
    dce = lse + d * gap;
    return;
  }
  const double lse = log_mean_exp(l, v, C, d, m1, -1, 0.0);
  dce = lse + d * gap, kl = lse;
}

__device__ inline int64_t fused_argmax(const double* l, const double* v, int64_t C, double d, int64_t unit) {
  int64_t best = 0;
  double best_val = -INFINITY;
  for (int64_t c = 0; c < C; ++c) {
    const double val = v ? l[c] + d * v[c] : (c == unit ? l[c] + d : l[c]);
    if (val > best_val) best_val = val, best = c;
  }
  return best;
}

template <typename scalar_t>
__global__ void fused_scores_kernel(FusedDev a) {
  const double inv_fact[10] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
                               1.0 / 362880};
  const auto* a_nj = static_cast<const scalar_t*>(a.a_nj);
  const auto* z_t = static_cast<const scalar_t*>(a.z_t);
  const auto* w = static_cast<const scalar_t*>(a.w);
  const int64_t N = a.N, C = a.C, D = a.D, M = a.M;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < a.K; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = a.rows[k], j = a.cols[k];
    WA_KERNEL_ASSERT(i >= 0 && i < a.I && j >= 0 && j < a.J);
    const double g = a.gain[i], sh = a.shift[i], sl = a.slope[i], rg = a.range[i];
    const double* v = a.head ? a.head + i * C : nullptr;
    const int64_t slot = (a.moments && v) ? a.slot[i] : -1;
    WA_KERNEL_ASSERT(slot >= -1 && slot < M);
    const double wk = static_cast<double>(w[k]);
    const double vs = kFusedFlipSlack * 2.0 * fmax(fabs(a.vmin[i]), fabs(a.vmax[i]));
    double sum_loss = 0.0, sum_kl = 0.0;
    int64_t n_flips = 0, n_err = 0, n_corr = 0, n_exact = 0, n_active = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double u = g * static_cast<double>(z_t[i * N + n]) + sh;
      const double d = fused_leaky_d(wk, static_cast<double>(a_nj[n * a.J + j]), u, g, sl);
      if (d == 0.0) continue;
      ++n_active;
      const int64_t y = a.labels[n];
      WA_KERNEL_ASSERT(y >= 0 && y < C);
      const double* pn = a.probs + n * C;
      const double* ln = a.logits + n * C;
      double dce, klv;
      if (!v) {  // logits layer (v = e_i): score_deltas' O(1) form
        const double pi = pn[i];
        const double qi = (i == a.top[n] && pi > 0.5) ? a.q[n] : 1.0 - pi;
        klv = unit_needs_logits(d, pi, qi) ? log_mean_exp(ln, nullptr, C, d, pi, i, qi)
                                           : log1p(pi * phi(d * qi) + qi * phi(-d * pi));
        dce = klv + d * (i == y ? -qi : pi);
      } else {
        bool done = false;
        if (slot >= 0) {  // fused_cpu.cpp: certificate, then the series about the top class
          const double q = a.q[n];
          const double m1 = a.moments[slot * N + n], m2 = a.moments[(M + slot) * N + n];
          const double var = m2 - m1 * m1;
          const bool gate = q == 0.0 || (q > kFusedMinQ && var >= kMomentMinVarRatio * 4.0 * q * rg * rg);
          const int64_t E = D % 2 == 0 ? D : D - 1;
          const double muE = a.moments[((E - 1) * M + slot) * N + n];
          double rE = 1.0;
          for (int64_t t = 0; t < E; ++t) rE *= rg;
          const double mu_bound = fmax(muE, 0.0) + static_cast<double>(C + 2 * E + 4) * 4.4e-16 * (1 << E) * q * rE;
          double rest = 1.0;
          for (int64_t t = E; t <= D; ++t) rest *= rg;
          const double tc = fmin(q * rE * rest, mu_bound * rest) * (exp(1.5) * inv_fact[D + 1]);
          const double cap = gate ? kMomentCertTol * 0.5 * var : -1.0;
          const double ad = fabs(d), x = ad * rg, d2 = d * d;
          double dp = ad;
          for (int64_t t = 0; t < D; ++t) dp *= ad;
          if (x <= 0.5 && dp * tc <= d2 * cap) {
            double h = a.moments[((D - 1) * M + slot) * N + n] * inv_fact[D];
            for (int64_t t = D - 2; t >= 1; --t) h = fma(h, d, a.moments[(t * M + slot) * N + n] * inv_fact[t + 1]);
            const double s2 = d2 * h, sm = fma(d, m1, s2);
            klv = s2 + log1p_minus(sm);
            dce = fma(d, a.gap[slot * N + n], klv);
            done = true;
          }
        }
        if (!done) {
          fused_exact_pair(pn, ln, v, C, y, d, rg, dce, klv);
          ++n_exact;
        }
      }
      sum_loss += dce, sum_kl += klv;
      if (a.cls) a.cls[k * C + y] += dce;
      if (a.flips) {  // fused_cpu.cpp: the flip test on the kFusedNear next classes, a range bound for the rest
        bool cand;
        const double slack = fabs(d) * vs;
        const double* gn = a.gaps + n * (kFusedNear + 1);
        if (v) {
          const double vt = v[a.top[n]];
          cand = (d > 0 ? d * (a.vmax[i] - vt) : -d * (vt - a.vmin[i])) + slack >= gn[kFusedNear];
          for (int t = 0; t < kFusedNear; ++t) {
            const int64_t c = a.near[n * kFusedNear + t];
            cand = cand || (c >= 0 && fma(d, v[c] - vt, slack) >= gn[t]);
          }
        } else {
          cand = fabs(d) * rg + slack >= gn[0];
        }
        if (cand) {
          const int64_t pred = a.top[n], now = fused_argmax(ln, v, C, d, i);
          if (now != pred) {
            ++n_flips;
            n_err += pred == y;
            n_corr += now == y;
          }
        }
      }
    }
    a.loss[k] = sum_loss, a.kl[k] = sum_kl;
    a.nflips[k] = n_flips, a.err[k] = n_err, a.corr[k] = n_corr, a.exact[k] = n_exact, a.active[k] = n_active;
  }
}

FusedOutputs fused_scores_cuda(const at::Tensor& a_t, const at::Tensor& z_t, const at::Tensor& rows,
                               const at::Tensor& cols, const at::Tensor& w, const at::Tensor& gain,
                               const at::Tensor& shift, const at::Tensor& slope, const std::optional<at::Tensor>& head,
                               const at::Tensor& probs, const at::Tensor& logits, const at::Tensor& labels,
                               const std::optional<at::Tensor>& moments, const std::optional<at::Tensor>& mean_gap,
                               const std::optional<at::Tensor>& moment_slot, bool want_flips, bool by_class) {
  const FusedSizes sz = check_fused_args(a_t, z_t, rows, cols, w, gain, shift, slope, head, probs, logits, labels,
                                         moments, mean_gap, moment_slot);
  WA_DEVICE_GUARD(a_t.device());
  FusedOutputs out = zero_fused_outputs(a_t, sz.K, sz.C, by_class);
  if (sz.K == 0 || sz.N == 0) return out;
  TORCH_CHECK(!sz.has_head || sz.U == sz.I, "fused_scores: head has ", sz.U, " rows for ", sz.I, " units");
  auto& [dloss, dkl, flips, new_err, new_corr, nonzero, class_loss, exact, active] = out;
  const int64_t N = sz.N, C = sz.C;
  auto f64 = probs.options();
  auto a_nj = a_t.t().contiguous(), z_c = z_t.contiguous(), w_c = w.contiguous(), rows_c = rows.contiguous(),
       cols_c = cols.contiguous(), y_c = labels.contiguous(), p_c = probs.contiguous(), l_c = logits.contiguous(),
       g_c = gain.contiguous(), s_c = shift.contiguous(), sl_c = slope.contiguous();
  // per sample (tensor ops on the device): the top class (first maximum, as argmax), q = 1 - p_top
  // summed over the other classes, the kFusedNear next classes by logit and the gaps to them and to
  // the next one, less fused_cpu.cpp's slack
  auto top = l_c.argmax(1);
  auto q = p_c.scatter(1, top.unsqueeze(1), 0.0).sum(1);
  auto near = at::full({N, kFusedNear}, -1, f64.dtype(at::kLong));
  auto gaps = at::full({N, kFusedNear + 1}, INFINITY, f64);
  const int64_t k_next = std::min<int64_t>(C - 1, kFusedNear + 1);
  if (k_next > 0) {
    auto rest = l_c.scatter(1, top.unsqueeze(1), -INFINITY);
    auto [vals, idx] = rest.topk(k_next, 1);
    auto slack = l_c.abs().amax(1, true).mul(kFusedFlipSlack).add(kFusedFlipSlack);
    gaps.narrow(1, 0, k_next).copy_(l_c.gather(1, top.unsqueeze(1)).sub(vals).sub(slack));
    const int64_t k_near = std::min<int64_t>(k_next, kFusedNear);
    near.narrow(1, 0, k_near).copy_(idx.narrow(1, 0, k_near));
  }
  at::Tensor head_c, vmin, vmax, range, mom_c, gap_c, slot_c;
  if (sz.has_head) {
    head_c = head->contiguous();
    vmin = head_c.amin(1), vmax = head_c.amax(1);
    range = C > 1 ? vmax.sub(vmin) : at::zeros_like(vmin);
  } else {
    vmin = at::zeros({sz.I}, f64), vmax = at::ones({sz.I}, f64), range = at::full({sz.I}, C > 1 ? 1.0 : 0.0, f64);
  }
  if (sz.has_moments) mom_c = moments->contiguous(), gap_c = mean_gap->contiguous(), slot_c = moment_slot->contiguous();
  top = top.contiguous(), q = q.contiguous();
  FusedDev args{a_nj.data_ptr(), z_c.data_ptr(), w_c.data_ptr(), rows_c.data_ptr<int64_t>(), cols_c.data_ptr<int64_t>(),
                y_c.data_ptr<int64_t>(), sz.has_moments ? slot_c.data_ptr<int64_t>() : nullptr, g_c.data_ptr<double>(),
                s_c.data_ptr<double>(), sl_c.data_ptr<double>(), sz.has_head ? head_c.data_ptr<double>() : nullptr,
                p_c.data_ptr<double>(), l_c.data_ptr<double>(), sz.has_moments ? mom_c.data_ptr<double>() : nullptr,
                sz.has_moments ? gap_c.data_ptr<double>() : nullptr, range.data_ptr<double>(), vmin.data_ptr<double>(),
                vmax.data_ptr<double>(), top.data_ptr<int64_t>(), near.data_ptr<int64_t>(), q.data_ptr<double>(),
                gaps.data_ptr<double>(), sz.I, sz.J, sz.K, N, C, sz.M, sz.has_moments ? sz.order : 2, want_flips,
                dloss.data_ptr<double>(), dkl.data_ptr<double>(), by_class ? class_loss.data_ptr<double>() : nullptr,
                flips.data_ptr<int64_t>(), new_err.data_ptr<int64_t>(), new_corr.data_ptr<int64_t>(),
                exact.data_ptr<int64_t>(), active.data_ptr<int64_t>()};
  auto stream = WA_STREAM();
  const int64_t blocks = std::min<int64_t>((sz.K + kThreads - 1) / kThreads, WA_MAX_BLOCKS);
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "fused_scores_cuda", [&] {
    WA_LAUNCH(fused_scores_kernel<scalar_t>, blocks, kThreads, stream, args);
    WA_LAUNCH_CHECK();
  });
  nonzero.copy_(active.gt(0));
  return out;
}

}  // namespace

}  // namespace weightablate

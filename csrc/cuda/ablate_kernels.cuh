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

#include <climits>

#include "../numerics.h"
#include "../op_args.h"

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

}  // namespace

}  // namespace weightablate

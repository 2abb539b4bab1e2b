// Stage 1 on the CPU: the per-(weight, sample) change d of the head's input unit.
#pragma GCC optimize("fp-contract=off")  // bit-identical to the PyTorch reference: no fused multiply-adds
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../numerics.h"
#include "../op_args.h"
#include "clones.h"

namespace weightablate {
namespace {

// leaky_delta(g z + s, -g delta, slope) of numerics.h with selects instead of branches, so the
// sample loop vectorises (with -fno-trapping-math on AVX2); the same operations on the same values,
// hence bit-identical.
template <typename scalar_t>
WA_INLINE void pair_deltas_rows_impl(const scalar_t* a_t, const scalar_t* z_t, const int64_t* rows,
                                     const int64_t* cols, const scalar_t* w, const double* gain, const double* shift,
                                     const double* slope, int64_t n_samples, int64_t begin, int64_t end, double* out) {
  for (int64_t k = begin; k < end; ++k) {
    const int64_t i = rows[k];
    const scalar_t* a = a_t + cols[k] * n_samples;
    const scalar_t* z = z_t + i * n_samples;
    const double wk = static_cast<double>(w[k]), g = gain[i], s = shift[i], sl = slope[i];
    double* d = out + k * n_samples;
#pragma omp simd
    for (int64_t n = 0; n < n_samples; ++n) {
      // A float32 product is exact in float64.
      const double delta = wk * static_cast<double>(a[n]);
      const double u = g * static_cast<double>(z[n]) + s, du = -g * delta, up = u + du;
      const double su = sl * u, sup = sl * up, sdu = sl * du;  // every product up front: no branch
      const bool pos = u > 0, pos_up = up > 0;
      const double mixed = (pos_up ? up : sup) - (pos ? u : su);  // the two terms have the same sign
      const double r = pos == pos_up ? (pos ? du : sdu) : mixed;
      d[n] = delta == 0.0 ? 0.0 : r;
    }
  }
}

WA_CLONES void pair_deltas_rows(const float* a_t, const float* z_t, const int64_t* rows, const int64_t* cols,
                                const float* w, const double* gain, const double* shift, const double* slope,
                                int64_t n_samples, int64_t begin, int64_t end, double* out) {
  pair_deltas_rows_impl(a_t, z_t, rows, cols, w, gain, shift, slope, n_samples, begin, end, out);
}

WA_CLONES void pair_deltas_rows(const double* a_t, const double* z_t, const int64_t* rows, const int64_t* cols,
                                const double* w, const double* gain, const double* shift, const double* slope,
                                int64_t n_samples, int64_t begin, int64_t end, double* out) {
  pair_deltas_rows_impl(a_t, z_t, rows, cols, w, gain, shift, slope, n_samples, begin, end, out);
}

at::Tensor pair_deltas_cpu(const at::Tensor& a_t, const at::Tensor& z_t, const at::Tensor& rows,
                           const at::Tensor& cols, const at::Tensor& w, const at::Tensor& gain,
                           const at::Tensor& shift, const at::Tensor& slope) {
  const PairSizes sizes = check_pair_deltas_args(a_t, z_t, rows, cols, w, gain, shift, slope);
  const int64_t I = sizes.I, J = sizes.J, N = sizes.N, K = sizes.K;
  auto out = at::empty({K, N}, a_t.options().dtype(at::kDouble));
  if (K == 0 || N == 0) return out;
  auto rows_c = rows.contiguous(), cols_c = cols.contiguous();
  TORCH_CHECK(rows_c.min().item<int64_t>() >= 0 && rows_c.max().item<int64_t>() < I, "pair_deltas: rows out of range");
  TORCH_CHECK(cols_c.min().item<int64_t>() >= 0 && cols_c.max().item<int64_t>() < J, "pair_deltas: cols out of range");
  auto a_c = a_t.contiguous(), z_c = z_t.contiguous(), w_c = w.contiguous();
  auto g_c = gain.contiguous(), s_c = shift.contiguous(), sl_c = slope.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "pair_deltas_cpu", [&] {
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      pair_deltas_rows(a_c.data_ptr<scalar_t>(), z_c.data_ptr<scalar_t>(), rows_c.data_ptr<int64_t>(),
                                 cols_c.data_ptr<int64_t>(), w_c.data_ptr<scalar_t>(), g_c.data_ptr<double>(),
                                 s_c.data_ptr<double>(), sl_c.data_ptr<double>(), N, begin, end,
                                 out.data_ptr<double>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightablate, CPU, m) { m.impl("pair_deltas", &pair_deltas_cpu); }

}  // namespace weightablate

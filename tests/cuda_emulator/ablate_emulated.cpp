// csrc/cuda/ablate_kernels.cuh compiled for the host emulator and registered as
// weightablate_emulated::{pair_deltas, score_deltas, fused_scores} on CPU tensors (tests/test_cuda_emulated.py
// defines those ops with the real ops' schemas before loading this library). Small blocks and a
// capped grid make every launch take the multi-warp reductions and the grid-stride loops.
#include <torch/library.h>

#include "emulator.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>

// New buffers start as garbage a test can see: NaN, INT64_MIN, true.
inline at::Tensor poisoned(at::Tensor t) {
  if (t.is_floating_point()) return t.fill_(std::numeric_limits<double>::quiet_NaN());
  if (t.scalar_type() == at::kBool) return t.fill_(true);
  return t.fill_(std::numeric_limits<int64_t>::min());
}

#define WA_EMPTY(...) poisoned(at::empty(__VA_ARGS__))
#define WA_THREADS 64
#define WA_MAX_BLOCKS 3
#define WA_DEVICE_GUARD(device) (void)(device)
#define WA_STREAM() 0
#define WA_LAUNCH(kernel, blocks, threads, stream, ...) \
  ((void)(stream), emu::launch((blocks), (threads), [&] { kernel(__VA_ARGS__); }))
#define WA_LAUNCH_CHECK() (void)0

#include "../../csrc/cuda/ablate_kernels.cuh"

TORCH_LIBRARY_IMPL(weightablate_emulated, CPU, m) {
  m.impl("pair_deltas", &weightablate::pair_deltas_cuda);
  m.impl("score_deltas", &weightablate::score_deltas_cuda);
  m.impl("fused_scores", &weightablate::fused_scores_cuda);
}

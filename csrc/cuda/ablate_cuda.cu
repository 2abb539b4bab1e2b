// The two ops on the GPU: the kernels and launchers of ablate_kernels.cuh (shared with the host
// emulator of the CPU test suite) bound to the CUDA runtime, and registered for CUDA tensors.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#define WA_DEVICE_GUARD(device) const c10::cuda::CUDAGuard device_guard(device)
#define WA_STREAM() c10::cuda::getCurrentCUDAStream()
#define WA_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<(blocks), (threads), 0, (stream)>>>(__VA_ARGS__)
#define WA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

#include "ablate_kernels.cuh"

namespace weightablate {

TORCH_LIBRARY_IMPL(weightablate, CUDA, m) {
  m.impl("pair_deltas", &pair_deltas_cuda);
  m.impl("score_deltas", &score_deltas_cuda);
  m.impl("fused_scores", &fused_scores_cuda);
}

}  // namespace weightablate

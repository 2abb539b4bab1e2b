// A small host emulator of the CUDA built-ins the kernels in csrc/cuda use, so the CPU test
// suite runs that exact kernel source: each block's threads are fibers (ucontext) on one OS
// thread, switched at __syncthreads and warp shuffles. Blocks run one after another, so
// __shared__ variables can be statics. It is strict where a GPU is undefined: a barrier that not
// every thread of the block (or warp) reaches, a partial shuffle mask or a failed kernel assert
// stops the launch with an error instead of hanging or reading out of bounds.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};

// One OS thread runs every fiber, so the built-ins are plain globals the scheduler sets.
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __shared__ static

namespace emu {

struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned tid = 0;
  bool done = false;
  const Barrier* waiting = nullptr;
  uint64_t wait_generation = 0;
};

struct Runtime {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::function<void()> body;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_lanes;  // 32 slots per warp for shuffles
  std::string failure;
};

inline Runtime* runtime = nullptr;
constexpr size_t kStackBytes = 128 << 10;

inline void fiber_entry() {
  runtime->body();
  runtime->current->done = true;  // uc_link returns to the scheduler
}

inline void yield_to_scheduler() { swapcontext(&runtime->current->ctx, &runtime->scheduler); }

inline void wait(Barrier& b) {
  if (++b.arrived == b.expected) {  // the last one in releases the others and runs on
    b.arrived = 0;
    ++b.generation;
    return;
  }
  runtime->current->waiting = &b;
  runtime->current->wait_generation = b.generation;
  yield_to_scheduler();
}

// Stops the calling thread's kernel for good; the launch then throws.
[[noreturn]] inline void fail(const std::string& what) {
  if (runtime->failure.empty()) runtime->failure = what;
  runtime->current->done = true;
  yield_to_scheduler();
  __builtin_unreachable();
}

// kernel<<<blocks, threads>>>(...): `body` is the kernel call with its arguments bound.
inline void launch(int64_t blocks, int64_t threads, std::function<void()> body) {
  if (blocks < 1 || blocks > INT32_MAX || threads < 1 || threads > 1024)
    throw std::runtime_error("emulated launch: invalid configuration " + std::to_string(blocks) + " blocks x " +
                             std::to_string(threads) + " threads");
  Runtime rt;
  Runtime* outer = runtime;
  runtime = &rt;
  rt.body = std::move(body);
  rt.fibers.resize(threads);
  const unsigned warps = (threads + 31) / 32;
  rt.block_barrier.expected = threads;
  rt.warp_barriers.resize(warps);
  for (unsigned w = 0; w < warps; ++w) rt.warp_barriers[w].expected = std::min<unsigned>(32, threads - 32 * w);
  rt.warp_lanes.assign(32 * warps, 0);
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  gridDim = {static_cast<unsigned>(blocks), 1, 1};
  for (auto& f : rt.fibers) f.stack.resize(kStackBytes);
  for (int64_t b = 0; b < blocks && rt.failure.empty(); ++b) {
    blockIdx = {static_cast<unsigned>(b), 0, 0};
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = rt.fibers[t];
      f.tid = t;
      f.done = false;
      f.waiting = nullptr;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &rt.scheduler;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    for (bool left = true; left && rt.failure.empty();) {
      left = false;
      bool ran = false;
      for (auto& f : rt.fibers) {
        if (f.done) continue;
        left = true;
        if (f.waiting && f.waiting->generation == f.wait_generation) continue;
        f.waiting = nullptr;
        rt.current = &f;
        threadIdx = {f.tid, 0, 0};
        swapcontext(&rt.scheduler, &f.ctx);
        ran = true;
        if (!rt.failure.empty()) break;
      }
      if (left && !ran && rt.failure.empty())
        rt.failure = "a __syncthreads or warp shuffle was not reached by every thread of block " + std::to_string(b);
    }
  }
  runtime = outer;
  if (!rt.failure.empty()) throw std::runtime_error("emulated kernel: " + rt.failure);
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::runtime->block_barrier); }

template <typename T>
T __shfl_down_sync(unsigned mask, T x, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
  if (mask != 0xffffffffu) emu::fail("__shfl_down_sync with a partial mask");
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t* lanes = emu::runtime->warp_lanes.data() + 32 * warp;
  std::memcpy(lanes + lane, &x, sizeof(T));
  emu::wait(emu::runtime->warp_barriers[warp]);
  T out = x;
  if (lane + delta < emu::runtime->warp_barriers[warp].expected) std::memcpy(&out, lanes + lane + delta, sizeof(T));
  emu::wait(emu::runtime->warp_barriers[warp]);  // nobody overwrites a lane before all have read
  return out;
}

inline double atomicAdd(double* address, double value) {  // one OS thread: a plain add is atomic
  const double old = *address;
  *address = old + value;
  return old;
}

#define WA_KERNEL_ASSERT(cond) \
  if (!(cond)) emu::fail("assertion `" #cond "` failed in block " + std::to_string(blockIdx.x))

// CPU-only: compile a hot function once per instruction set, picked at load time (AVX-512 here,
// AVX2 or SSE elsewhere). Put it on the outer kernel function only: helpers it calls are inlined
// into each clone (a clone on a helper would make every call indirect and never inlined).
// x86-64-v3 = AVX2 + FMA: fused multiply-adds in the series (GNU C++ contracts a * b + c by default).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WA_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"), noinline))
#else
#define WA_CLONES
#endif

#if defined(__GNUC__)
#define WA_INLINE inline __attribute__((always_inline))
#else
#define WA_INLINE inline
#endif

// Rare branches, kept out of line so that the hot loops around them compile as if they were absent.
#if defined(__GNUC__)
#define WA_COLD __attribute__((noinline, cold))
#else
#define WA_COLD
#endif

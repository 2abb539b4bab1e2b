"""Throughput (weights/second) of weightablate's three backends, side by side, in one run.

    make bench        # or: .venv/bin/python -m pytest benchmarks -q --benchmark-columns=min,median,max,rounds

Backends: "naive" (zero the weight, evaluate the whole dataset, restore), "torch" (the pure-PyTorch
reference of the two ops) and "cpu" (the compiled kernels). Each times one whole
``weightablate.ablate`` call (capture included) and divides the number of weights by the median
time. The naive loop, and the torch reference where it is slow, time a subset of the weights
(see ``selection``); the subset of the torch reference keeps whole rows of the cpu selection, so
that each ablated unit has as many chosen weights as in the cpu run and both take the same
moment/exact paths.

Before the cpu kernel is timed, a guard (not timed) checks that its result equals the torch
reference on the torch reference's subset to 1e-9 relative, and after timing that the timed
result agrees with it too: a broken kernel is never timed as fast.
"""
from __future__ import annotations

import time

import pytest
import torch

import weightablate as wa
from bench_workloads import WORKLOADS, Workload
from conftest import RESULTS, record_run

BACKENDS = ("naive", "torch", "cpu")
ROUNDS = {"naive": 3, "torch": 3, "cpu": 5}
WARMUP = {"naive": 1, "torch": 0, "cpu": 1}
# Rows of the cpu selection that the torch reference times (None: all of it).
TORCH_ROWS = {"digits": 32, "alexnet": 1024}
GUARD_TOL = 1e-9
MATMUL_SIZE = 2048

_cache: dict = {}


def workload(name: str) -> Workload:
    if name not in _cache:
        _cache[name] = WORKLOADS[name]()
    return _cache[name]


def _flat(wl: Workload, weights) -> torch.Tensor:
    from weightablate.selection import select_weights

    return select_weights(weights, tuple(wl.model.get_submodule(wl.layer).weight.shape), 0)


def selection(wl: Workload, backend: str) -> torch.Tensor:
    """1-D flat indices the backend is timed on."""
    if backend == "naive":
        return wl.weights_naive
    flat = _flat(wl, wl.weights_fast)
    rows_limit = TORCH_ROWS.get(wl.name) if backend == "torch" else None
    if rows_limit is not None:
        n_in = wl.model.get_submodule(wl.layer).weight.shape[1]
        flat = flat[flat // n_in < rows_limit]
    return flat


def run(wl: Workload, weights, backend: str):
    return wa.ablate(wl.model, wl.layer, wl.data, weights, backend=backend, progress=False)


GUARD_FLOOR = 1e-6  # relative errors are taken against max(|delta|, GUARD_FLOOR * max |delta|)


def _rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = GUARD_FLOOR) -> float:
    """max_k |a_k - b_k| / max(|b_k|, floor * max|b|): relative to each weight's own delta, except
    for deltas a million times smaller than the largest one, where float64 rounding of the
    per-sample terms (~1e-16 of the largest) is all that differs (e.g. a KL of 4e-13 next to 7e-4
    agrees to ~2e-9 between the kernel and the reference, in either mode)."""
    scale = torch.clamp(b.abs(), min=1e-300 + floor * b.abs().max().item())
    return ((a - b).abs() / scale).max().item()


def compare(cpu, ref) -> dict:
    return {"max_rel_err": max(_rel_err(cpu.delta_loss, ref.delta_loss), _rel_err(cpu.delta_kl, ref.delta_kl)),
            "max_rel_err_unfloored": max(_rel_err(cpu.delta_loss, ref.delta_loss, 0.0),
                                         _rel_err(cpu.delta_kl, ref.delta_kl, 0.0)),
            "flips_equal": bool(torch.equal(cpu.flips, ref.flips) and torch.equal(cpu.new_errors, ref.new_errors)
                                and torch.equal(cpu.new_correct, ref.new_correct)),
            "exact_zero_equal": bool(torch.equal(cpu.exact_zero, ref.exact_zero))}


def guard(wl: Workload) -> dict:
    """cpu == torch (1e-9 relative, flips identical) on the torch reference's subset; not timed."""
    if wl.name in RESULTS["guards"]:
        return RESULTS["guards"][wl.name]
    sub = selection(wl, "torch")
    ref = _cache.get((wl.name, "torch_result")) or run(wl, sub, "torch")
    cpu = run(wl, sub, "cpu")
    g = {"weights": sub.numel(), "tol": GUARD_TOL, **compare(cpu, ref)}
    g["ok"] = g["max_rel_err"] <= GUARD_TOL and g["flips_equal"] and g["exact_zero_equal"]
    RESULTS["guards"][wl.name] = g
    _cache[(wl.name, "cpu_guard_result")] = (sub, cpu)
    return g


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_rate(benchmark, dtype):
    """The machine's matmul rate, the 'peak' of the arithmetic limit."""
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=g, dtype=dt)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=g, dtype=dt)
    times = []

    def mm():
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)

    benchmark.group = "matmul"
    benchmark.pedantic(mm, rounds=7, warmup_rounds=2, iterations=1)
    times = times[2:] or times  # drop the warm-up calls (none with --benchmark-disable)
    flops = 2 * MATMUL_SIZE**3
    RESULTS["matmul_gflops"][dtype] = flops / min(times) / 1e9
    RESULTS["matmul_gflops"][dtype + "_median"] = flops / sorted(times)[len(times) // 2] / 1e9
    benchmark.extra_info["gflops_best"] = RESULTS["matmul_gflops"][dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_throughput(benchmark, name, backend):
    wl = workload(name)
    weights = selection(wl, backend)
    # the cpu kernel is timed on the user's own call (weights=4096 / None): selection included
    arg = wl.weights_fast if backend == "cpu" else weights
    if backend == "cpu":
        g = guard(wl)
        assert g["ok"], f"cpu kernel disagrees with the torch reference on {name}: {g}"
    times = []

    def call():
        t = time.perf_counter()
        out = run(wl, arg, backend)
        times.append(time.perf_counter() - t)
        return out

    benchmark.group = name
    out = benchmark.pedantic(call, rounds=ROUNDS[backend], warmup_rounds=WARMUP[backend], iterations=1)
    times = times[WARMUP[backend]:] or times  # --benchmark-disable: one call, no warm-up
    k = weights.numel()
    extra = {}
    if backend == "cpu":  # the part of the user's call spent choosing the weights (weights=int)
        sel = []
        for _ in range(3):
            t = time.perf_counter()
            _flat(wl, wl.weights_fast)
            sel.append(time.perf_counter() - t)
        extra["select_weights_s"] = sorted(sel)[1]
    entry = record_run(name, backend, k, times, evaluations=k + 1 if backend == "naive" else None,
                       samples=wl.X.shape[0], description=wl.description, **extra)
    benchmark.extra_info.update({"weights": k, "weights_per_s": entry["weights_per_s"],
                                 "weights_per_s_raw": entry["weights_per_s_raw"],
                                 "weights_per_s_best": entry["weights_per_s_best"], **extra})
    if backend == "torch":
        _cache[(name, "torch_result")] = out
    if backend == "cpu":
        assert torch.equal(out.indices, weights)
        # the timed result agrees with the guarded one on the guard's subset (same kernel, same paths)
        sub, guarded = _cache[(name, "cpu_guard_result")]
        pos = torch.searchsorted(out.indices, sub)
        assert torch.equal(out.indices[pos], sub)
        for key in ("delta_loss", "delta_kl"):
            assert _rel_err(getattr(out, key)[pos], getattr(guarded, key)) <= GUARD_TOL
        assert torch.equal(out.flips[pos], guarded.flips)
        from bench_limits import arithmetic_limit
        from profile_cpu import timed_stages

        # where the time goes (not part of the timed rounds): medians of 3 instrumented calls
        RESULTS["stages"][name] = timed_stages(lambda: run(wl, arg, backend), 3)

        lim = arithmetic_limit(wl, weights, RESULTS["matmul_gflops"])
        if lim is not None:
            lim["measured_median_s"] = entry["median_s"]
            lim["fraction_of_peak"] = lim["time_at_peak_s"] / entry["median_s"]
            RESULTS["limits"][name] = lim
            benchmark.extra_info["time_at_peak_s"] = lim["time_at_peak_s"]

"""Where the time of the cpu path goes: wall-clock timers around the stages of ``closed_form.ClosedForm``.

    .venv/bin/python benchmarks/profile_cpu.py [alexnet|digits] [--repeats 3] [--torch-profiler]

Wraps (by monkeypatching, read-only for the library) ``capture``, ``_moments``,
``ops.pair_deltas`` and ``ops.score_deltas`` (and the set-up: ``select_weights``, ``_check_model``,
``choose_method``) with timers, runs ``ablate(..., backend="cpu")`` a few
times and prints the median seconds of each stage, the rest ("other": planning, log_softmax,
transposes, accumulation) and the total. ``--torch-profiler`` also prints torch.profiler's top ops.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import weightablate as wa  # noqa: E402
from weightablate import api, closed_form, ops  # noqa: E402
from bench_workloads import WORKLOADS  # noqa: E402

STAGES = {"select_weights": (api, "select_weights"), "check_model": (api, "_check_model"),
          "choose_method": (api, "choose_method"), "capture": (closed_form, "capture"), "moments": (closed_form, "_moments"),
          "pair_deltas": (ops, "pair_deltas"), "score_deltas": (ops, "score_deltas")}


def timed_stages(fn, repeats: int):
    acc = defaultdict(list)
    originals = {k: getattr(mod, attr) for k, (mod, attr) in STAGES.items()}
    current = defaultdict(float)

    def wrap(key, f):
        def inner(*args, **kwargs):
            t = time.perf_counter()
            out = f(*args, **kwargs)
            current[key] += time.perf_counter() - t
            return out
        return inner

    try:
        for key, (mod, attr) in STAGES.items():
            setattr(mod, attr, wrap(key, originals[key]))
        for _ in range(repeats):
            current.clear()
            t = time.perf_counter()
            fn()
            total = time.perf_counter() - t
            for key in STAGES:
                acc[key].append(current[key])
            acc["other"].append(total - sum(current[k] for k in STAGES))
            acc["total"].append(total)
    finally:
        for key, (mod, attr) in STAGES.items():
            setattr(mod, attr, originals[key])
    return {k: statistics.median(v) for k, v in acc.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload", nargs="?", default="alexnet", choices=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", default="auto")
    p.add_argument("--torch-profiler", action="store_true")
    args = p.parse_args()
    wl = WORKLOADS[args.workload]()

    def fn():
        return wa.ablate(wl.model, wl.layer, wl.data, wl.weights_fast, backend="cpu", mode=args.mode, progress=False)

    fn()  # warm-up
    med = timed_stages(fn, args.repeats)
    print(f"{wl.description}; backend=cpu mode={args.mode}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} runs")
    for k in (*STAGES, "other", "total"):
        print(f"  {k:<15} {med[k] * 1e3:9.1f} ms  {100 * med[k] / med['total']:5.1f}%")
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

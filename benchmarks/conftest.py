"""Shared state of the benchmark session and the summary printed at its end.

Each benchmark records its median/min seconds and weights/second into ``RESULTS``; at the end of
the session ``pytest_terminal_summary`` prints, per workload, the throughput of each backend, the
ratios cpu/naive, cpu/torch and torch/naive (from medians), the issue's targets, and the
arithmetic limit of the AlexNet head. With ``WEIGHTABLATE_BENCH_JSON=path`` set, the same
summary is also written to that JSON file.

``WEIGHTABLATE_BENCH_THREADS=n`` sets torch's intra-op threads for the session (default: torch's
own default, the number of cores).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("WEIGHTABLATE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["WEIGHTABLATE_BENCH_THREADS"]))

# The targets on the 2-core reference machine: (workload, numerator, denominator) -> ratio.
TARGETS = {("alexnet", "cpu", "naive"): 1000.0, ("digits", "cpu", "naive"): 200.0,
           ("alexnet", "cpu", "torch"): 20.0, ("digits", "cpu", "torch"): 20.0}
RATIOS = (("cpu", "naive"), ("cpu", "torch"), ("torch", "naive"))

RESULTS: dict = {"runs": {}, "matmul_gflops": {}, "limits": {}, "guards": {}, "stages": {}}


def record_run(workload: str, backend: str, n_weights: int, seconds: list[float], evaluations: int | None = None,
               **extra) -> dict:
    """evaluations: for the naive loop, the number of full evaluations per call (K + 1: the base
    one too); its throughput is then counted per ablated weight's evaluation, K / (t K / (K + 1)),
    which is what the loop would reach on many weights (this favours naive, never the kernel)."""
    med = statistics.median(seconds)
    per_weight = n_weights / evaluations if evaluations else 1.0
    entry = {"workload": workload, "backend": backend, "weights": n_weights, "rounds": len(seconds),
             "median_s": med, "min_s": min(seconds), "max_s": max(seconds),
             "weights_per_s_raw": n_weights / med,
             "weights_per_s": n_weights / (med * per_weight),
             "weights_per_s_best": n_weights / (min(seconds) * per_weight), **extra}
    RESULTS["runs"][(workload, backend)] = entry
    return entry


def _machine() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512f": " avx512f" in flags, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _summary() -> dict:
    runs = RESULTS["runs"]
    workloads = sorted({w for w, _ in runs})
    table = {}
    for w in workloads:
        row = {"weights_per_s": {b: runs[(w, b)]["weights_per_s"] for b in ("naive", "torch", "cpu") if (w, b) in runs},
               "weights_timed": {b: runs[(w, b)]["weights"] for b in ("naive", "torch", "cpu") if (w, b) in runs},
               "median_s": {b: runs[(w, b)]["median_s"] for b in ("naive", "torch", "cpu") if (w, b) in runs},
               "ratios": {}, "targets": {}}
        for num, den in RATIOS:
            if (w, num) in runs and (w, den) in runs:
                r = runs[(w, num)]["weights_per_s"] / runs[(w, den)]["weights_per_s"]
                row["ratios"][f"{num}/{den}"] = r
                target = TARGETS.get((w, num, den))
                if target is not None:
                    row["targets"][f"{num}/{den}"] = {"target": target, "met": r >= target}
        table[w] = row
    return {"machine": _machine(), "workloads": table, "matmul_gflops": RESULTS["matmul_gflops"],
            "arithmetic_limit": RESULTS["limits"], "guards": RESULTS["guards"], "cpu_stages_s": RESULTS["stages"],
            "runs": [dict(v) for v in runs.values()]}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS["runs"] and not RESULTS["matmul_gflops"]:
        return
    s = _summary()
    tr = terminalreporter
    tr.section("weightablate throughput (weights/s, from medians)")
    m = s["machine"]
    tr.write_line(f"{m['cpu_model']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
                  f"load average at end {m['loadavg_at_end']}")
    if s["matmul_gflops"]:
        tr.write_line("torch.matmul: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in s["matmul_gflops"].items()))
    hdr = f"{'workload':<9} {'naive':>11} {'torch':>11} {'cpu':>11} {'cpu/naive':>10} {'cpu/torch':>10} {'torch/naive':>12}"
    tr.write_line(hdr)
    for w, row in s["workloads"].items():
        wps = row["weights_per_s"]
        cells = [f"{wps[b]:11.4g}" if b in wps else f"{'-':>11}" for b in ("naive", "torch", "cpu")]
        rat = [f"{row['ratios'][k]:{width}.4g}" if k in row["ratios"] else f"{'-':>{width}}"
               for k, width in (("cpu/naive", 10), ("cpu/torch", 10), ("torch/naive", 12))]
        tr.write_line(f"{w:<9} " + " ".join(cells) + " " + " ".join(rat))
    for w, row in s["workloads"].items():
        for k, t in row["targets"].items():
            tr.write_line(f"target {w} {k} >= {t['target']:g}x: {'MET' if t['met'] else 'NOT MET'} "
                          f"({row['ratios'][k]:.4g}x)")
    for w, row in s["workloads"].items():
        run = RESULTS["runs"].get((w, "cpu"), {})
        sel = run.get("select_weights_s")
        if sel and sel > 0.05 * run["median_s"]:
            wps = run["weights"] / (run["median_s"] - sel)
            extra = ", ".join(f"{wps / row['weights_per_s'][b]:.4g}x {b}" for b in ("naive", "torch")
                              if b in row["weights_per_s"])
            tr.write_line(f"{w}: select_weights takes {sel * 1e3:.0f} ms of the cpu call's {run['median_s'] * 1e3:.0f} ms; "
                          f"without it the cpu path would do {wps:.4g} weights/s ({extra})")
    for w, lim in s["arithmetic_limit"].items():
        tr.write_line(f"arithmetic limit, {w} cpu path: {lim['time_at_peak_s'] * 1e3:.1f} ms at peak "
                      f"(capture {lim['capture_s_at_peak'] * 1e3:.1f}, moments {lim['moments_s_at_peak'] * 1e3:.1f}, "
                      f"pairs {lim['pairs_s_at_peak'] * 1e3:.1f}) vs {lim['measured_median_s'] * 1e3:.1f} ms measured "
                      f"= {lim['fraction_of_peak'] * 100:.1f}% of peak")
    for w, st in s["cpu_stages_s"].items():
        tr.write_line(f"cpu stages, {w} (ms, medians of 3 instrumented calls): "
                      + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in st.items()))
    for w, g in s["guards"].items():
        tr.write_line(f"guard {w}: cpu vs torch on {g['weights']} weights, max rel err {g['max_rel_err']:.2e} "
                      f"(tol {g['tol']:.0e}; without the 1e-6 floor {g['max_rel_err_unfloored']:.2e}), "
                      f"flips equal: {g['flips_equal']}, exact_zero equal: {g['exact_zero_equal']}")
    path = os.environ.get("WEIGHTABLATE_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(s, f, indent=2, default=str)
        tr.write_line(f"written to {path}")


@pytest.fixture(scope="session")
def results():
    return RESULTS

"""Cross-check of the pytest-benchmark ratios that is robust to a shared, noisy machine.

    .venv/bin/python benchmarks/interleaved.py [--rounds 5] [--threads N] [--json out.json]

pytest-benchmark times one backend after the other, so a burst of load from other processes
lands on one backend only and skews its ratio to the others. Here every round runs naive, torch
and cpu back to back on the same workload (the same selections as test_throughput.py) and the
ratios are taken within each round; the script prints the medians over rounds of the throughputs
and of the per-round ratios, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_workloads import WORKLOADS  # noqa: E402
from test_throughput import TORCH_ROWS, run, selection, workload  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torch-rows-alexnet", type=int, default=256,
                   help="rows of the 4096-weight selection the torch reference times (default 256: ~260 weights)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    TORCH_ROWS["alexnet"] = args.torch_rows_alexnet
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "loadavg_before": os.getloadavg(),
           "workloads": {}}
    for name in WORKLOADS:
        wl = workload(name)
        sel = {b: selection(wl, b) for b in ("naive", "torch", "cpu")}
        call_arg = {"naive": sel["naive"], "torch": sel["torch"], "cpu": wl.weights_fast}
        for b in sel:  # warm-up
            run(wl, call_arg[b] if b != "torch" else sel["torch"][:8], b)
        wps = {b: [] for b in sel}
        for _ in range(args.rounds):
            for b in sel:
                t = time.perf_counter()
                run(wl, call_arg[b], b)
                dt = time.perf_counter() - t
                k = sel[b].numel()
                # naive: K + 1 evaluations per call (the base one too); count per ablated weight
                wps[b].append(k / (dt * k / (k + 1)) if b == "naive" else k / dt)
        ratios = {f"{a}/{c}": statistics.median(x / y for x, y in zip(wps[a], wps[c]))
                  for a, c in (("cpu", "naive"), ("cpu", "torch"), ("torch", "naive"))}
        out["workloads"][name] = {"weights": {b: sel[b].numel() for b in sel},
                                  "weights_per_s": {b: statistics.median(v) for b, v in wps.items()},
                                  "ratios_median_of_rounds": ratios}
        r = out["workloads"][name]
        print(f"{name:<8} " + "  ".join(f"{b} {r['weights_per_s'][b]:.4g} w/s ({r['weights'][b]} weights)"
                                        for b in sel)
              + "  |  " + "  ".join(f"{k} {v:.4g}x" for k, v in ratios.items()), flush=True)
    out["loadavg_after"] = os.getloadavg()
    print(f"threads {out['threads']}, load average before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

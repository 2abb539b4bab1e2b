"""Scale: peak memory against the dataset's length, and 2 processes (torchrun, gloo) against 1.

    python benchmarks/bench_scale.py                 # N = 5,000 and 50,000; throughput on 10,000
    python benchmarks/bench_scale.py --n 2000 --throughput-n 2000    # a quick look

Workload: an MLP 512-1024-256-1000 (1000 classes, like ImageNet) with random weights, the 256x1024
Linear "2" ablated for K = 4096 weights drawn with seed 0, over a synthetic DataLoader whose
samples are generated on the fly (so the dataset itself never sits in memory, as with images
read from disk), batches of 500.

* Memory: each N runs in a fresh subprocess; ``peak_rss`` is ru_maxrss (resource.getrusage) at
  the end, ``base_rss`` the resident size just before ``ablate`` (torch, the model, the loader).
  Flat peak for 10x the samples = streaming works.
* Throughput: 1 process with 1 and with 2 threads against ``torchrun --nproc_per_node=2`` (gloo,
  1 thread each; the weights are split across the ranks), the time of the ``ablate`` call itself
  (the slowest rank's), best of ``--repeats`` interleaved runs. Results are checked equal (float64
  rounding).
Writes benchmarks/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
K, BATCH, LAYER = 4096, 500, "2"


def build():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1000)).eval()


class Synthetic:
    """A map-style dataset of N samples generated from their index (nothing is stored)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        g = torch.Generator().manual_seed(i)
        return torch.randn(512, generator=g), int(torch.randint(0, 1000, (1,), generator=g))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(n: int, out: str | None) -> None:
    import torch

    import weightablate as wa
    from weightablate.distributed import is_main, world

    if os.environ.get("WORLD_SIZE", "1") != "1":
        torch.distributed.init_process_group("gloo")
    model = build()
    loader = torch.utils.data.DataLoader(Synthetic(n), batch_size=BATCH)
    base = rss_mib()
    started = time.perf_counter()
    result = wa.ablate(model, LAYER, loader, weights=K, progress=False)
    seconds = time.perf_counter() - started
    rank, size = world()
    if size > 1:  # the slowest rank's time
        t = torch.tensor([seconds], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        seconds = float(t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if is_main():
        if out:
            result.save(out)
        print(json.dumps({"n": n, "procs": size, "threads": torch.get_num_threads(), "seconds": seconds,
                          "base_rss_mib": base, "peak_rss_mib": peak, "n_samples": result.n_samples}), flush=True)
    if size > 1:
        torch.distributed.destroy_process_group()


def run(cmd, env=None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000, help="the small N (the large one is 10x)")
    parser.add_argument("--throughput-n", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.save)
        return
    import torch

    import weightablate as wa

    me = [sys.executable, str(Path(__file__).resolve())]
    memory = [run(me + ["--worker", str(n)], {"OMP_NUM_THREADS": "2"}) for n in (args.n, 10 * args.n)]
    for m in memory:
        print(f"N={m['n']:>7}: {m['seconds']:7.1f} s, RSS before ablate {m['base_rss_mib']:.1f} MiB, "
              f"peak {m['peak_rss_mib']:.1f} MiB", flush=True)
    tmp = HERE / ".scale-tmp"
    tmp.mkdir(exist_ok=True)
    n = str(args.throughput_n)
    configs = {  # name: (command, environment)
        "1 process x 1 thread": (me + ["--worker", n], {"OMP_NUM_THREADS": "1"}),
        "1 process x 2 threads": (me + ["--worker", n, "--save", str(tmp / "one.npz")], {"OMP_NUM_THREADS": "2"}),
        "2 processes x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"] + me[1:] + ["--worker", n, "--save", str(tmp / "two.npz")],
                                   {"OMP_NUM_THREADS": "1"}),
    }
    times = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved, best of: the machine is shared and noisy
        for name, (cmd, env) in configs.items():
            times[name].append(run(cmd, env)["seconds"])
    a, b = wa.load(tmp / "one.npz"), wa.load(tmp / "two.npz")
    same = torch.equal(a.flips, b.flips) and torch.allclose(a.delta_loss, b.delta_loss, rtol=1e-12, atol=0)
    best = {name: min(t) for name, t in times.items()}
    throughput = {name: {"seconds": t, "best_s": best[name], "pairs_per_s": K * args.throughput_n / best[name]}
                  for name, t in times.items()}
    ratio = best["1 process x 2 threads"] / best["2 processes x 1 thread"]
    for name in configs:
        print(f"N={n}, K={K}, {name}: best {best[name]:.2f} s of {[round(t, 2) for t in times[name]]}")
    print(f"2 processes / 1 process x 2 threads: {ratio:.2f}x; "
          f"2 processes / 1 process x 1 thread: {best['1 process x 1 thread'] / best['2 processes x 1 thread']:.2f}x; "
          f"results equal: {same}")
    record = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "K": K, "batch": BATCH, "memory": memory,
              "throughput": {**throughput, "speedup_vs_1x2": ratio, "results_equal": same}}
    (HERE / "scale.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()

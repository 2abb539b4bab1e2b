"""Any layer: the funnel and replay methods side by side with the naive loop, same samples, one run.

    .venv/bin/python -m pytest benchmarks/test_any_layer_speed.py -q -s --benchmark-columns=min,median,max,rounds

Workloads (randomly initialised torchvision models, BatchNorm with non-trivial running statistics,
N = 16 random 224x224 images, labels uniform in [0, 1000)):

* alexnet-features.10: AlexNet's last conv through replay (the changed channel reaches
  classifier.1 as 36 columns: a low-rank product), K = 256 weights vs 3 for naive;
* resnet18-layer3.0.conv1: replay through the rest of layer3 and layer4, K = 32 vs 3;
* resnet18-layer4.1.conv2: the channel funnel, K = 4096 vs 3.

Each round times one whole ``weightablate.ablate`` call (capture, dispatch and scoring included).
The naive loop does K + 1 evaluations (the base one too) and is counted per ablated weight,
K / (t K/(K+1)) (this favours naive). Before timing, a guard (not timed) runs both methods on 2
weights with precision="float64" and requires the same delta_loss to 1e-6 relative and the same
flips: a wrong fast path is never timed as fast. At the end the summary prints weights/s and the
ratios, and writes them as JSON when WEIGHTABLATE_BENCH_JSON_ANY=path is set.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
import torchvision

import weightablate as wa

N, SIZE = 16, 224
# workload -> (model factory, layer, expected method, K fast, K naive, target ratio)
WORKLOADS = {
    "alexnet-features.10": ("alexnet", "features.10", "replay", 256, 3, 10.0),
    "resnet18-layer3.0.conv1": ("resnet18", "layer3.0.conv1", "replay", 32, 3, 2.0),
    "resnet18-layer4.1.conv2": ("resnet18", "layer4.1.conv2", "funnel", 4096, 3, 100.0),
}
ROUNDS = {"naive": 2, "fast": 3}
RESULTS: dict = {}
_models: dict = {}


def model(name):
    if name not in _models:
        torch.manual_seed(0)
        m = getattr(torchvision.models, name)().eval()
        g = torch.Generator().manual_seed(1)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
        _models[name] = m
    return _models[name]


def data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randint(0, 1000, (N,), generator=g)


def _timed(fn, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_any_layer_speed(benchmark, workload):
    name, layer, method, k_fast, k_naive, target = WORKLOADS[workload]
    m, (X, y) = model(name), data()
    # guard: the fast path equals the naive loop in float64 on two weights
    two = torch.tensor([0, m.get_submodule(layer).weight.numel() // 2 + 7])
    fast64 = wa.ablate(m, layer, (X, y), two, precision="float64", progress=False)
    naive64 = wa.ablate(m, layer, (X, y), two, precision="float64", backend="naive", progress=False)
    assert fast64.method == method
    scale = naive64.delta_loss.abs().clamp_min(1e-12)
    assert ((fast64.delta_loss - naive64.delta_loss).abs() <= 1e-6 * scale).all()
    assert torch.equal(fast64.flips, naive64.flips)

    idx = torch.randperm(m.get_submodule(layer).weight.numel(), generator=torch.Generator().manual_seed(3))
    t_naive, _ = _timed(lambda: wa.ablate(m, layer, (X, y), idx[:k_naive], backend="naive", progress=False),
                        ROUNDS["naive"])
    res = benchmark.pedantic(lambda: wa.ablate(m, layer, (X, y), idx[:k_fast], progress=False),
                             rounds=ROUNDS["fast"], iterations=1)
    assert res.method == method
    t_fast = benchmark.stats.stats.data
    naive_wps = (k_naive + 1) / statistics.median(t_naive)
    fast_wps = k_fast / statistics.median(t_fast)
    RESULTS[workload] = {"method": method, "k_fast": k_fast, "k_naive": k_naive, "samples": N, "size": SIZE,
                         "naive_w_per_s": naive_wps, "fast_w_per_s": fast_wps, "ratio": fast_wps / naive_wps,
                         "target": target, "naive_s": t_naive, "fast_s": list(t_fast),
                         "threads": torch.get_num_threads()}
    benchmark.extra_info.update(RESULTS[workload])


def test_any_layer_summary():
    """Not a timing: prints (and optionally writes) the table of the runs above."""
    if not RESULTS:
        pytest.skip("no any-layer benchmark ran")
    print("\nany layer: weights/s (median), same samples")
    for w, r in RESULTS.items():
        met = "met" if r["ratio"] >= r["target"] else "NOT met"
        print(f"  {w:26s} {r['method']:7s} naive {r['naive_w_per_s']:8.3f}  fast {r['fast_w_per_s']:9.2f}  "
              f"ratio {r['ratio']:8.1f}x  (target >= {r['target']:g}x: {met})")
    path = os.environ.get("WEIGHTABLATE_BENCH_JSON_ANY")
    if path:
        with open(path, "w") as fh:
            json.dump({"runs": RESULTS, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}, fh, indent=1)

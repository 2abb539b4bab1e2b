"""What the self-check (ablate's verify=True, the default) costs: the same call with verify on and
off, interleaved, on the benchmark workloads and on a ResNet-18 conv (funnel) and a mid-network
conv (replay). Prints the median of each and the ratio.

    python benchmarks/bench_verify.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightablate as wa  # noqa: E402
from bench_workloads import alexnet_head_workload, digits_workload  # noqa: E402


def resnet(layer: str, n: int = 16, weights: int = 256):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    X, y = torch.randn(n, 3, 64, 64), torch.randint(0, 10, (n,))
    return f"resnet18 {layer} ({weights} weights, {n} images)", model, layer, (X, y), weights


def cases():
    d, a = digits_workload(), alexnet_head_workload()
    yield f"digits fc2 (all {d.n_weights(None)} weights, {len(d.y)} samples)", d.model, d.layer, d.data, None
    yield f"alexnet fc2 ({a.n_weights(4096)} weights, {len(a.y)} samples)", a.model, a.layer, a.data, 4096
    yield resnet("layer4.1.conv2")
    yield resnet("layer4.1.conv2", n=64, weights=16384)
    yield resnet("layer3.0.conv1", weights=64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{'workload':58s} {'method':>11s} {'verify off':>11s} {'verify on':>10s} {'cost':>7s} {'check':>7s}")
    for label, model, layer, data, weights in cases():
        times, checks = {False: [], True: []}, []
        for _ in range(args.repeats):
            for verify in (False, True):
                start = time.perf_counter()
                r = wa.ablate(model, layer, data, weights, progress=False, verify=verify)
                times[verify].append(time.perf_counter() - start)
                if verify:
                    checks.append(float(r.extra["self_check"].split(" in ")[1].split(" s")[0]))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{label:58s} {r.method:>11s} {off:10.3f}s {on:9.3f}s {100 * (on - off) / off:6.1f}% "
              f"{statistics.median(checks):6.3f}s")


if __name__ == "__main__":
    main()

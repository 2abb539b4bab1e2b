"""Structured ablation (structure="out") side by side with the naive remove-evaluate-restore loop.

  AlexNet head: all 4,096 output units of FC2 (4096x4096) -> ReLU -> FC3 (4096x1000), N = 1,000
  ResNet-18 (torchvision, random weights, seed 0): all 512 output channels of layer4.1.conv2, N images

The naive loop removes a unit physically (its row/filter and bias zeroed, for the ResNet also its
BatchNorm channel bn2: the residual add then sees zero from it), evaluates the whole model on all
samples and restores; it is timed on a few units and extrapolated to all of them (labelled so).
Its losses (float32, like the model) are also compared with ablate's on those units: the float32
loop's own rounding dominates that difference (README "Accuracy").

    PYTHONPATH=. python benchmarks/bench_structured.py [--images 64] [--naive-units 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import weightablate as wa
from bench_workloads import alexnet_head_workload


def naive(model, X, y, units, remove):
    """(seconds per unit, delta_loss per unit) of zero-evaluate-restore, float32 like the model."""
    with torch.no_grad():
        ce0 = F.cross_entropy(model(X), y, reduction="none")
        out, started = [], time.perf_counter()
        for k in units:
            saved = remove(k)
            try:
                ce = F.cross_entropy(model(X), y, reduction="none")
            finally:
                for p, v in saved:
                    p.data.copy_(v)
            out.append((ce - ce0).double().sum().item())
    return (time.perf_counter() - started) / len(units), torch.tensor(out, dtype=torch.float64)


def zero(*params_and_index):
    """Zero entry k of each parameter; returns what to restore."""
    saved = []
    for p, k in params_and_index:
        saved.append((p, p.data.clone()))
        p.data[k] = 0
    return saved


def report(name, n_units, res, per_unit, naive_dl, units):
    import re

    fast = res.seconds
    check = float(re.search(r"in ([0-9.]+) s", res.extra["self_check"]).group(1))
    naive_all = per_unit * n_units
    rel = ((res.delta_loss[units] - naive_dl).abs() / naive_dl.abs().clamp(min=1e-12)).max().item()
    print(f"| {name} | {n_units} | {res.method} | {fast:.2f} s ({check:.2f} s of it the self-check) | "
          f"{per_unit:.3f} s x {n_units} = {naive_all:.0f} s (extrapolated from {len(units)} units) | "
          f"**{naive_all / fast:.0f}x** | {rel:.1e} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--naive-units", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | units | method | ablate, all units (incl. self-check) | naive loop | speed-up "
          "| max rel. diff (naive units) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")

    w = alexnet_head_workload(n_samples=1000)
    fc2 = w.model[0]
    res = wa.ablate(w.model, "0", w.data, structure="out", progress=False)
    units = torch.linspace(0, 4095, args.naive_units).long().tolist()
    per_unit, dl = naive(w.model, w.X, w.y, units, lambda k: zero((fc2.weight, k), (fc2.bias, k)))
    report("AlexNet head FC2, N=1000", 4096, res, per_unit, dl, units)

    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=1000).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    X = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 1000, (args.images,), generator=torch.Generator().manual_seed(2))
    block = net.layer4[1]
    res = wa.ablate(net, "layer4.1.conv2", (X, y), structure="branch", progress=False)  # meets the residual add
    units = torch.linspace(0, 511, args.naive_units).long().tolist()
    per_unit, dl = naive(net, X, y, units, lambda k: zero((block.conv2.weight, k), (block.bn2.weight, k),
                                                          (block.bn2.bias, k)))
    report(f"ResNet-18 layer4.1.conv2, N={args.images} (224x224)", 512, res, per_unit, dl, units)
    print(f"ResNet head: {res.head}")


if __name__ == "__main__":
    main()

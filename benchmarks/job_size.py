"""How big a job can I run: measured (weight, sample) pairs per second per method and layer type.

    .venv/bin/python benchmarks/job_size.py                 # CPU, all torch threads
    .venv/bin/python benchmarks/job_size.py --threads 1

Each workload is one whole ablate() call (capture and scoring, default max_memory) on seeded random
torchvision weights and random inputs (no downloads); pairs/s = weights x samples / seconds. The
estimate the CLI prints (weightablate.estimate, a timed chunk of the first batch) is shown next to
the measured time, to see how far off it is. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch

WORKLOADS = [
    # name, layer type, model, layer, weights, samples, image size
    ("digits MLP fc2", "Linear, hidden (closed form: piecewise)", "digits", "fc2", None, 540, None),
    ("resnet18 fc", "Linear, logits (closed form: logits)", "resnet18", "fc", None, 64, 64),
    ("alexnet classifier.4", "Linear, hidden (closed form: piecewise)", "alexnet", "classifier.4", 4096, 64, 64),
    ("resnet18 layer4.1.conv2", "Conv2d 3x3, last block (funnel)", "resnet18", "layer4.1.conv2", 4096, 64, 64),
    ("resnet18 layer3.0.conv1", "Conv2d 3x3, middle (replay)", "resnet18", "layer3.0.conv1", 64, 32, 64),
    ("mobilenet_v3_small features.4.block.1.0", "Conv2d 5x5 depthwise (replay)", "mobilenet_v3_small",
     "features.4.block.1.0", 64, 32, 64),
]


def build(model_name, samples, size):
    if model_name == "digits":
        from weightablate import digits as dg

        model = dg.digits_model(0, cache=True)
        X, y = dg.load_digits_split(0)[2:]
        return model, (X[:samples], y[:samples])
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=100).eval()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(samples, 3, size, size, generator=g), torch.randint(0, 100, (samples,), generator=g))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", help="substring of the workload names to run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import weightablate as wa
    from weightablate.estimate import estimate
    from weightablate.memory import keep_freed_memory

    keep_freed_memory()  # as the command line does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu\n")
    print("| workload | layer type | method | weights x samples | seconds | pairs/s | estimate |")
    print("|---|---|---|---|---|---|---|")
    for name, kind, model_name, layer, k, samples, size in WORKLOADS:
        if args.only and args.only not in name:
            continue
        model, (X, y) = build(model_name, samples, size)
        bs = 1024 if size is None else 32
        est = estimate(model, layer, (X[:bs], y[:bs]), X.shape[0], k)
        started = time.perf_counter()
        r = wa.ablate(model, layer, (X, y), weights=k, batch_size=bs, progress=False)
        seconds = time.perf_counter() - started
        pairs = len(r) * r.n_samples
        print(f"| {name} | {kind} | {r.method} | {len(r):,} x {r.n_samples:,} | {seconds:.2f} | "
              f"{pairs / seconds:,.0f} | {est.seconds:.2f} s |", flush=True)


if __name__ == "__main__":
    main()

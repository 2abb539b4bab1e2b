"""Does a bigger --max-memory ever make a run slower? Time, peak RSS and page faults per budget.

    .venv/bin/python benchmarks/bench_memory.py                       # replay: mobilenet_v3_small depthwise conv
    .venv/bin/python benchmarks/bench_memory.py --model resnet18 --layer layer4.1.conv2   # funnel

Each budget runs in a fresh subprocess (so the peak RSS and the page-fault count are its own):
torchvision model with seeded random weights, N random images, K weights of the layer, cpu backend,
one torch thread. The sweep's own time (AblationResult.seconds) is reported, plus the chunk size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch, torchvision
import weightablate as wa
from weightablate.sweep import sweep as _sweep
import weightablate.api as api
model_name, layer, n, size, k, budget, keep, uncapped = sys.argv[1:9]
if uncapped == "1":  # as before the CPU cap: chunks sized by max_memory alone
    import weightablate.replay
    weightablate.replay.CPU_REPLAY_BYTES = 1 << 62
if keep == "1":
    from weightablate.memory import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.get_model(model_name, weights=None, num_classes=10).eval()
g = torch.Generator().manual_seed(1)
X, y = torch.randn(int(n), 3, int(size), int(size), generator=g), torch.randint(0, 10, (int(n),), generator=g)
steps = []
def spy(method, stream, K, **kw):  # record the chunk size the method picks
    real = method.chunk_size
    method.chunk_size = lambda n, m: steps.append(real(n, m)) or steps[-1]
    return _sweep(method, stream, K, **kw)
api.sweep = spy
before = resource.getrusage(resource.RUSAGE_SELF)
res = wa.ablate(model, layer, (X, y), weights=int(k), backend="cpu", max_memory=budget, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": res.seconds, "method": res.method, "chunk": steps[0],
                  "maxrss_mb": after.ru_maxrss / 1024, "minflt": after.ru_minflt - before.ru_minflt,
                  "delta_loss_sum": float(res.delta_loss.sum())}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_small")
    p.add_argument("--layer", default="features.4.block.1.0")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--weights", type=int, default=480)
    p.add_argument("--budgets", default="32MiB,128MB,512MiB,1GiB,4GiB")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--keep-freed", action="store_true", help="call memory.keep_freed_memory() as the CLI does")
    p.add_argument("--uncapped", action="store_true", help="no CPU_REPLAY_BYTES cap (the chunk sizing before it)")
    args = p.parse_args()
    print(f"{args.model} {args.layer}: {args.weights} weights x {args.samples} images {args.size}x{args.size}, "
          f"cpu, 1 thread{', keep_freed_memory()' if args.keep_freed else ''}"
          f"{', uncapped' if args.uncapped else ''}")
    print(f"{'max_memory':>10} {'method':>8} {'chunk':>6} {'seconds':>8} {'peak RSS MB':>12} {'page faults':>12}")
    for budget in args.budgets.split(","):
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, args.layer, str(args.samples),
                                  str(args.size), str(args.weights), budget, str(int(args.keep_freed)),
                                  str(int(args.uncapped))], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{budget:>10} {r['method']:>8} {r['chunk']:>6} {r['seconds']:8.2f} {r['maxrss_mb']:12.0f} "
                  f"{r['minflt']:12d}", flush=True)


if __name__ == "__main__":
    main()

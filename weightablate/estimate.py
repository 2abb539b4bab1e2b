"""How long a sweep will take and how much memory it needs, before it runs.

The method ablate would pick scores a growing chunk of weights on the first batch (after a warm-up
chunk) until one chunk takes PROBE_SECONDS (or reaches the chunk size of the run); the time per (weight, sample) pair of
that chunk, plus the capture time per sample, scaled to every weight and sample, is the estimate.
Planning (one traced capture) and the self-check (verify=True, a few float64 forwards of 8 samples)
are added as fixed costs. Small chunks amortise less than the run's, so the scoring part errs on the
long side; data loading is not in it, and a machine whose load changes makes any estimate move."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .dispatch import choose_method
from .memory import check_max_memory
from .model_copy import copy_model
from .progress import duration
from .selection import select_weights
from .sweep import make_batch

PROBE_SECONDS = 0.3
CHECK_SAMPLE_FORWARDS = 2 * 5 * 8  # the self-check's float64 forwards (about twice float32's cost), per sample
SUMS_BYTES_PER_WEIGHT = 8 + 8 + 8 * 3 + 1  # delta_loss, delta_kl, three int64 counts, exact_zero


@dataclass
class Estimate:
    method: str
    description: str
    n_weights: int
    n_samples: int
    chunk: int  # weights per chunk in the run
    probe_weights: int  # weights of the timed chunk
    probe_samples: int
    probe_seconds: float
    capture_seconds: float  # of the first batch
    seconds: float  # expected for every weight and sample
    scratch_bytes: int  # the budget (max_memory) a chunk's scratch stays within
    sums_bytes: int
    model_bytes: int

    @property
    def pairs(self) -> int:
        return self.n_weights * self.n_samples

    def text(self) -> str:
        rate = self.probe_weights * self.probe_samples / max(self.probe_seconds, 1e-9)
        return (f"estimate: method {self.method}; {self.n_weights:,} weights x {self.n_samples:,} samples = "
                f"{self.pairs:,} pairs; a chunk of {self.probe_weights} weights x {self.probe_samples} samples took "
                f"{self.probe_seconds:.3g} s ({rate:,.0f} pairs/s) -> about {duration(self.seconds)} in all "
                f"(without data loading); memory: scratch within {_mb(self.scratch_bytes)} (chunks of "
                f"{self.chunk:,} weights), running sums {_mb(self.sums_bytes)}, model {_mb(self.model_bytes)}")


def _mb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def estimate(model: nn.Module, layer: str, first_batch, n_samples: int, weights=None, *, seed: int = 0,
             backend: str = "auto", mode: str = "auto", precision: str = "model", max_memory=None,
             by_class: bool = False, param: str = "weight", method: str = "auto") -> Estimate:
    """The expected time and memory of ``ablate(model, layer, data, weights, ...)`` over ``n_samples``
    samples, from ``first_batch`` = (inputs, labels) of the data (on the model's device)."""
    max_memory = check_max_memory(max_memory)
    target = model.get_submodule(layer)
    tensor = getattr(target, param)
    n_in = tensor[0].numel() if param == "weight" else 1
    flat = select_weights(weights, (tensor.shape[0], n_in), seed)
    device = tensor.device
    x, y = first_batch
    x, y = x.to(device), y.to(device=device, dtype=torch.int64)
    run = model
    if precision == "float64" and tensor.dtype != torch.float64:
        run, x = copy_model(model, torch.float64), x.double()
    elif tensor.dtype in (torch.float16, torch.bfloat16):
        run, x = copy_model(model, torch.float32), x.float()
    resolved = ops.resolve_backend(backend, device)
    K = flat.numel()
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    training = {m: m.training for m in run.modules()}
    run.eval()
    try:
        with torch.no_grad():
            if resolved == "naive":  # K + 1 forwards of the data
                started = time.perf_counter()
                logits = run(x)
                per_sample = (time.perf_counter() - started) / x.shape[0]
                return Estimate("naive", "zero, evaluate, restore", K, n_samples, 1, 1, x.shape[0],
                                per_sample * x.shape[0], per_sample * x.shape[0], per_sample * (K + 1) * n_samples,
                                0, K * SUMS_BYTES_PER_WEIGHT, model_bytes)
            scorer = choose_method(run, layer, run.get_submodule(layer), param, flat, x, resolved, mode, True,
                                   by_class, method)
            started = time.perf_counter()
            scorer.prepare(x, y)  # the first capture also plans (traces): time a second one
            plan = time.perf_counter() - started
            started = time.perf_counter()
            logits = scorer.prepare(x, y)
            batch, _ = make_batch(logits, y, None)
            capture = time.perf_counter() - started
            step = min(scorer.chunk_size(batch.n, max_memory), K)
            scorer.score(batch, slice(0, 1))  # warm-up: first-call allocations and kernel choices
            w = 1
            while True:
                started = time.perf_counter()
                scorer.score(batch, slice(0, w))
                probe = time.perf_counter() - started
                if probe >= PROBE_SECONDS or w >= step:
                    break
                w = min(step, w * 4)
    finally:
        for m, was in training.items():
            m.training = was
    n = batch.n
    # fixed costs: planning (tracing), and the self-check: ~5 float64 forwards of 8 samples
    fixed = plan + CHECK_SAMPLE_FORWARDS * capture / n
    seconds = fixed + capture / n * n_samples + probe / (w * n) * K * n_samples
    sums = K * SUMS_BYTES_PER_WEIGHT + (K * logits.shape[1] * 8 if by_class else 0)
    return Estimate(scorer.kind, scorer.description, K, n_samples, step, w, n, probe, capture, seconds,
                    max_memory, sums, model_bytes)


"""Transformers (issue 16), side by side with the naive zero-evaluate-restore loop, same weights:

1. replay on a middle block: the MLP of block 2 of 4 of a small GPT (d=128, 4 heads, vocab 512;
   16 sequences x 64 tokens), everything after it replayed on the changes;
2. the LayerNorm closed form on the last MLP of a GPT-2-small-sized block (d=768, 12 heads,
   fc 768 -> 3072 -> 768, 64 sequences x 128 tokens; vocabulary --vocab, default 2048), on whole
   rows as a layer sweep takes them: O(1) per (weight, token) from mixed moments (matrix products
   over the vocabulary once per unit and batch), the naive loop a whole forward per weight;
3. with --gpt2-vocab, the same on GPT-2's vocabulary (50,257), batches of 16 sequences.

    .venv/bin/python benchmarks/bench_transformers.py [--quick] [--gpt2-vocab]

Prints weights/second of each and the ratio, with the load average before and after (the machine
is shared: compare ratios, measured back to back, not absolute figures), and each one's error
against the naive loop run on a float64 copy. Random weights, random tokens; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import weightablate as wa


class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads, self.scale = heads, 1 / math.sqrt(d // heads)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        N, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(N, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, d, heads, mlp, layers, T):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(T, d))
        self.blocks = nn.ModuleList([Block(d, heads, mlp) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2's initialisation (torch's N(0, 1) makes every token
        # predict itself with p = 1 - 1e-280: logit gaps of ~650, probabilities in float64's subnormal range)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def side_by_side(title, model, layer, data, k_fast, k_naive, methods=("auto",), rows=False, batch_size=None):
    """Each method on k_fast weights (verify=False: the sweep alone), the naive loop on the first
    k_naive of them in the model's float32 (its speed) and on a float64 copy (the truth). rows: the
    first k_fast weights in order (whole rows, as a layer sweep takes them), else a random set."""
    g = torch.Generator().manual_seed(1)
    n = model.get_submodule(layer).weight.numel()
    w = torch.arange(k_fast) if rows else torch.randperm(n, generator=g)[:k_fast]
    kw = {} if batch_size is None else {"batch_size": batch_size}
    print(f"\n{title}: layer {layer} {tuple(model.get_submodule(layer).weight.shape)}, load {load()}", flush=True)
    naive, t_naive = timed(lambda: wa.ablate(model, layer, data, w[:k_naive], backend="naive", progress=False, **kw))
    truth, t_truth = timed(lambda: wa.ablate(model, layer, data, w[:k_naive], backend="naive", precision="float64",
                                             progress=False, **kw))
    scale = truth.delta_loss.abs().max().item()
    print(f"  naive float32: {k_naive} weights in {t_naive:.2f} s = {k_naive / t_naive:.3g} w/s; {naive.n_samples} "
          f"tokens; its error vs the float64 loop {(naive.delta_loss - truth.delta_loss).abs().max() / scale:.2g} "
          f"of the largest |delta_loss|; the float64 loop: {k_naive / t_truth:.3g} w/s")
    for method, k in methods:
        fast, t_fast = timed(lambda: wa.ablate(model, layer, data, w[:k], method=method, verify=False, progress=False,
                                               **kw))
        err = (fast.delta_loss[:k_naive] - truth.delta_loss).abs().max().item() / scale
        exact = f"; (weight, token)s left to the exact form: {fast.extra['exact_fraction']:.2g}" \
            if "exact_fraction" in fast.extra else ""
        print(f"  {fast.method}: {k} weights in {t_fast:.2f} s = {k / t_fast:.3g} w/s, "
              f"{(k / t_fast) / (k_naive / t_naive):.3g}x the naive float32 loop, "
              f"{(k / t_fast) / (k_naive / t_truth):.3g}x the float64 loop; error vs the float64 loop "
              f"{err:.2g} of the largest{exact}", flush=True)
    _, t_check = timed(lambda: wa.ablate(model, layer, data, w[:4], verify=True, progress=False, **kw))
    print(f"  (one call on 4 weights with the self-check: {t_check:.2f} s); load after {load()}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer weights and tokens")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--gpt2-vocab", action="store_true",
                    help="also the last MLP with GPT-2's vocabulary (50,257; batches of 16 sequences)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load()}")

    T, N = 64, 8 if args.quick else 16
    small = GPT(512, 128, 4, 512, 4, T).eval()
    idx = torch.randint(0, 512, (N, T))
    y = torch.roll(idx, -1, 1)
    y[:, -1] = -100
    side_by_side("replay, middle block", small, "blocks.1.fc", (idx, y), 16 if args.quick else 32,
                 4 if args.quick else 8, methods=(("auto", 16 if args.quick else 32),))

    T, N = (32, 16) if args.quick else (128, 64)
    big = GPT(args.vocab, 768, 12, 3072, 1, T).eval()
    idx = torch.randint(0, args.vocab, (N, T))
    y = torch.roll(idx, -1, 1)
    y[:, -1] = -100
    for layer, row in (("blocks.0.fc", 768), ("blocks.0.out", 3072)):
        k = row if args.quick else 24576  # whole rows: 32 of fc, 8 of out
        side_by_side("LayerNorm closed form, last MLP of a GPT-2-small-sized block", big, layer, (idx, y), k, 2,
                     methods=(("auto", k), ("replay", 2)), rows=True)
    if args.gpt2_vocab:
        del big
        big = GPT(50257, 768, 12, 3072, 1, T).eval()
        idx = torch.randint(0, 50257, (N, T))
        y = torch.roll(idx, -1, 1)
        y[:, -1] = -100
        rows = 4 if args.quick else 32  # the per-batch set-up (the head's product, the token statistics) is shared
        side_by_side("LayerNorm closed form, last MLP, GPT-2's vocabulary", big, "blocks.0.fc", (idx, y), rows * 768, 1,
                     methods=(("auto", rows * 768),), rows=True, batch_size=16)

if __name__ == "__main__":
    sys.exit(main())

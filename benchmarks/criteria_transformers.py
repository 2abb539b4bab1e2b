"""WANDA, SparseGPT and the other criteria against the exact deltas on transformer layers (issue 16).

A small GPT (tests/test_transformers.py's: 2 blocks, d=32, 4 heads, vocabulary 64, fused qkv,
causal mask buffer, tied embeddings) is first trained for a few hundred Adam steps on sequences
of a fixed random Markov chain (so the weights mean something; nothing is downloaded), then each
layer's criteria (weightablate.criteria, on the evaluation tokens) are compared with the exact
delta_loss of weightablate.ablate on the same tokens, with weightablate.report's table:
Spearman and Kendall against delta_loss, Spearman of the importances against |delta_loss|, and
the overlap of each criterion's top / bottom 10% with the exact one's.

    .venv/bin/python benchmarks/criteria_transformers.py [--weights 512]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_transformers import GPT  # noqa: E402

import weightablate as wa  # noqa: E402
from weightablate.reporting import report  # noqa: E402

VOCAB, T = 64, 16


def markov(n, g, P):
    x = torch.zeros(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g)[:, 0]
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    return x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=int, default=512, help="weights per layer (drawn at random)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    P = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=g), 1)  # a peaked random chain
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, d=32, heads=4, T=T, layers=2)
    for b in model.blocks:
        b.inplace = False  # the same function; autograd refuses the in-place residual add
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = markov(64, g, P)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # (the residual adds stay out of place: the taylor criterion's autograd refuses x += ...)
    X, Y = markov(32, g, P)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s, last train loss {loss.item():.3f} "
          f"(uniform: {torch.log(torch.tensor(float(VOCAB))):.3f}); evaluation: {X.shape[0]} sequences x {T} tokens")
    names = ("magnitude", "wanda", "sparsegpt", "taylor")
    print("\n| layer | method | criterion | Spearman | Kendall | Spearman vs abs | top 10% | bottom 10% |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in ("blocks.0.qkv", "blocks.0.proj", "blocks.1.fc", "blocks.1.out"):
        t = time.perf_counter()
        res = wa.ablate(model, layer, (X, Y), args.weights, progress=False)
        with tempfile.TemporaryDirectory() as out:
            d = report(res, out, model=model, layer=layer, data=(X, Y))
        table = d["criteria"]["scores"]
        for name in names:
            r = table[name]
            print(f"| {layer} | {res.method} | {name} | {r['spearman']:.3f} | {r['kendall']:.3f} | "
                  f"{r['spearman_abs']:.3f} | {r['top_10pct']:.2f} | {r['bottom_10pct']:.2f} |", flush=True)
        print(f"<!-- {layer}: {len(res)} weights, {res.n_samples} tokens, {time.perf_counter() - t:.0f} s -->")


if __name__ == "__main__":
    main()

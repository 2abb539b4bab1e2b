"""The two benchmark workloads, built deterministically (no downloads, no weightablate.digits).

* ``digits``: MLP 64 -> 256 -> ReLU -> 256 ("fc2", the target) -> ReLU -> 10 on the 540-sample
  test split of sklearn's digits (standardised features). The MLP is trained for a few hundred
  full-batch Adam steps (about a second on 2 cores) so that its logits and probabilities have a
  realistic spread (~97% test accuracy), rather than the near-uniform softmax of a random init.
* ``alexnet``: the AlexNet classifier head FC2 Linear(4096, 4096) -> ReLU -> FC3 Linear(4096, 1000)
  with torchvision's default Linear init, fed N = 512 synthetic FC1 activations
  ``relu(g + shift) * scale`` (g standard normal, ~40% exact zeros) with ``scale`` chosen so that
  the logits have a per-sample standard deviation of ~3 (top-1 softmax probabilities ~0.1-0.9), and
  random labels in [0, 1000).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    model: nn.Module
    layer: str
    X: torch.Tensor
    y: torch.Tensor
    weights_fast: object  # the ``weights=`` argument for the fast backends (cpu, torch)
    weights_naive: torch.Tensor  # a small subset of flat indices for the naive loop
    description: str

    @property
    def data(self):
        return (self.X, self.y)

    def n_weights(self, weights) -> int:
        if weights is None:
            return self.model.get_submodule(self.layer).weight.numel()
        if isinstance(weights, int):
            return weights
        return int(weights.numel())


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def _digits_split():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(X.shape[0], generator=g)
    n_test = 540
    test, train = perm[:n_test], perm[n_test:]
    mean, std = X[train].mean(0), X[train].std(0).clamp(min=1e-3)
    X = (X - mean) / std
    return X[train], y[train], X[test], y[test]


def digits_workload(train_steps: int = 300) -> Workload:
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = _digits_split()
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and immune to oversubscription
    try:
        for _ in range(train_steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(Xtr), ytr).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    naive_idx = torch.randperm(model.fc2.weight.numel(), generator=g)[:128].sort().values
    return Workload(
        name="digits", model=model, layer="fc2", X=Xte.contiguous(), y=yte,
        weights_fast=None,  # all 65,536 weights of fc2
        weights_naive=naive_idx,
        description="digits MLP 64-256-ReLU-256(fc2)-ReLU-10, trained, N=540, all 65,536 fc2 weights",
    )


def alexnet_head_workload(n_samples: int = 512, k_weights: int = 4096, n_naive: int = 8,
                          zero_fraction: float = 0.4, logit_std: float = 3.0) -> Workload:
    torch.manual_seed(0)
    fc2, fc3 = nn.Linear(4096, 4096), nn.Linear(4096, 1000)
    model = nn.Sequential(fc2, nn.ReLU(), fc3).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    shift = -float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(zero_fraction)))
    g = torch.randn(n_samples, 4096)
    a = torch.relu(g + shift)
    with torch.no_grad():
        std = model(a).std(1).mean().item()
    # logits(scale * a) = scale * (fc3(relu(fc2(a)))) up to the biases: one correction is enough
    X = a * (logit_std / std)
    with torch.no_grad():
        std2 = model(X).std(1).mean().item()
    X = X * (logit_std / std2)
    y = torch.randint(0, 1000, (n_samples,), generator=torch.Generator().manual_seed(2))
    # the naive subset: n_naive of the same K weights the fast backends do (selection seed=0)
    from weightablate.selection import select_weights

    chosen = select_weights(k_weights, tuple(fc2.weight.shape), 0)
    naive_idx = chosen[torch.linspace(0, k_weights - 1, n_naive).long()]
    return Workload(
        name="alexnet", model=model, layer="0", X=X.contiguous(), y=y,
        weights_fast=k_weights,
        weights_naive=naive_idx,
        description=f"AlexNet head FC2(4096x4096)-ReLU-FC3(4096x1000), N={n_samples}, "
                    f"K={k_weights} random FC2 weights (seed=0)",
    )


WORKLOADS = {"digits": digits_workload, "alexnet": alexnet_head_workload}

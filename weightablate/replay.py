"""The replay method: exact for any traceable tail. Per batch, one forward keeps every value the
nodes after the target need; per chunk of ablations, only the nodes that depend on the target's
output run, on the changes (weightablate.propagate); the logits' change is scored in float64
without subtracting two losses."""
from __future__ import annotations

import torch

from ._reference import _exact_kl
from .capture import check_logits
from .graph import capture_values
from .memory import CPU_REPLAY_BYTES
from .propagate import Propagator, max_numel

BYTES_PER_ENTRY = 8 * 6  # float64 change, its base block and the temporaries of one node
SCORE_BLOCK = 1 << 22  # entries of one (pairs x classes) scoring block


def cpu_capped(max_memory: int, on: torch.Tensor) -> int:
    """The scratch budget of one chunk: max_memory, at most CPU_REPLAY_BYTES on the CPU (memory.py)."""
    return min(max_memory, CPU_REPLAY_BYTES) if on.device.type == "cpu" else max_memory


def param_values(target, param: str, flat: torch.Tensor) -> torch.Tensor:
    """The chosen entries' values in float64 (read after a forward: pruning hooks recompute them)."""
    return getattr(target, param).detach().reshape(-1)[flat].double()


class Replay:
    """Scores any target by replaying the dependent part of the graph on the changes."""

    def __init__(self, graph, target, param: str, flat: torch.Tensor, want_flips: bool, by_class: bool, why: str):
        self.graph, self.target, self.param = graph, target, param
        self.flat = flat.to(getattr(target, param).device)
        self.want_flips, self.by_class = want_flips, by_class
        # the changes propagate in the captured values' dtype (float32 or float64), see propagate.py
        self.prop = Propagator(graph, param, torch.promote_types(getattr(target, param).dtype, torch.float32))
        self.vals = None
        self.per_sample = 1
        self.why = why
        self.tokens = True  # scores per-token logits (N, T, V) too (weightablate.tokens)

    @property
    def kind(self) -> str:
        return "replay"

    @property
    def description(self) -> str:
        n = len(self.graph.dependent) - 1
        return f"replay of the {n} graph nodes after {self.graph.target.target!r} on the changes" + self.why

    def _prepare(self, x) -> torch.Tensor:
        values = capture_values(self.graph, x)
        logits = check_logits(values[self.graph.logits], tokens=True)
        self.prop.set_batch(values)
        if self.vals is None:
            self.vals = param_values(self.target, self.param, self.flat)
        self.per_sample = max(self.per_sample, max_numel(values, self.graph.dependent))
        return logits

    def prepare(self, x, y) -> torch.Tensor:
        return self._prepare(x)

    def chunk_size(self, n: int, max_memory: int) -> int:
        return max(1, cpu_capped(max_memory, self.flat) // (BYTES_PER_ENTRY * self.per_sample * max(n, 1)))

    def score(self, batch, sl: slice):
        d0 = self.prop.target_delta(self.flat[sl], self.vals[sl])
        dl = batch.rows(self.prop.run(d0)).double()
        return score_logit_deltas(dl, batch, self.want_flips, self.by_class, self.prop.dtype)


def score_logit_deltas(dl: torch.Tensor, batch, want_flips: bool, by_class: bool, flip_dtype=torch.float64):
    """The sweep's 7-tuple from the change of the logits dl (K, N, C) float64 (N: the batch's rows,
    its tokens that count for per-token logits).

    KL(p || p') = log sum_c p_c exp(dl_c - E_p dl) and dCE = KL + E_p dl - dl_y (docs/DESIGN.md):
    never the difference of two losses. Flips compare the ablated logits rounded to ``flip_dtype``
    (the model's dtype): logits that tie exactly in the model's own arithmetic, e.g. at a clamp,
    tie here too and the first one wins, as in the model's forward, instead of being split by the
    float64 rounding of base + change."""
    K, N, C = dl.shape
    device = dl.device
    dloss = torch.zeros(K, dtype=torch.float64, device=device)
    dkl = torch.zeros_like(dloss)
    class_loss = torch.zeros(K, C if by_class else 0, dtype=torch.float64, device=device)
    nonzero = (dl != 0).reshape(K, -1).any(1)
    step = max(1, SCORE_BLOCK // max(N * C, 1))
    ones = torch.ones(N, dtype=torch.float64, device=device)
    samples = torch.arange(N, device=device)
    for s in range(0, K, step):
        block = dl[s : s + step]
        k = block.shape[0]
        p = batch.probs.unsqueeze(0).expand(k, N, C).reshape(-1, C)
        v = block.reshape(-1, C)
        kl, m1 = _exact_kl(p, v, ones.repeat(k), batch.logits, samples.repeat(k))
        dce = kl + m1 - v.gather(1, batch.labels.repeat(k)[:, None])[:, 0]
        dloss[s : s + k] = dce.view(k, N).sum(1)
        dkl[s : s + k] = kl.view(k, N).sum(1)
        if by_class:
            class_loss[s : s + k].index_add_(1, batch.labels, dce.view(k, N))
    flips = new_err = new_corr = torch.zeros(K, dtype=torch.int64, device=device)
    if want_flips:
        pred = batch.logits.argmax(1)
        now = (batch.logits.unsqueeze(0) + dl).to(flip_dtype).argmax(2)
        flip = now != pred
        flips = flip.sum(1)
        new_err = (flip & (pred == batch.labels)).sum(1)
        new_corr = (flip & (now == batch.labels)).sum(1)
    return dloss, dkl, flips, new_err, new_corr, nonzero, class_loss

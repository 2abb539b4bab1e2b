"""The naive reference: zero one weight in place, evaluate the whole dataset, restore, repeat.

Slow by design (one full evaluation per weight); tests run it on a float64 copy of the model as
the independent oracle, benchmarks time it. The weight is restored in a ``finally`` block, so an
exception or Ctrl-C never leaves the model changed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .capture import check_logits
from .data import check_labels
from .progress import bar
from .tokens import flat_labels, flat_tokens


class Entries:
    """A tensor's entries by flat (row-major) index, written in place whatever its strides
    (a channels_last conv weight, a transposed Linear weight)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def _at(self, idx: int):
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), self.t.shape))

    def __getitem__(self, idx: int) -> torch.Tensor:
        return self.t[self._at(idx)]

    def __setitem__(self, idx: int, value) -> None:
        self.t[self._at(idx)] = value


def evaluate(model, batches):
    """Per-batch logits of the model (no_grad), one row per prediction: per-token logits (N, T, V)
    as (M, V) over the tokens that count (weightablate.tokens)."""
    with torch.no_grad():
        return [flat_tokens(check_logits(model(x), tokens=True), y)[0] for x, y in batches]


def naive_ablate(model, layer, flat_idx: torch.Tensor, batches, progress=None, by_class=False, param="weight"):
    """Returns dict of (K,) tensors: delta_loss, delta_kl (float64), flips, new_errors,
    new_correct (int64), exact_zero (bool), and base_loss, base_accuracy; each loss difference is taken per sample in the
    model's dtype, as a naive user would, and summed in float64. Per-token logits count per token. ``flat_idx`` index ``layer.<param>``
    ("weight" of any shape, e.g. a Conv2d's, or "bias")."""
    given, base = batches, evaluate(model, batches)
    batches = [(x, flat_labels(y)) for x, y in batches]  # the labels of the logits' rows
    for logits, (_, y) in zip(base, batches):
        check_labels(y, logits.shape[1])
    base_ce = [F.cross_entropy(l, y, reduction="none") for l, (_, y) in zip(base, batches)]
    base_logp = [F.log_softmax(l, 1) for l in base]
    base_pred = [l.argmax(1) for l in base]
    K = flat_idx.numel()
    out = {k: torch.zeros(K, dtype=torch.float64) for k in ("delta_loss", "delta_kl")}
    out.update({k: torch.zeros(K, dtype=torch.int64) for k in ("flips", "new_errors", "new_correct")})
    out["exact_zero"] = torch.ones(K, dtype=torch.bool)
    n_classes = base[0].shape[1]
    out["class_loss"] = torch.zeros(K, n_classes, dtype=torch.float64) if by_class else None
    n = sum(y.numel() for _, y in batches)
    out["n_samples"] = n
    out["base_loss"] = sum(ce.double().sum().item() for ce in base_ce) / n
    out["base_accuracy"] = sum(int((p == y).sum()) for p, (_, y) in zip(base_pred, batches)) / n
    # torch.nn.utils.prune recomputes <param> = <param>_orig * mask on every forward: zeroing the
    # entry of <param>_orig zeroes the weight the layer uses (a pruned entry is zero already)
    flat = Entries(getattr(layer, param + "_orig", getattr(layer, param)).data)
    with bar(K, "naive ablation", progress) as pbar:
        for k, idx in enumerate(flat_idx.tolist()):
            original = flat[idx].clone()
            try:
                flat[idx] = 0
                logits = evaluate(model, given)
            finally:
                flat[idx] = original
            for l, (_, y), ce0, logp0, pred0, l0 in zip(logits, batches, base_ce, base_logp, base_pred, base):
                ce = F.cross_entropy(l, y, reduction="none")
                out["delta_loss"][k] += (ce - ce0).double().sum().item()
                if by_class:
                    out["class_loss"][k].index_add_(0, y.cpu(), (ce - ce0).double().cpu())
                kl = (logp0.exp() * (logp0 - F.log_softmax(l, 1))).sum(1)
                out["delta_kl"][k] += kl.double().sum().item()
                pred = l.argmax(1)
                flip = pred != pred0
                out["flips"][k] += int(flip.sum())
                out["new_errors"][k] += int((flip & (pred0 == y)).sum())
                out["new_correct"][k] += int((flip & (pred == y)).sum())
                if not torch.equal(l, l0):
                    out["exact_zero"][k] = False
            pbar.update(1)
    return out

"""One pass over the data for any exact method: per batch the method captures what it needs,
then scores the chosen weights a chunk at a time; partial sums are added up in float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import check_labels
from .progress import bar

FIELDS = ("delta_loss", "delta_kl", "flips", "new_errors", "new_correct")


@dataclass
class Batch:
    """The unablated model's view of one batch, shared by every chunk of weights."""
    logits: torch.Tensor  # (N, C) float64
    probs: torch.Tensor  # (N, C) float64 softmax
    labels: torch.Tensor  # (N,) int64

    @property
    def n(self) -> int:
        return self.labels.numel()


class Totals:
    """Running float64/int64 sums per weight, plus the base loss and accuracy."""

    def __init__(self, K: int, device, n_classes: int, by_class: bool):
        self.acc = [torch.zeros(K, dtype=torch.float64, device=device) for _ in range(2)]
        self.acc += [torch.zeros(K, dtype=torch.int64, device=device) for _ in range(3)]
        self.nonzero = torch.zeros(K, dtype=torch.bool, device=device)
        self.class_loss = torch.zeros(K, n_classes, dtype=torch.float64, device=device) if by_class else None
        self.n_classes = n_classes
        self.n, self.ce_sum, self.correct = 0, 0.0, 0

    def add(self, sl: slice, parts) -> None:
        for a, r in zip(self.acc, parts[:5]):
            a[sl] += r
        self.nonzero[sl] |= parts[5]
        if self.class_loss is not None:
            self.class_loss[sl] += parts[6]

    def result(self) -> dict:
        out = dict(zip(FIELDS, (a.cpu() for a in self.acc)))
        out["exact_zero"] = ~self.nonzero.cpu()
        out["class_loss"] = self.class_loss.cpu() if self.class_loss is not None else None
        return out


def make_batch(logits: torch.Tensor, labels: torch.Tensor, n_classes: int | None) -> tuple[Batch, float]:
    """The batch and its summed cross-entropy."""
    if n_classes is not None and logits.shape[1] != n_classes:
        raise ValueError(f"model: {logits.shape[1]} logits in one batch, {n_classes} in an earlier one")
    check_labels(labels, logits.shape[1])
    logits = logits.double()
    logp = F.log_softmax(logits, 1)
    ce = -logp.gather(1, labels[:, None]).sum().item()
    return Batch(logits=logits, probs=logp.exp(), labels=labels), ce


def sweep(method, stream, K: int, *, by_class: bool, max_memory: int, progress, total_batches=None):
    """Run ``method`` over every batch of ``stream`` and every chosen weight.

    A method has ``prepare(x, y) -> logits`` (one capture per batch), ``chunk_size(n, max_memory)``
    and ``score(batch, sl) -> (dloss, dkl, flips, new_err, new_corr, nonzero, class_loss)`` for the
    weights ``sl`` of its list. Returns (totals dict, n_samples, base_loss, base_accuracy)."""
    totals = None
    with bar(total_batches, "ablation (batches)", progress) as pbar:
        for x, y in stream:
            logits = method.prepare(x, y)
            batch, ce = make_batch(logits, y, None if totals is None else totals.n_classes)
            if totals is None:
                totals = Totals(K, logits.device, logits.shape[1], by_class)
            totals.n += batch.n
            totals.ce_sum += ce
            totals.correct += int((logits.argmax(1) == y).sum())
            step = method.chunk_size(batch.n, max_memory)
            for s in range(0, K, step):
                sl = slice(s, s + step)
                totals.add(sl, method.score(batch, sl))
            pbar.update(1)
    return totals.result(), totals.n, totals.ce_sum / totals.n, totals.correct / totals.n

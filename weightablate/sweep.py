"""One pass over the data for any exact method: per batch the method captures what it needs,
then scores the chosen weights a chunk at a time; partial sums are added up in float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, DataHash
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

    def state(self) -> dict:
        """Everything the sums hold, on the CPU (for a checkpoint)."""
        return {"acc": [a.cpu() for a in self.acc], "nonzero": self.nonzero.cpu(),
                "class_loss": None if self.class_loss is None else self.class_loss.cpu(),
                "n_classes": self.n_classes, "n": self.n, "ce_sum": self.ce_sum, "correct": self.correct}

    def load_state(self, state: dict) -> None:
        if state["n_classes"] != self.n_classes:
            raise CheckpointError(f"checkpoint: saved for {state['n_classes']} classes, the model has {self.n_classes}")
        for a, s in zip(self.acc, state["acc"]):
            a.copy_(s)
        self.nonzero.copy_(state["nonzero"])
        if self.class_loss is not None:
            self.class_loss.copy_(state["class_loss"])
        self.n, self.ce_sum, self.correct = state["n"], state["ce_sum"], state["correct"]

    @classmethod
    def from_state(cls, state: dict, K: int, by_class: bool) -> "Totals":
        totals = cls(K, "cpu", state["n_classes"], by_class)
        totals.load_state(state)
        return totals

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


@torch.no_grad()  # replay's generic path calls modules: no autograd graph, no grad_fn on the results
def sweep(method, stream, K: int, *, by_class: bool, max_memory: int, progress, total_batches=None,
          checkpoint=None):
    """Run ``method`` over every batch of ``stream`` and every chosen weight.

    A method has ``prepare(x, y) -> logits`` (one capture per batch), ``chunk_size(n, max_memory)``
    and ``score(batch, sl) -> (dloss, dkl, flips, new_err, new_corr, nonzero, class_loss)`` for the
    weights ``sl`` of its list. Capture and scoring are interleaved batch by batch, so memory holds
    one batch (plus one chunk of scratch, bounded by ``max_memory``) whatever the dataset's length.

    ``checkpoint`` (a checkpoint.Checkpoint): the totals are saved after completed batches and a
    saved run resumes where it stopped; the batches it had done are re-read only to check the data
    hash, so the sums are added in the same order and the result is bit-identical.
    Returns (totals dict, n_samples, base_loss, base_accuracy)."""
    state = checkpoint.load() if checkpoint is not None else None
    done = state["batches"] if state is not None else 0
    data_hash = DataHash() if checkpoint is not None else None
    totals, read, unsaved, last = None, 0, False, None
    with bar(total_batches, "ablation (batches)", progress) as pbar:
        for b, (x, y) in enumerate(stream):
            read = b + 1
            digest = data_hash.update(x, y) if data_hash is not None else None
            if b < done:  # completed before the interruption: only check it is the same data
                if b == done - 1 and digest != state["data_hash"]:
                    raise CheckpointError(f"checkpoint {str(checkpoint.path)!r}: the data differs from the run that "
                                          f"saved it (hash of its first {done} batches); resume with the same data "
                                          "in the same order, or use another checkpoint_dir")
                last = (x, y)
                pbar.update(1)
                continue
            logits = method.prepare(x, y)
            if totals is None:
                totals = Totals(K, logits.device, logits.shape[1], by_class)
                if state is not None:
                    totals.load_state(state["totals"])
            batch, ce = make_batch(logits, y, totals.n_classes)
            totals.n += batch.n
            totals.ce_sum += ce
            totals.correct += int((logits.argmax(1) == y).sum())
            step = method.chunk_size(batch.n, max_memory)
            for s in range(0, K, step):
                sl = slice(s, s + step)
                totals.add(sl, method.score(batch, sl))
            unsaved = True
            if checkpoint is not None and checkpoint.due(False):
                checkpoint.save({"batches": read, "data_hash": digest, "totals": totals.state()})
                unsaved = False
            pbar.update(1)
    if read < done:
        raise CheckpointError(f"checkpoint {str(checkpoint.path)!r}: saved after {done} batches but the data has "
                              f"only {read}; resume with the same data, or use another checkpoint_dir")
    if totals is None:  # every batch was done before: restore, and let the method plan on one batch
        method.prepare(*last)
        totals = Totals.from_state(state["totals"], K, by_class)
    elif checkpoint is not None and unsaved:
        checkpoint.save({"batches": read, "data_hash": digest, "totals": totals.state()})
    return totals.result(), totals.n, totals.ce_sum / totals.n, totals.correct / totals.n

"""One pass over the data for any exact method: per batch the method captures what it needs,
then scores the chosen weights a chunk at a time; partial sums are added up in float64."""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, DataHash
from .data import check_labels
from .memory import check_result_fits
from .progress import SweepProgress
from .tokens import is_tokens, token_positions

FIELDS = ("delta_loss", "delta_kl", "flips", "new_errors", "new_correct")


@dataclass
class Batch:
    """The unablated model's view of one batch, shared by every chunk of weights."""
    logits: torch.Tensor  # (N, C) float64; per token: (M, V) over the M tokens that count
    probs: torch.Tensor  # (N, C) float64 softmax
    labels: torch.Tensor  # (N,) int64
    tokens: torch.Tensor | None = None  # per-token logits: the M tokens' flat indices into (N*T), else None

    def rows(self, dl: torch.Tensor) -> torch.Tensor:
        """A change of the model's logits (K, N, C) or (K, N, T, V) as (K, rows of the batch, C)."""
        if self.tokens is None:
            return dl
        return dl.reshape(dl.shape[0], -1, dl.shape[-1])[:, self.tokens]

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
    """The batch and its summed cross-entropy; per-token logits (N, T, V) become one row per token
    that counts (weightablate.tokens)."""
    tokens = token_positions(logits, labels)
    if tokens is not None:
        logits, labels = logits.reshape(-1, logits.shape[-1])[tokens], labels.reshape(-1)[tokens]
    if n_classes is not None and logits.shape[1] != n_classes:
        raise ValueError(f"model: {logits.shape[1]} logits in one batch, {n_classes} in an earlier one")
    check_labels(labels, logits.shape[1])
    logits = logits.double()
    logp = F.log_softmax(logits, 1)
    ce = -logp.gather(1, labels[:, None]).sum().item()
    return Batch(logits=logits, probs=logp.exp(), labels=labels, tokens=tokens), ce


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: where it stopped and whether a checkpoint holds the work done."""

    def __init__(self, batches: int, weights: int, n_weights: int, total_batches, checkpoint_path,
                 saved: bool = True, reason: str = ""):
        self.batches, self.weights, self.n_weights = batches, weights, n_weights
        self.total_batches = total_batches
        self.checkpoint_path = checkpoint_path if saved else None  # None: nothing was saved
        if self.checkpoint_path is not None:
            then = f"checkpoint saved in {str(checkpoint_path.parent)!r}: run the same call again to resume"
        else:
            why = "no checkpoint_dir" if checkpoint_path is None else "nothing done yet"
            then = f"nothing was saved ({why})"
        super().__init__(f"{reason + ': ' if reason else ''}interrupted after {self.position()}; {then}")

    def position(self) -> str:
        """'batch 3/10' (and how far into the next one)."""
        text = f"batch {self.batches}" + (f"/{self.total_batches}" if self.total_batches else "")
        if self.weights:
            text += f" and {self.weights} of the {self.n_weights} weights of batch {self.batches + 1}"
        return text


@contextlib.contextmanager
def _no_interrupt():
    """Hold a Ctrl-C back until the block is done: the running sums are never left half-updated."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    pending = []
    old = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending and callable(old):
        old(*pending[0])  # Python's default handler raises KeyboardInterrupt here


@torch.no_grad()  # replay's generic path calls modules: no autograd graph, no grad_fn on the results
def sweep(method, stream, K: int, *, by_class: bool, max_memory: int, progress, total_batches=None,
          checkpoint=None):
    """Run ``method`` over every batch of ``stream`` and every chosen weight.

    A method has ``prepare(x, y) -> logits`` (one capture per batch), ``chunk_size(n, max_memory)``
    and ``score(batch, sl) -> (dloss, dkl, flips, new_err, new_corr, nonzero, class_loss)`` for the
    weights ``sl`` of its list. Capture and scoring are interleaved batch by batch, so memory holds
    one batch (plus one chunk of scratch, bounded by ``max_memory``) whatever the dataset's length.

    ``checkpoint`` (a checkpoint.Checkpoint): the totals are saved when due after a chunk of
    weights (and always after the last batch, and on Ctrl-C) and a saved run resumes where it
    stopped, also within a batch: the batches it had done are re-read only to check the data hash,
    so the sums are added in the same order and the result is bit-identical. Ctrl-C raises
    Interrupted (a KeyboardInterrupt) saying where it stopped.
    Returns (totals dict, n_samples, base_loss, base_accuracy)."""
    try:
        with SweepProgress(total_batches, K, progress) as prog:
            return _sweep(method, stream, K, by_class, max_memory, prog, total_batches, checkpoint)
    finally:
        if checkpoint is not None:
            checkpoint.close()


def _sweep(method, stream, K, by_class, max_memory, prog, total_batches, checkpoint):
    state = checkpoint.load() if checkpoint is not None else None
    done = state["batches"] if state is not None else 0  # batches whose every weight is summed
    partial = state.get("partial", 0) if state is not None else 0  # weights of batch `done` summed too
    hashed = done + (partial > 0)  # batches whose data went into the saved sums
    if state is not None:
        prog.note(f"resuming from {Interrupted(done, partial, K, total_batches, None).position()}"
                  f" ({str(checkpoint.path)!r})")
        prog.resumed(done + partial / K)
    data_hash = DataHash() if checkpoint is not None else None
    totals, read, unsaved, last = None, 0, False, None
    # what the sums hold: batches done, weights of the next one, the data hash of the batches read
    where = [done, partial, state["data_hash"] if state is not None else None]

    def save():
        checkpoint.save({"batches": where[0], "partial": where[1], "data_hash": where[2], "totals": totals.state()})

    try:
        for b, (x, y) in enumerate(stream):
            read = b + 1
            digest = data_hash.update(x, y) if data_hash is not None else None
            if b < hashed - 1 or (b == hashed - 1 and partial == 0):  # summed before: only check the data
                if b == hashed - 1 and digest != state["data_hash"]:
                    _data_differs(checkpoint, hashed)
                last = (x, y)
                continue
            if b == hashed - 1 and digest != state["data_hash"]:  # the batch an interruption split
                _data_differs(checkpoint, hashed)
            logits = method.prepare(x, y)
            if is_tokens(logits) and not getattr(method, "tokens", False):
                raise ValueError(f"model: per-token logits {tuple(logits.shape)}: method {method.kind!r} scores (N, C) "
                                 "logits only; replay scores per-token losses (method='replay')")
            if totals is None:
                check_result_fits(K, logits.shape[-1], by_class, logits.device)
                totals = Totals(K, logits.device, logits.shape[-1], by_class)
                if state is not None:
                    totals.load_state(state["totals"])
            batch, ce = make_batch(logits, y, totals.n_classes)
            step = method.chunk_size(batch.n if batch.tokens is None else x.shape[0], max_memory)  # per sequence
            first = partial if b == done else 0
            for s in range(first, K, step):
                sl = slice(s, s + step)
                parts = method.score(batch, sl)
                with _no_interrupt():
                    totals.add(sl, parts)
                    where[:] = b, min(s + step, K), digest
                prog.at(b, where[1])
                if checkpoint is not None and where[1] < K and checkpoint.due(False):
                    save()  # a long batch is saved part-way too
            with _no_interrupt():
                totals.n += batch.n
                totals.ce_sum += ce
                totals.correct += int((batch.logits.argmax(1) == batch.labels).sum())
                where[:] = b + 1, 0, digest
            unsaved = True
            prog.at(b + 1, 0)
            if checkpoint is not None and checkpoint.due(False):
                save()
                unsaved = False
    except KeyboardInterrupt as exc:  # Ctrl-C, or raised by the data: its message is kept
        saved = checkpoint is not None and (totals is not None or state is not None)
        if checkpoint is not None and totals is not None:
            save()
        raise Interrupted(where[0], where[1], K, total_batches, checkpoint and checkpoint.path, saved,
                          str(exc)) from None
    if read < hashed:
        raise CheckpointError(f"checkpoint {str(checkpoint.path)!r}: saved after {hashed} batches but the data has "
                              f"only {read}; resume with the same data, or use another checkpoint_dir")
    if totals is None:  # every batch was done before: restore, and let the method plan on one batch
        method.prepare(*last)
        totals = Totals.from_state(state["totals"], K, by_class)
    elif checkpoint is not None and unsaved:
        save()
    if totals.n == 0:
        raise ValueError("data: no prediction counts: every label is ignore_index (-100)")
    return totals.result(), totals.n, totals.ce_sum / totals.n, totals.correct / totals.n


def _data_differs(checkpoint, hashed: int):
    raise CheckpointError(f"checkpoint {str(checkpoint.path)!r}: the data differs from the run that saved it (hash "
                          f"of its first {hashed} batches); resume with the same data in the same order, or use "
                          "another checkpoint_dir")

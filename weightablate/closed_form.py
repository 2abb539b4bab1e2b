"""The closed-form method (docs/DESIGN.md): the target's change reaches the logits through one known
direction per unit, so each (sample, weight) pair costs one scalar d and the two kernels."""
from __future__ import annotations

import torch

from . import ops
from .capture import capture
from .fused import top_moments
from .memory import chunk_size

MOMENT_ORDER = 6  # D: raw moments m_1..m_D per (sample, unit) on the moment path
MOMENT_MIN_WEIGHTS = 2  # a unit gets moments when at least this many chosen weights share it
# cpu kernel: below this many classes its exact O(C) loop, run across samples, is cheaper than the
# moments (digits, C = 10: 29 vs 39 ns per pair), and pairs that fail the certificate cost more
MOMENT_MIN_CLASSES = 16
SCRATCH_PER_PAIR = 32  # bytes per (weight, sample): d in float64 and the kernels' temporaries
BUDGET_SHARE = 4  # the (weights x samples) blocks take a quarter of max_memory
# cpu kernels: chunks this small keep d in cache between the two ops and let the allocator reuse
# its memory (a fresh 256 MB block costs more in page faults than pair_deltas' arithmetic)
CPU_CHUNK_BYTES = 16 << 20
# fused kernel (one pass, no d matrix) when the weights come in runs of one unit at least this long
# on average (whole rows: the row's length); shorter runs pay its per-(unit, sample) set-up per weight
FUSED_MIN_RUN = 8
FUSED_BYTES_PER_WEIGHT = 96  # its nine per-weight outputs and the sums they are added to


class ClosedForm:
    """Scores a Linear target whose head plan.plan_head reduced to a closed form on the traced graph."""

    def __init__(self, model, name, target, head, flat, backend, mode, want_flips, by_class, param="weight"):
        self.model, self.name, self.target, self.param, self.head = model, name, target, param, head
        self.backend, self.mode, self.want_flips, self.by_class = backend, mode, want_flips, by_class
        n_out, n_in = target.weight.shape
        device = target.weight.device
        self.flat = flat.to(device)
        if param == "bias":  # b_i is a weight whose input is the constant 1: a_t is one row of ones
            self.rows, self.cols = self.flat, torch.zeros_like(self.flat)
        else:
            self.rows, self.cols = self.flat // n_in, self.flat % n_in
        self.w = None
        self.fused = False
        self.exact_pairs = self.active_pairs = 0  # fused path: pairs the O(C) loop scored, pairs with d != 0

    @property
    def kind(self) -> str:
        return self.head.kind

    @property
    def description(self) -> str:
        return self.head.description

    def prepare(self, x, y) -> torch.Tensor:
        cap = capture(self.model, self.target, self.name, x)
        if self.w is None:
            # read after a forward: a pruning pre-hook recomputes the weight from its mask there
            self.w = getattr(self.target, self.param).detach().reshape(-1)[self.flat]
            n_out = self.target.weight.shape[0]
            self.head_rows = self.head.rows()
            self.fused = _use_fused(self.head.kind, self.rows, self.param, cap.logits.shape[1], self.backend,
                                    self.mode)
            if self.head.kind == "logits":
                self.moment_slot = None
            elif self.fused:
                self.moment_slot = _moment_slots(self.rows, n_out, cap.logits.shape[1], self.backend, self.mode,
                                                 self.flat.device, min_weights=1, min_classes=2)
            else:
                self.moment_slot = _moment_slots(self.rows, n_out, cap.logits.shape[1], self.backend, self.mode,
                                                 self.flat.device)
        self.a_t, self.z_t = cap.a.t().contiguous(), cap.z.t().contiguous()
        if self.param == "bias":
            self.a_t = torch.ones_like(self.a_t[:1])
        self.moments = None
        return cap.logits

    @property
    def counts(self) -> dict:
        """The fused path's pair counts over the batches it scored (empty for the two-stage path)."""
        if not self.fused:
            return {}
        return {"fused": True, "exact_pairs": self.exact_pairs, "active_pairs": self.active_pairs,
                "exact_fraction": self.exact_pairs / max(1, self.active_pairs)}

    def chunk_size(self, n: int, max_memory: int) -> int:
        budget = max_memory // BUDGET_SHARE
        if self.fused:  # no (weights x samples) scratch: only per-weight outputs
            return chunk_size(FUSED_BYTES_PER_WEIGHT, budget)
        if self.backend == "cpu":
            budget = min(budget, CPU_CHUNK_BYTES)
        return chunk_size(SCRATCH_PER_PAIR * n, budget)

    def score(self, batch, sl: slice):
        if self.fused:
            return self._score_fused(batch, sl)
        if self.moments is None and self.moment_slot is not None:
            self.moments = _moments(self.head_rows, self.moment_slot, batch.probs)
        d = self.head.deltas(self.backend, ops, self.a_t, self.z_t, self.rows[sl], self.cols[sl], self.w[sl])
        return ops.score_deltas(self.backend, d, self.rows[sl], self.head_rows, batch.probs, batch.logits,
                                batch.labels, self.moments, self.moment_slot if self.moments is not None else None,
                                self.want_flips, self.by_class)


    def _score_fused(self, batch, sl: slice):
        if self.moments is None and self.moment_slot is not None:
            self.moments, self.gap = top_moments(self.head_rows, self.moment_slot, batch.probs, batch.logits,
                                                 batch.labels, MOMENT_ORDER)
        h = self.head
        slot = self.moment_slot if self.moments is not None else None
        out = ops.fused_scores(self.backend, self.a_t, self.z_t, self.rows[sl], self.cols[sl], self.w[sl], h.gain,
                               h.shift, h.slope, self.head_rows, batch.probs, batch.logits, batch.labels,
                               self.moments, self.gap if slot is not None else None, slot, self.want_flips,
                               self.by_class)
        self.exact_pairs += int(out[7].sum())
        self.active_pairs += int(out[8].sum())
        return out[:7]


def _use_fused(kind, rows, param, n_classes, backend, mode) -> bool:
    """Whether the fused kernel scores this selection: a piecewise or logits head on a backend that
    has it, mode="auto", two classes or more, and runs of one unit FUSED_MIN_RUN weights long on
    average (whole rows); sparse selections take the two ops."""
    if kind not in ("logits", "piecewise") or mode == "exact" or n_classes < 2 or param != "weight":
        return False
    if not ops.has_fused(backend) or rows.numel() == 0:
        return False
    runs = 1 + int((rows[1:] != rows[:-1]).sum())
    return rows.numel() >= FUSED_MIN_RUN * runs


def _moment_slots(rows, n_units, n_classes, backend, mode, device, min_weights=None, min_classes=None):
    """(I,) int64: each unit's row in the moment tensor, -1 for units scored by the O(C) loop; None
    when no unit takes the moment path: mode="exact", or the cpu kernel below ``min_classes``
    classes (its O(C) loop is faster there). Defaults: MOMENT_MIN_WEIGHTS, MOMENT_MIN_CLASSES,
    read at call time (tests set them)."""
    min_weights = MOMENT_MIN_WEIGHTS if min_weights is None else min_weights
    min_classes = MOMENT_MIN_CLASSES if min_classes is None else min_classes
    if mode == "exact" or (backend == "cpu" and n_classes < min_classes):
        return None
    counts = torch.bincount(rows, minlength=n_units)
    use = counts >= min_weights
    if not use.any():
        return None
    slot = torch.full((n_units,), -1, dtype=torch.int64, device=device)
    slot[use] = torch.arange(int(use.sum()), device=device)
    return slot


def _moments(head_rows, moment_slot, probs):
    """(D, M, N) float64 raw moments sum_c p_nc v_c^k of the units with a slot: D matrix products."""
    if moment_slot is None:
        return None
    v = head_rows[moment_slot >= 0]
    vk, out = v, []
    for _ in range(MOMENT_ORDER):
        out.append(vk @ probs.t())
        vk = vk * v
    return torch.stack(out)

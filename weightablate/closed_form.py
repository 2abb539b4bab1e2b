"""The closed-form method (DESIGN.md): the target's change reaches the logits through one known
direction per unit, so each (sample, weight) pair costs one scalar d and the two kernels."""
from __future__ import annotations

import torch

from . import ops
from .capture import capture
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
            self.moment_slot = None if self.head.kind == "logits" else _moment_slots(
                self.rows, n_out, cap.logits.shape[1], self.backend, self.mode, self.flat.device)
        self.a_t, self.z_t = cap.a.t().contiguous(), cap.z.t().contiguous()
        if self.param == "bias":
            self.a_t = torch.ones_like(self.a_t[:1])
        self.moments = None
        return cap.logits

    def chunk_size(self, n: int, max_memory: int) -> int:
        budget = max_memory // BUDGET_SHARE
        if self.backend == "cpu":
            budget = min(budget, CPU_CHUNK_BYTES)
        return chunk_size(SCRATCH_PER_PAIR * n, budget)

    def score(self, batch, sl: slice):
        if self.moments is None and self.moment_slot is not None:
            self.moments = _moments(self.head_rows, self.moment_slot, batch.probs)
        d = self.head.deltas(self.backend, ops, self.a_t, self.z_t, self.rows[sl], self.cols[sl], self.w[sl])
        return ops.score_deltas(self.backend, d, self.rows[sl], self.head_rows, batch.probs, batch.logits,
                                batch.labels, self.moments, self.moment_slot if self.moments is not None else None,
                                self.want_flips, self.by_class)


def _moment_slots(rows, n_units, n_classes, backend, mode, device):
    """(I,) int64: each unit's row in the moment tensor, -1 for units scored by the O(C) loop; None
    when no unit takes the moment path: mode="exact", or the cpu kernel below MOMENT_MIN_CLASSES
    classes (its O(C) loop is faster there)."""
    if mode == "exact" or (backend == "cpu" and n_classes < MOMENT_MIN_CLASSES):
        return None
    counts = torch.bincount(rows, minlength=n_units)
    use = counts >= MOMENT_MIN_WEIGHTS
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

"""The closed form for a Linear whose change reaches the logits token-wise through a LayerNorm: the
last MLP of a GPT (fc -> GELU -> proj -> residual add -> final LayerNorm -> LM head, per token) or
of a ViT whose head reads one token.

Zeroing ``W[i, j]`` changes unit ``i`` at token t by the scalar ``d_t = s(z_ti - W_ij a_tj) - s(z_ti)``
(``s``: the element-wise maps after the target), so the LayerNorm's input moves along one direction
``p`` (the column ``P[:, i]`` of the Linear after ``s``, or ``e_i`` when the target feeds the residual
itself): ``h + d p``. With ``hc``, ``pc`` the centred vectors, ``var`` and ``cov`` means over the D
features, LN(h + d p) = gamma * (hc + d pc) / s(d) + beta with
    s(d)^2 = var_h + 2 d cov(h, p) + d^2 var_p + eps,
so the logits stay in a two-dimensional family: with ``A_t = V (gamma * hc_t)`` (per token) and
``B_i = V (gamma * pc_i)`` (per unit), the change of the logits is
    dl = A_t (1/s(d) - 1/s(0)) + d B_i / s(d),
where ``1/s(d) - 1/s(0) = -(2 d cov + d^2 var_p) / (s(d) s(0) (s(d) + s(0)))`` has no cancellation.
That is O(V) per (weight, token) instead of replaying the D x V head; dl is then scored like
replay's (weightablate.replay.score_logit_deltas). All in float64 from the captured values.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .capture import check_logits
from .dataflow import describe
from .graph import capture_values
from .memory import CPU_REPLAY_BYTES
from .plan import _node_step
from .replay import param_values, score_logit_deltas
from .sweep import Batch
from .token_moments import ORDER, TokenStats, exact_entries, flip_size, near_flips, score_pairs, unit_moments

ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
BYTES_PER_ENTRY = 8 * 6  # float64 (pairs x tokens x vocabulary) blocks: dl, its products, the scoring's
MOMENT_BYTES_PER_ENTRY = 8 * 48  # the moment path's (pairs x tokens) float64 temporaries
# the moments of one (unit, token): mu_rs and the raw moments they are shifted from, float64
MOMENT_BYTES_PER_UNIT_TOKEN = 8 * (ORDER + 1) * (ORDER + 2)


@dataclass
class TokenHead:
    steps: list  # element-wise steps after the target (weightablate.plan's form)
    proj: nn.Linear | None  # the Linear after them; None: the target's output is added to the residual
    add: object  # the residual add node (its value: the LayerNorm's input)
    ln: nn.LayerNorm
    head: nn.Linear
    token: int | None  # the head reads this one token (a ViT's class token); None: every token
    description: str


def plan_token_head(graph, values: dict, name: str) -> TokenHead:
    """Prove the pattern on the traced graph, or raise ValueError naming the node that breaks it."""
    mods = dict(graph.module.named_modules())
    dependent = set(graph.dependent)
    target = mods[graph.target.target]
    if not isinstance(target, nn.Linear):
        raise ValueError("needs an nn.Linear target")
    units = values[graph.target].shape[-1]
    current, steps, proj, add, ln, token, head, names = graph.target, [], None, None, None, None, None, []
    for n in graph.dependent[1:]:
        deps = [a for a in n.all_input_nodes if a in dependent]
        if deps != [current]:
            raise ValueError(f"{describe(n)} reads {len(deps)} changed values (a branch after {name!r})")
        m = mods.get(n.target) if n.op == "call_module" else None
        if head is not None:
            raise ValueError(f"{describe(n)} runs after the head {head!r}")
        if n.target not in ADD and n.args[:1] != (current,):
            raise ValueError(f"{describe(n)} reads the changed value other than as its first argument")
        per_channel = isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, nn.PReLU) and m.num_parameters > 1)
        if per_channel and isinstance(values[n], torch.Tensor) and values[n].dim() > 2:
            raise ValueError(f"{describe(n)}: a {type(m).__name__} on {tuple(values[n].shape)} acts per channel "
                             "along axis 1 (the tokens), not per unit")
        if _node_step(n, mods, units, target.weight.device) is None:
            pass  # dropout, identity
        elif add is None and (n.op in ("call_function", "call_method") and n.target in ADD):
            if len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
                raise ValueError(f"{describe(n)}: the residual add must add two tensors")
            other = n.args[1] if n.args[0] is current else n.args[0]
            if other in dependent:  # u + u: the change enters twice (all_input_nodes lists it once)
                raise ValueError(f"{describe(n)} adds the changed value to itself, not to a residual")
            if values[other].shape != values[n].shape or values[current].shape != values[n].shape:
                raise ValueError(f"{describe(n)} broadcasts")
            add = n
        elif add is None and proj is None and isinstance(m, nn.Linear):
            if n.args[1:] or n.kwargs:
                raise ValueError(f"{describe(n)} takes extra arguments")
            proj = m
            names.append(n.target)
        elif add is None and proj is None:
            step = _node_step(n, mods, units, target.weight.device)
            if step == "break":
                raise ValueError(f"{describe(n)} after {name!r} is not a known element-wise map")
            if step is not None:
                steps.append(step)
                names.append(type(m).__name__ if m is not None else str(getattr(n.target, "__name__", n.target)))
        elif add is not None and ln is None and isinstance(m, nn.LayerNorm):
            if n.args[1:] or n.kwargs or len(m.normalized_shape) != 1:
                raise ValueError(f"{describe(n)}: a LayerNorm over the last axis is needed")
            ln = (n, m)
        elif add is not None and token is None and n.op == "call_function" and n.target is operator.getitem \
                and _one_token(n.args[1]) is not None and values[current].dim() == 3:
            token = _one_token(n.args[1])
        elif ln is not None and isinstance(m, nn.Linear):
            if n.args[1:] or n.kwargs:
                raise ValueError(f"{describe(n)} takes extra arguments")
            head = n.target
        else:
            raise ValueError(f"{describe(n)} does not fit fc -> element-wise -> Linear -> residual add -> "
                             "LayerNorm -> head")
        current = n
    if head is None or current is not graph.logits:
        raise ValueError("the change does not reach the logits through a residual add, a LayerNorm and a final "
                         "Linear")
    if values[graph.target].shape[:-1] != values[add].shape[:-1]:
        raise ValueError(f"{name!r}'s output {tuple(values[graph.target].shape)} and the residual "
                         f"{tuple(values[add].shape)} do not have the same tokens")
    if token is None and values[graph.logits].shape[:-1] != values[add].shape[:-1]:
        raise ValueError(f"the logits {tuple(values[graph.logits].shape)} are not one row per token of the "
                         f"residual {tuple(values[add].shape)}")
    if proj is None and units != values[add].shape[-1]:
        raise ValueError(f"{name!r} gives {units} features, the residual has {values[add].shape[-1]}")
    chain = " -> ".join([name] + names + ["+ residual", ln[0].target] + ([f"[:, {token}]"] if token is not None
                                                                          else []) + [head])
    return TokenHead(steps, proj, add, ln[1], mods[head], token, chain)


def _one_token(index):
    """k for an index x[:, k] (k an int), else None."""
    if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int):
        return index[1]
    return None


class TokenClosedForm:
    """Scores each (weight, token) pair from the two-dimensional LayerNorm family above: in O(1) from
    mixed moments (weightablate.token_moments; mode="auto"), where its certificate and flip test
    hold, else (and with mode="exact") in O(vocabulary)."""

    def __init__(self, graph, target: nn.Linear, th: TokenHead, param: str, flat: torch.Tensor, want_flips: bool,
                 by_class: bool, why: str, mode: str = "auto", backend: str = "auto"):
        self.graph, self.target, self.th, self.param = graph, target, th, param
        self.flat = flat.to(target.weight.device)
        self.want_flips, self.by_class, self.why = want_flips, by_class, why
        self.moments_on = mode != "exact"
        self.backend = backend  # "torch": score_pairs' PyTorch reference, else its compiled kernel where built
        self.tokens = True
        self.vals = None
        f64 = torch.float64
        self.V = th.head.weight.detach().to(f64)  # (vocab, D)
        D = self.V.shape[1]
        self.gamma = th.ln.weight.detach().to(f64) if th.ln.weight is not None else torch.ones(D, dtype=f64,
                                                                                               device=self.V.device)
        beta = th.ln.bias.detach().to(f64) if th.ln.bias is not None else None
        self.c = (self.V @ beta if beta is not None else 0) + (
            th.head.bias.detach().to(f64) if th.head.bias is not None else 0)
        self.P = th.proj.weight.detach().to(f64) if th.proj is not None else None  # (D, I)
        self.n_vocab = self.V.shape[0]
        self.units = self.flat if param == "bias" else self.flat // target.in_features
        self.exact_entries = self.entries = 0  # (pair, token)s the exact form scored, of all with d != 0

    @property
    def kind(self) -> str:
        return "layernorm"

    @property
    def description(self) -> str:
        how = ("O(1) per weight and token from mixed moments" if self.moments_on
               else "O(vocabulary) per weight and token")
        return f"{self.th.description}: LayerNorm closed form, {how}" + self.why

    @property
    def counts(self) -> dict:
        """The moment path's (pair, token) counts: how many the exact O(vocabulary) form scored."""
        if not self.moments_on:
            return {}
        return {"exact_pairs": self.exact_entries, "active_pairs": self.entries,
                "exact_fraction": self.exact_entries / max(1, self.entries)}

    def prepare(self, x, y) -> torch.Tensor:
        values = capture_values(self.graph, x)
        logits = check_logits(values[self.graph.logits], tokens=True)
        a, z, h = values[self.graph.target.args[0]], values[self.graph.target], values[self.th.add]
        if self.th.token is not None:
            a, z, h = a[:, self.th.token], z[:, self.th.token], h[:, self.th.token]
            rows = None
        else:
            rows = _rows(logits, y)
        f64 = torch.float64
        self.a, self.z, h = (t.reshape(-1, t.shape[-1]).to(f64) for t in (a, z, h))
        if rows is not None:
            self.a, self.z, h = self.a[rows], self.z[rows], h[rows]
        self.hc = h - h.mean(1, keepdim=True)
        self.var_h = (self.hc * self.hc).mean(1)
        self.s0 = torch.sqrt(self.var_h + self.th.ln.eps)
        self.A = (self.hc * self.gamma) @ self.V.t()  # (M, vocab)
        self.stats = self.mom = None  # the moment path's, per batch (made by the first score)
        if self.vals is None:
            self.vals = param_values(self.target, self.param, self.flat)
        return logits

    def chunk_size(self, n: int, max_memory: int) -> int:
        self.budget = min(max_memory, CPU_REPLAY_BYTES) if self.flat.device.type == "cpu" else max_memory
        self.moment_budget = max_memory // 2
        per_pair = MOMENT_BYTES_PER_ENTRY if self.moments_on else BYTES_PER_ENTRY * self.n_vocab
        return max(1, self.budget // (per_pair * max(self.a.shape[0], 1)))

    def unit_deltas(self, sl: slice):
        """(K, M) change d of each pair's unit after the element-wise maps, and the units."""
        flat, w = self.flat[sl], self.vals[sl]
        if self.param == "bias":
            i = flat
            u = self.z[:, i].t()
            up = u - w[:, None]
        else:
            J = self.target.in_features
            i, j = flat // J, flat % J
            u = self.z[:, i].t()
            up = u - w[:, None] * self.a[:, j].t()
        for step in self.th.steps:  # as weightablate.plan.Head.deltas
            if step[0] == "affine":
                g, s = step[1][i][:, None], step[2][i][:, None]
                u, up = g * u + s, g * up + s
            elif step[0] == "leaky":
                sl_ = step[1][i][:, None]
                u, up = torch.where(u > 0, u, sl_ * u), torch.where(up > 0, up, sl_ * up)
            else:
                u, up = step[1](u), step[1](up)
        return up - u, i

    def directions(self, units: torch.Tensor):
        """For the units (U,): cov(h, p) (U, M) with the batch's LayerNorm inputs, var_p (U,) and
        B = V (gamma * pc) (U, vocab), pc (U, D) being the units' centred directions."""
        if self.P is not None:
            p = self.P[:, units].t()
        else:
            p = torch.zeros(units.numel(), self.V.shape[1], dtype=torch.float64, device=self.V.device)
            p[torch.arange(units.numel(), device=p.device), units] = 1.0
        pc = p - p.mean(1, keepdim=True)
        return pc @ self.hc.t() / pc.shape[1], (pc * pc).mean(1), (pc * self.gamma) @ self.V.t()

    def score(self, batch, sl: slice):
        d, i = self.unit_deltas(sl)  # (K, M)
        if d.shape[1] == 0:  # no token of this batch counts (all labels ignore_index): nothing changes
            return score_logit_deltas(d.new_zeros(d.shape[0], 0, self.n_vocab), batch, self.want_flips,
                                      self.by_class, self._flip_dtype())
        if self.moments_on:
            return self._score_moments(batch, d, i, sl)
        units, inv = torch.unique(i, return_inverse=True)
        cov, var_p, B = self.directions(units)
        alpha, beta = self._scalars(d, cov[inv], var_p[inv])
        B = B[inv]
        # (pairs x tokens x vocabulary) blocks within the budget: tokens are split when one pair's are too many
        K, M = d.shape
        step = max(1, getattr(self, "budget", CPU_REPLAY_BYTES) // (BYTES_PER_ENTRY * K * self.n_vocab))
        total = None
        for r in (slice(t, t + step) for t in range(0, M, step)):
            dl = alpha[:, r, None] * self.A[None, r] + beta[:, r, None] * B[:, None, :]
            rows = Batch(logits=batch.logits[r], probs=batch.probs[r], labels=batch.labels[r])
            parts = score_logit_deltas(dl, rows, self.want_flips, self.by_class, self._flip_dtype())
            total = parts if total is None else tuple(
                a | b if a.dtype == torch.bool else a + b for a, b in zip(total, parts))
        return total

    def _flip_dtype(self):
        return torch.promote_types(self.target.weight.dtype, torch.float32)

    def _scalars(self, d, cov, var_p):
        """alpha = 1/s(d) - 1/s(0) and beta = d / s(d) (K, M) for pairs whose units have cov(h, p) (K, M)
        and var_p (K,)."""
        s0 = self.s0[None]
        grow = d * (2 * cov + d * var_p[:, None])  # s(d)^2 - s(0)^2
        s = torch.sqrt((self.var_h[None] + self.th.ln.eps) + grow)
        return -(grow / s / (s + s0)) / s0, d / s  # divided in turn: s s0 (s + s0) overflows for a huge residual

    def _moments_for(self, units: torch.Tensor, sl: slice):
        """The moments of a block of units that holds ``units`` (the chunk's) and, within the moment
        budget, the units of the weights that follow: one set of matrix products serves many chunks."""
        if self.mom is not None and bool(torch.isin(units, self.mom_units).all()):
            return
        M = max(self.a.shape[0], 1)
        cap = max(units.numel(), self.moment_budget // (MOMENT_BYTES_PER_UNIT_TOKEN * M))
        ahead = torch.unique_consecutive(self.units[sl.stop: sl.stop + cap * max(1, self.target.in_features)])
        ahead = ahead[~torch.isin(ahead, units)][: cap - units.numel()]
        self.mom_units = torch.unique(torch.cat([units, ahead]))
        self.cov_m, self.var_m, self.B_m = self.directions(self.mom_units)  # per unit, not per weight
        self.mom = unit_moments(self.stats, self.B_m)

    def _score_moments(self, batch, d, i, sl):
        if self.stats is None:
            self.stats = TokenStats(self.A, batch.logits, batch.probs, batch.labels)
        units = torch.unique(i)
        self._moments_for(units, sl)
        slot = torch.searchsorted(self.mom_units, i)
        alpha, beta = self._scalars(d, self.cov_m[slot], self.var_m[slot])
        flip_dtype = self._flip_dtype()
        eps = torch.finfo(flip_dtype).eps
        dce, kl, uncertified = score_pairs(alpha, beta, slot, self.stats, self.mom, self.backend)
        K, M = d.shape
        active = d != 0
        uncertified &= active
        dce.masked_fill_(~active, 0.0), kl.masked_fill_(~active, 0.0)  # d = 0 changes nothing (0 * inf moments: NaN)
        flips = torch.zeros(K, M, dtype=torch.bool, device=d.device)
        new_err, new_corr = torch.zeros_like(flips), torch.zeros_like(flips)
        if self.want_flips:  # the margin cannot rule a flip out: the argmax over the nearest classes, or all
            x, rounding = flip_size(alpha, beta, slot, self.stats, self.mom, eps)
            fk, ft = (active & ~uncertified & (x >= self.stats.margin[None] - rounding)).nonzero(as_tuple=True)
            near = x[fk, ft] < self.stats.near_gap[ft] - rounding[fk, ft]
            nk, nt = fk[near], ft[near]
            if nk.numel():
                flips[nk, nt], new_err[nk, nt], new_corr[nk, nt] = near_flips(
                    alpha[nk, nt], beta[nk, nt], self.A, self.B_m, slot[nk], batch, self.stats, nt, flip_dtype)
            uncertified[fk[~near], ft[~near]] = True
        k, t = uncertified.nonzero(as_tuple=True)
        if k.numel():
            out = exact_entries(alpha[k, t], beta[k, t], self.A, self.B_m, slot[k], batch, t, flip_dtype,
                                self.want_flips)
            dce[k, t], kl[k, t], flips[k, t], new_err[k, t], new_corr[k, t] = out
        self.exact_entries += int(k.numel())
        self.entries += int(active.sum())
        # the logits move when d != 0 reaches them through B_i (beta) or through the normalisation (alpha)
        moved = ((beta != 0) & (self.mom["abs"][slot] > 0)[:, None]) | ((alpha != 0) & (self.stats.A_abs > 0)[None])
        nonzero = (active & moved).any(1)
        class_loss = torch.zeros(K, self.n_vocab if self.by_class else 0, dtype=torch.float64, device=d.device)
        if self.by_class:
            class_loss.index_add_(1, batch.labels, dce)
        return (dce.sum(1), kl.sum(1), flips.sum(1), new_err.sum(1), new_corr.sum(1), nonzero, class_loss)


def _rows(logits, y):
    """Flat token indices (into N*T) of the predictions that count."""
    from .tokens import token_positions

    pos = token_positions(logits, y)
    return pos if pos is not None else torch.arange(logits.shape[0], device=logits.device)

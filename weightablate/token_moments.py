"""The LayerNorm closed form's moment path: O(1) per (weight, token) instead of O(vocabulary).

weightablate.token_head reduces an ablation to the logit change ``alpha A_t + beta B_i`` (``A_t``:
the token's direction, ``B_i``: the unit's, both over the vocabulary; ``alpha``, ``beta``: two
scalars per (weight, token)). About the token's top class ``c*`` (``a = A_t - A_t[c*]``,
``b = B_i - B_i[c*]``; the top class's own term is zero, so every moment carries ``q = 1 - p_top``)
the change of the log-partition is ``log1p(S)`` with

    S = sum_c p_c expm1(alpha a_c + beta b_c) = sum_{1 <= r+s} alpha^r beta^s mu_rs / (r! s!),
    mu_rs[t, i] = sum_c p_tc a_tc^r b_ic^s,

so with the mixed moments of order r + s <= D (per token and unit: matrix products over the
vocabulary, once per batch and unit, shared by all the unit's weights) a pair costs O(D^2):
KL = S_2 + (log1p(S) - S) (S_2: the terms of order >= 2) and dCE = KL + alpha (E_p a - a_y) +
beta (E_p b - b_y). Truncating after order D errs by at most ``sum_c p_c |y_c|^(D+1) e^|y_c| / (D+1)!``
with ``|y_c| <= x = |alpha| max|a| + |beta| (max B_i - min B_i)``, so by ``min(q x^D, E_p[y^D]) x e^x /
(D+1)!`` (D even: ``E_p[y^D] >= 0`` is the series' own order-D term times D!, taken with its rounding
bound; it is the tight one, as most of p sits on classes with |y_c| far below x). A (weight, token)
whose bound exceeds CERTIFY * KL (or x > 1/2) is scored by the exact O(vocabulary) form instead; one
whose flip the margin test ``x < margin - rounding`` cannot rule out is resolved over the token's NEAR
nearest classes (or all of them). The b-moments are
taken about the unit's mean over the vocabulary and shifted binomially to the top class per token,
as in weightablate.fused; everything is float64.
"""
from __future__ import annotations

import math

import torch

from ._reference import _exact_kl

ORDER = 6  # D: mixed moments of order r + s <= D (even: the certificate uses E_p[y^D] >= 0)
CERTIFY = 1e-10  # the truncation bound allowed, relative to the pair's KL
LOG_SERIES_MAX = 6.5e-3  # |S| up to which log1p(S) - S is summed as its series (degree 9)
# the moments' relative rounding assumed by the cancellation guard (64 ulps: sums over the vocabulary);
# a pair whose order-2 terms exceed CERTIFY / CANCEL times its KL is scored by the exact form
CANCEL = 64 * 2.0 ** -52
_BLOCK = 1 << 24  # float64 entries of one (tokens x vocabulary) temporary
EXACT_BLOCK = 1 << 23  # (pairs x vocabulary) entries of one block of the exact fallback
NEAR = 16  # a flip the margin test cannot rule out is resolved over the top class and the NEAR next
_PAIRS = [(r, s) for k in range(1, ORDER + 1) for r in range(k + 1) for s in (k - r,)]


def log1p_minus(s: torch.Tensor) -> torch.Tensor:
    """log1p(s) - s without the cancellation at small |s|."""
    small = s.abs() <= LOG_SERIES_MAX
    series = torch.zeros_like(s)
    for k in range(9, 1, -1):  # sum_{k=2..9} (-1)^(k+1) s^k / k, by Horner
        series = (series + (-1) ** (k + 1) / k) * s
    series = series * s
    return torch.where(small, series, torch.log1p(s) - s)


class TokenStats:
    """Per-token quantities of one batch: top class, the a-moments, margins. The (tokens x vocabulary)
    matrices a = A - A[top] and the probabilities without the top class are made block by block
    (``blocks``) when needed, not kept: with a real vocabulary each is gigabytes."""

    def __init__(self, A: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor):
        M, V = A.shape
        self.M, self.V, self.A, self.probs = M, V, A, probs
        self.top = logits.argmax(1)
        self.q = torch.empty(M, dtype=torch.float64, device=A.device)
        self.a_max, self.gap_a = torch.empty_like(self.q), torch.empty_like(self.q)
        self.amom = [torch.empty_like(self.q) for _ in range(ORDER)]  # amom[r - 1][t] = mu_r0
        for rows, rest, a in self.blocks():
            self.q[rows] = rest.sum(1)
            self.a_max[rows] = a.abs().amax(1)
            ar = rest
            for r in range(ORDER):
                ar = ar * a
                self.amom[r][rows] = ar.sum(1)
            self.gap_a[rows] = self.amom[0][rows] - a.gather(1, labels[rows][:, None])[:, 0]
        vals, idx = logits.topk(min(V, NEAR + 2), 1)
        inf = torch.full((M,), math.inf, dtype=logits.dtype, device=logits.device)
        self.margin = vals[:, 0] - vals[:, 1] if V > 1 else inf
        self.near = idx[:, : NEAR + 1]  # the top class and the NEAR next, by logit
        self.near_gap = vals[:, 0] - vals[:, NEAR + 1] if V > NEAR + 1 else inf
        self.logit_abs = logits.abs().amax(1)
        self.A_abs = A.abs().amax(1)
        self.labels = labels

    def blocks(self):
        """(rows, rest, a) over blocks of tokens: rest = p without the top class (its terms are zero:
        left out exactly), a = A - A[top]; each (block, V) float64."""
        step = max(1, _BLOCK // max(self.V, 1))
        for t0 in range(0, self.M, step):
            rows = slice(t0, min(t0 + step, self.M))
            top = self.top[rows]
            idx = torch.arange(top.numel(), device=top.device)
            rest = self.probs[rows].clone()
            rest[idx, top] = 0.0
            A = self.A[rows]
            yield rows, rest, A - A[idx, top][:, None]


def unit_moments(ts: TokenStats, B: torch.Tensor) -> dict:
    """The mixed moments mu_rs (M, U) of the units whose directions are the rows of B (U, V), the
    label gaps E_p b - b_y (M, U) and each unit's range max B - min B (U,)."""
    M, U = ts.M, B.shape[0]
    centre = B.mean(1, keepdim=True)
    Bc = B - centre
    powers = [Bc]
    for _ in range(ORDER - 1):
        powers.append(powers[-1] * Bc)
    raw = {}  # raw[(r, j)] = sum_c rest a^r (B - centre)^j, j >= 1
    for _, rest, a in ts.blocks():
        pr = rest
        for r in range(ORDER):
            for j in range(1, ORDER - r + 1):
                raw.setdefault((r, j), []).append(pr @ powers[j - 1].t())
            pr = pr * a
    raw = {k: torch.cat(v) for k, v in raw.items()}
    w = Bc.t()[ts.top]  # (M, U): B[top] - centre
    neg = [torch.ones_like(w)]
    for _ in range(ORDER):
        neg.append(neg[-1] * -w)
    # mu_rs as views (M, U) of one (U, len(_PAIRS), M) tensor: each unit's moments contiguous over the tokens,
    # as the compiled kernel reads them
    packed = torch.empty(U, len(_PAIRS), M, dtype=w.dtype, device=w.device)
    mu = {}
    for n, (r, s) in enumerate(_PAIRS):  # (b)^s = (Bc - w)^s = sum_j binom(s, j) Bc^j (-w)^(s - j)
        mu[(r, s)] = packed[:, n].t()
        if s == 0:
            mu[(r, s)].copy_(ts.amom[r - 1][:, None].expand(M, U))
            continue
        base = ts.amom[r - 1][:, None] if r > 0 else ts.q[:, None]
        acc = base * neg[s]
        for j in range(1, s + 1):
            acc = acc + math.comb(s, j) * raw[(r, j)] * neg[s - j]
        mu[(r, s)].copy_(acc)
    del raw
    gap_b = (mu[(0, 1)] - (Bc.t()[ts.labels] - w)).t().contiguous().t()  # (M, U), contiguous over the tokens
    return {"mu": mu, "packed": packed, "gap_b": gap_b, "range": B.amax(1) - B.amin(1), "abs": B.abs().amax(1)}


def has_kernel() -> bool:
    """Whether this build has the compiled CPU kernel of score_pairs (weightablate::token_moment_scores)."""
    from . import ops

    return ((ORDER, LOG_SERIES_MAX, CANCEL) == KERNEL_CONSTANTS and ops._LOAD_ERROR is None
            and hasattr(torch.ops.weightablate, "token_moment_scores")  # a library built before the op lacks it
            and ops._has_kernel("token_moment_scores", "CPU"))


KERNEL_CONSTANTS = (6, 6.5e-3, 64 * 2.0 ** -52)  # the ORDER, LOG_SERIES_MAX, CANCEL the kernel is written for


def score_pairs(alpha, beta, slot, ts: TokenStats, mom: dict, backend: str = "auto"):
    """(dce, kl, undecided (K, M) bool) for the pairs (K, M) whose unit has row ``slot`` (K,) in
    ``mom``; undecided marks the (pair, token)s the certificate leaves to the exact form (their dce
    and kl here are not to be used; flips are flip_size's and near_flips' business). The compiled kernel on CPU tensors when this build
    has it, unless ``backend`` is "torch"; else score_pairs_reference (same operations, same order:
    the results agree to the last bits of exp, log1p and x^D)."""
    if backend != "torch" and alpha.device.type == "cpu" and has_kernel():
        return torch.ops.weightablate.token_moment_scores(
            alpha, beta, slot, mom["packed"], ts.gap_a, mom["gap_b"].t(), ts.a_max, ts.q, mom["range"], ts.V, CERTIFY)
    return score_pairs_reference(alpha, beta, slot, ts, mom)


def score_pairs_reference(alpha, beta, slot, ts: TokenStats, mom: dict):
    """score_pairs in PyTorch: the reference the compiled kernel is tested against."""
    mu = {k: v.t()[slot] for k, v in mom["mu"].items()}  # (K, M)
    apow, bpow = [torch.ones_like(alpha)], [torch.ones_like(beta)]
    for n in range(1, ORDER + 1):
        apow.append(apow[-1] * alpha / n)  # alpha^n / n!
        bpow.append(bpow[-1] * beta / n)
    s1 = alpha * mu[(1, 0)] + beta * mu[(0, 1)]
    s2 = torch.zeros_like(alpha)
    top = torch.zeros_like(alpha)  # the order-D terms: E_p[(alpha a + beta b)^D] / D!
    for r, s in _PAIRS:
        if r + s >= 2:
            term = apow[r] * bpow[s] * mu[(r, s)]
            s2 = s2 + term
            if r + s == ORDER:
                top = top + term
    kl = s2 + log1p_minus(s1 + s2)
    dce = kl + alpha * ts.gap_a[None] + beta * mom["gap_b"].t()[slot]
    x = alpha.abs() * ts.a_max[None] + beta.abs() * mom["range"][slot][:, None]
    # the remainder sum_c p_c |y_c|^(D+1) e^|y_c| / (D+1)! with |y_c| <= x, bounded by q x^(D+1) and,
    # D being even, by E_p[y^D] x (tighter: most of p sits on classes with |y_c| far below x);
    # E_p[y^D] is taken as computed plus its rounding bound (V + 2D + 4) 2u 2^D q x^D
    V = ts.V
    mD = top.clamp_min(0) * math.factorial(ORDER) + (V + 2 * ORDER + 4) * 4.4e-16 * 2 ** ORDER * ts.q[None] * x ** ORDER
    bound = torch.minimum(ts.q[None] * x ** ORDER, mD) * x * torch.exp(x) / math.factorial(ORDER + 1)
    # the cancellation guard: alpha a and beta b can nearly cancel (a massive residual feature along the unit's
    # direction), then KL is a small difference of the order-2 terms, whose size this bounds
    t2 = alpha.abs() * mu[(2, 0)].clamp_min(0).sqrt() + beta.abs() * mu[(0, 2)].clamp_min(0).sqrt()
    t2 = t2 * t2 / 2
    undecided = (x > 0.5) | (bound > CERTIFY * kl) | (CANCEL * t2 > CERTIFY * kl)
    undecided |= ~(torch.isfinite(kl) & torch.isfinite(dce))  # an overflow (x^D of a huge residual) is never scored
    return dce, kl, undecided


def flip_size(alpha, beta, slot, ts: TokenStats, mom: dict, flip_eps: float):
    """(x, rounding) (K, M): x bounds the change of every logit gap to the top class, rounding the
    logits' rounding to the model's dtype (|l| + |dl| bounds their size): a class whose gap to the top
    exceeds x + rounding stays strictly below it."""
    x = alpha.abs() * ts.a_max[None] + beta.abs() * mom["range"][slot][:, None]
    size = ts.logit_abs[None] + alpha.abs() * ts.A_abs[None] + beta.abs() * mom["abs"][slot][:, None]
    return x, 4 * flip_eps * size


def near_flips(alpha, beta, A, B, u, batch, ts: TokenStats, t, flip_dtype):
    """(flip, new_err, new_corr) (E,) of entries (token t, unit row u of B) whose flip can only go
    to one of the token's NEAR nearest classes: argmax of the rounded logits over the top class and
    those (first index on ties, as torch.argmax over all classes)."""
    cls = ts.near[t]  # (E, NEAR + 1)
    dl = alpha[:, None] * A[t[:, None], cls] + beta[:, None] * B[u[:, None], cls]  # as exact_entries
    now_v = (batch.logits[t[:, None], cls] + dl).to(flip_dtype)
    best = now_v.amax(1, keepdim=True)
    V = batch.logits.shape[1]
    now = torch.where(now_v == best, cls, V).amin(1)
    pred, y = ts.top[t], batch.labels[t]
    flip = now != pred
    return flip, flip & (pred == y), flip & (now == y)


def exact_entries(alpha, beta, A, B, u, batch, t, flip_dtype, want_flips):
    """The exact O(vocabulary) scores of E (pair, token) entries: alpha, beta (E,), the token rows t
    (E,) and their units' rows u (E,) of the directions B (U, V): (dce, kl, flip, new_err, new_corr)
    (E,). Blocks of EXACT_BLOCK (entries x vocabulary): E can be most of a chunk (confident tokens)."""
    E = alpha.shape[0]
    V = A.shape[1]
    out = [torch.zeros(E, dtype=torch.float64, device=A.device) for _ in range(2)] + [
        torch.zeros(E, dtype=torch.bool, device=A.device) for _ in range(3)]
    step = max(1, EXACT_BLOCK // max(V, 1))
    ones = torch.ones(E, dtype=torch.float64, device=A.device)
    for e in range(0, E, step):
        sl = slice(e, e + step)
        tt = t[sl]
        dl = alpha[sl, None] * A[tt] + beta[sl, None] * B[u[sl]]
        kl, m1 = _exact_kl(batch.probs[tt], dl, ones[sl], batch.logits, tt)
        out[0][sl] = kl + m1 - dl.gather(1, batch.labels[tt][:, None])[:, 0]
        out[1][sl] = kl
        if want_flips:
            pred = batch.logits[tt].argmax(1)
            now = (batch.logits[tt] + dl).to(flip_dtype).argmax(1)
            flip = now != pred
            out[2][sl], out[3][sl] = flip, flip & (pred == batch.labels[tt])
            out[4][sl] = flip & (now == batch.labels[tt])
    return out

"""Pure-PyTorch implementations of the ops, with the signatures of csrc/weightablate.cpp.

Same formulas as the kernels (see csrc/numerics.h), written as tensor expressions over
(pairs, classes) blocks. The compiled kernels are tested against these; they are also the
fallback when the extension is not built.
"""
from __future__ import annotations

import math

import torch

MOMENT_CERT_TOL = 1e-10  # csrc/numerics.h: kMomentCertTol
MOMENT_MIN_VAR_RATIO = 1e-6  # kMomentMinVarRatio
PHI_SERIES_MAX = 0.25  # kPhiSeriesMax
LOG_SPACE_MIN = 30.0  # kLogSpaceMin
EXP_MAX = 700.0  # kExpMax
TINY_P = 1e-290  # kTinyP
_BLOCK = 1 << 22  # elements of one (pairs x classes) block


def phi(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 - x, accurate relative to itself."""
    s = torch.full_like(x, 1.0 / 87178291200.0)
    for k in range(13, 1, -1):
        s = s * x + 1.0 / math.factorial(k)
    series = s * x * x
    return torch.where(x.abs() <= PHI_SERIES_MAX, series, torch.expm1(x) - x)


def log1p_minus(s: torch.Tensor) -> torch.Tensor:
    """log1p(s) - s, accurate relative to itself."""
    acc = torch.zeros_like(s)
    for k in range(19, 1, -1):
        acc = acc * s + (-1.0 if k % 2 == 0 else 1.0) / k
    return torch.where(s.abs() < 0.1, acc * s * s, torch.log1p(s) - s)


def pair_deltas(a_t, z_t, rows, cols, w, gain, shift, slope):
    delta = w.double()[:, None] * a_t[cols].double()  # exact: a product of two float32
    g = gain[rows][:, None]
    u = g * z_t[rows].double() + shift[rows][:, None]
    du = -g * delta
    up = u + du
    sl = slope[rows][:, None]
    mixed = torch.where(up > 0, up, sl * up) - torch.where(u > 0, u, sl * u)
    d = torch.where((u > 0) & (up > 0), du, torch.where((u <= 0) & (up <= 0), sl * du, mixed))
    return torch.where(delta == 0, torch.zeros_like(d), d)


def _sample_stats(logits, probs):
    top = logits.argmax(1)
    others = logits.scatter(1, top[:, None], float("-inf"))
    margin = logits.gather(1, top[:, None])[:, 0] - others.amax(1)
    q_top = probs.scatter(1, top[:, None], 0.0).sum(1)
    return top, margin, q_top


def _moment_kl(m, d, vabs):
    """Moment-path KL for each pair, and whether its truncation error is certified."""
    order = m.shape[0]
    x = d.abs() * vabs
    m1, m2 = m[0], m[1]
    var = m2 - m1 * m1
    tail = torch.full_like(x, 1.6487212707001282)  # e^0.5 >= e^x
    for k in range(1, order + 2):
        tail = tail * x / k
    ok = (x <= 0.5) & (var > MOMENT_MIN_VAR_RATIO * m2) & (tail <= MOMENT_CERT_TOL * 0.5 * d * d * var)
    s2, dk = torch.zeros_like(d), d * d * 0.5
    for k in range(2, order + 1):
        s2 = s2 + dk * m[k - 1]
        dk = dk * d / (k + 1)
    return s2 + log1p_minus(d * m1 + s2), m1, ok


def log_mean_exp(logits, x):
    """log sum_c p_c e^(x_c) with p = softmax(logits), rows of (B, C): numerics.h's log_mean_exp.

    From the logits with their maxima shifted out, so a class whose p_c underflows to 0 in float64
    (logit gaps above ~745) still counts, and a common offset of the logits does not matter."""
    g = logits - logits.amax(1, keepdim=True)
    return torch.logsumexp(g + x, 1) - torch.logsumexp(g, 1)


def _exact_kl(p, v, d, logits, rows):
    """KL(p || softmax(l + d v)) over (B, C) blocks, and m1 = E_p v; ``logits[rows]`` are the rows' logits.

    With m1 rounded, t = sum p phi(d w) and r = sum p w = E_p v - m1 (rounding-sized), w = v - m1:
    S = t + d r = sum p (e^(d w) - 1) and KL = log1p(S) - d r, so the rounding of m1 does not reach
    the KL (it can flip the sign of a tiny one); m1 + r is the better mean. (The cpu kernel computes
    the same KL as t + (log1p(S) - S) for small S: no log1p call there.) Rows whose shifts d w span
    more than LOG_SPACE_MIN are computed from the logits instead (p e^(d w) may overflow there, or
    hinge on a p that underflowed to 0)."""
    m1 = (p * v).sum(1)
    w = v - m1[:, None]
    x = d[:, None] * w
    t, r = (p * phi(x)).sum(1), (p * w).sum(1)
    s = t + d * r
    kl, mean = torch.log1p(s) - d * r, m1 + r
    huge = x.abs().amax(1) > LOG_SPACE_MIN
    if huge.any():
        kl[huge], mean[huge] = log_mean_exp(logits[rows[huge]], x[huge]), m1[huge]
    return kl, mean


def score_deltas(d, unit, head, probs, logits, labels, moments, moment_slot, flips, by_class=False):
    K, N = d.shape
    C = probs.shape[1]
    f64 = dict(dtype=torch.float64, device=d.device)
    i64 = dict(dtype=torch.int64, device=d.device)
    dloss, dkl = torch.zeros(K, **f64), torch.zeros(K, **f64)
    n_flips, n_err, n_corr = torch.zeros(K, **i64), torch.zeros(K, **i64), torch.zeros(K, **i64)
    nonzero = (d != 0).any(1)
    class_loss = torch.zeros(K, C if by_class else 0, **f64)
    top, margin, q_top = _sample_stats(logits, probs)
    if head is not None:
        vmax, vmin = head.amax(1), head.amin(1)
        vrange = vmax - vmin if C > 1 else torch.zeros_like(vmax)
        vabs = torch.maximum(vmax.abs(), vmin.abs())
    k_all, n_all = (d != 0).nonzero(as_tuple=True)
    block = max(1, _BLOCK // max(C, 1))
    for s in range(0, k_all.numel(), block):
        k, n = k_all[s : s + block], n_all[s : s + block]
        dd, i, y, p = d[k, n], unit[k], labels[n], probs[n]
        if head is None:
            pi = p.gather(1, i[:, None])[:, 0]
            qi = torch.where((i == top[n]) & (pi > 0.5), q_top[n], 1.0 - pi)
            kl = logits_layer_kl(dd, i, pi, qi, logits[n])
            dce = kl + dd * torch.where(i == y, -qi, pi)
            rng = torch.ones_like(dd) if C > 1 else torch.zeros_like(dd)
        else:
            v = head[i]
            kl = torch.zeros_like(dd)
            m1 = torch.zeros_like(dd)
            todo = torch.ones_like(dd, dtype=torch.bool)
            if moments is not None:
                slot = moment_slot[i]
                has = slot >= 0
                if has.any():
                    m = moments[:, slot.clamp(min=0), n]
                    kl_m, m1_m, ok = _moment_kl(m, dd, vabs[i])
                    ok = ok & has
                    kl, m1, todo = torch.where(ok, kl_m, kl), torch.where(ok, m1_m, m1), ~ok
            if todo.any():
                kl_e, m1_e = _exact_kl(p[todo], v[todo], dd[todo], logits, n[todo])
                kl[todo], m1[todo] = kl_e, m1_e
            dce = kl + dd * (m1 - v.gather(1, y[:, None])[:, 0])
            rng = vrange[i]
        dloss.index_add_(0, k, dce)
        if by_class:
            class_loss.view(-1).index_add_(0, k * C + y, dce)
        dkl.index_add_(0, k, kl)
        if flips:
            add_flips(dd.abs() * rng >= margin[n], k, n, dd, i, head, logits, top, labels, (n_flips, n_err, n_corr))
    return dloss, dkl, n_flips, n_err, n_corr, nonzero, class_loss


def logits_layer_kl(dd, i, pi, qi, logits_n):
    """KL of the logits layer's pairs (shift dd on logit i, p_i, q_i = 1 - p_i accurately; the
    pairs' rows of logits): the two-term closed form, and from the logits where numerics.h's
    unit_needs_logits says so (the shifts are d q_i at i and -d p_i elsewhere)."""
    kl = torch.log1p(pi * phi(dd * qi) + qi * phi(-dd * pi))
    a = dd.abs()
    huge = (a > LOG_SPACE_MIN) & ((a > EXP_MAX) | (torch.minimum(pi, qi) < TINY_P))
    if huge.any():
        hot = torch.nn.functional.one_hot(i[huge], logits_n.shape[1]).bool()
        x = dd[huge, None] * torch.where(hot, qi[huge, None], -pi[huge, None])
        kl[huge] = log_mean_exp(logits_n[huge], x)
    return kl


def add_flips(cand, k, n, dd, i, head, logits, top, labels, counts) -> None:
    """Resolve the flip candidates ``cand`` (pairs the margin test could not rule out) by argmax and
    add them to ``counts`` = (flips, new_errors, new_correct) per weight."""
    if not cand.any():
        return
    kc, nc, dc = k[cand], n[cand], dd[cand]
    shifted = logits[nc].clone()
    if head is None:
        shifted[torch.arange(nc.numel(), device=dd.device), i[cand]] += dc
    else:
        shifted = shifted + dc[:, None] * head[i[cand]]
    now, pred, yc = shifted.argmax(1), top[nc], labels[nc]
    flip = now != pred
    n_flips, n_err, n_corr = counts
    n_flips.index_add_(0, kc, flip.long())
    n_err.index_add_(0, kc, (flip & (pred == yc)).long())
    n_corr.index_add_(0, kc, (flip & (now == yc)).long())

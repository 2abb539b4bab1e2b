"""Pure-PyTorch fused_scores, with the signature of csrc/weightablate.cpp: pair_deltas' d and
score_deltas' sums in one op, the moments taken about each sample's top class (weightablate.fused).

What the cpu kernel computes, as tensor expressions over blocks of (weight, sample) pairs: the
compiled kernel is tested against it, and it against the two-stage reference and the float64 oracle.
"""
from __future__ import annotations

import math

import torch

from . import _reference
from ._reference import MOMENT_CERT_TOL, MOMENT_MIN_VAR_RATIO

MIN_Q = 1e-200  # csrc/cpu/fused_cpu.cpp: kMinQ
_BLOCK = 1 << 21  # (weight, sample) pairs per block


def fused_scores(a_t, z_t, rows, cols, w, gain, shift, slope, head, probs, logits, labels, moments, mean_gap,
                 moment_slot, flips, by_class=False):
    K, N, C = rows.numel(), a_t.shape[1], probs.shape[1]
    f64 = dict(dtype=torch.float64, device=a_t.device)
    i64 = dict(dtype=torch.int64, device=a_t.device)
    dloss, dkl = torch.zeros(K, **f64), torch.zeros(K, **f64)
    n_flips, n_err, n_corr = torch.zeros(K, **i64), torch.zeros(K, **i64), torch.zeros(K, **i64)
    exact, active = torch.zeros(K, **i64), torch.zeros(K, **i64)
    class_loss = torch.zeros(K, C if by_class else 0, **f64)
    top, margin, q_top = _reference._sample_stats(logits, probs)
    # range bounds |v_c - v_top| (v = e_i for a logits layer)
    if head is not None:
        vrange = head.amax(1) - head.amin(1) if C > 1 else torch.zeros(head.shape[0], **f64)
    else:
        vrange = torch.full((gain.numel(),), 1.0 if C > 1 else 0.0, **f64)
    step = max(1, _BLOCK // max(N, 1))
    for b in range(0, K, step):
        kb = torch.arange(b, min(K, b + step), device=a_t.device)
        d = _reference.pair_deltas(a_t, z_t, rows[kb], cols[kb], w[kb], gain, shift, slope)
        active[kb] = (d != 0).sum(1)
        kl_, n_ = (d != 0).nonzero(as_tuple=True)
        k, n = kb[kl_], n_
        dd, i, y = d[kl_, n_], rows[k], labels[n]
        rng = vrange[i]
        p = probs[n]
        if head is None:
            pi = p.gather(1, i[:, None])[:, 0]
            qi = torch.where((i == top[n]) & (pi > 0.5), q_top[n], 1.0 - pi)
            kl = _reference.logits_layer_kl(dd, i, pi, qi, logits[n])
            dce = kl + dd * torch.where(i == y, -qi, pi)
        else:
            kl, dce = torch.zeros_like(dd), torch.zeros_like(dd)
            todo = torch.ones_like(dd, dtype=torch.bool)
            if moments is not None:
                slot = moment_slot[i]
                has = slot >= 0
                sl = slot.clamp(min=0)
                mu, gap = moments[:, sl, n], mean_gap[sl, n]
                kl_m, ok = moment_kl(mu, dd, dd.abs() * rng, q_top[n], rng, C)
                ok &= has
                kl, dce, todo = torch.where(ok, kl_m, kl), torch.where(ok, kl_m + dd * gap, dce), ~ok
            if todo.any():
                v = head[i[todo]]
                kl_e, mean = _reference._exact_kl(p[todo], v, dd[todo], logits, n[todo])
                kl[todo] = kl_e
                dce[todo] = kl_e + dd[todo] * (mean - v.gather(1, y[todo][:, None])[:, 0])
                exact.index_add_(0, k[todo], torch.ones_like(k[todo]))
        dloss.index_add_(0, k, dce)
        dkl.index_add_(0, k, kl)
        if by_class:
            class_loss.view(-1).index_add_(0, k * C + y, dce)
        if flips:
            _reference.add_flips(dd.abs() * rng >= margin[n], k, n, dd, i, head, logits, top, labels,
                                 (n_flips, n_err, n_corr))
    return dloss, dkl, n_flips, n_err, n_corr, active > 0, class_loss, exact, active


def moment_kl(mu, d, x, q, rng, n_classes):
    """KL of the moment path about the top class for each pair, and whether it is certified.

    mu (D, P): sum_c p_c (v_c - v_top)^k. The truncation tail (csrc/cpu/fused_cpu.cpp: certificate)
    e^1.5 |d|^(D+1) min(q range^(D+1), range^(D+1-E) mu_E) / (D+1)! (E = D or D - 1, even; mu_E with
    its rounding bound added; x = |d| range bounds |d (v_c - v_top)|) must stay below
    MOMENT_CERT_TOL x d^2 var / 2, and var = mu2 - mu1^2 must stand well above its rounding
    (~eps 4 q range^2)."""
    order = mu.shape[0]
    m1, m2 = mu[0], mu[1]
    var = m2 - m1 * m1
    gate = (q == 0) | ((q > MIN_Q) & (var >= MOMENT_MIN_VAR_RATIO * 4.0 * q * rng * rng))
    even = order if order % 2 == 0 else order - 1
    mu_bound = mu[even - 1].clamp(min=0) + (n_classes + 2 * even + 4) * 4.4e-16 * 2**even * q * rng**even
    coef = math.exp(1.5) / math.factorial(order + 1)
    rest = rng ** (order + 1 - even)
    tc = torch.minimum(q * rng**even * rest, mu_bound * rest) * coef
    ok = (x <= 0.5) & gate & (d.abs() ** (order + 1) * tc <= MOMENT_CERT_TOL * 0.5 * var * d * d)
    s2, dk = torch.zeros_like(d), d * d * 0.5
    for k in range(2, order + 1):
        s2 = s2 + dk * mu[k - 1]
        dk = dk * d / (k + 1)
    return s2 + _reference.log1p_minus(d * m1 + s2), ok

"""The fused whole-layer path's per-batch inputs: moments about each sample's top class.

For sample n with top class t = argmax_c l_nc and unit i with logit direction v (C,),
    mu_k[i, n] = sum_c p_nc (v_c - v_t)^k,  k = 1..D      mean_gap[i, n] = E_p[v] - v_y.
The top class's own term is exactly zero, so every moment scales with q = 1 - p_t: a confident
sample keeps full relative precision (raw moments sum_c p v^k lose it in m2 - m1^2). They are D
matrix products of (v - c)^j with the non-top probabilities (c = the row's mean: no offset to
cancel), shifted binomially to v_t per (unit, sample); the shift's terms stay within 2^k q range^k.
"""
from __future__ import annotations

import math

import torch

_BLOCK_ELEMENTS = 1 << 23  # (units x samples) elements of one block's temporaries


def top_moments(head_rows, moment_slot, probs, logits, labels, order):
    """(moments (D, M, N), mean_gap (M, N)) float64 for the units with moment_slot >= 0."""
    V = head_rows[moment_slot >= 0]
    W = V - V.mean(1, keepdim=True)
    N = probs.shape[0]
    top = logits.argmax(1)
    rest = probs.scatter(1, top[:, None], 0.0)  # p without the top class
    q = rest.sum(1)
    rest_t = rest.t().contiguous()
    M = W.shape[0]
    moments = torch.empty(order, M, N, dtype=torch.float64, device=probs.device)
    gap = torch.empty(M, N, dtype=torch.float64, device=probs.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, N * (order + 3)))
    for b in range(0, M, step):
        Wb = W[b : b + step]
        raw, wj = [q.expand(Wb.shape[0], N)], Wb
        for _ in range(order):  # raw[j] = sum_{c != t} p_c (v_c - c)^j
            raw.append(wj @ rest_t)
            wj = wj * Wb
        wt = Wb[:, top]  # (B, N): v_t - c
        neg = [torch.ones_like(wt)]
        for _ in range(order):
            neg.append(neg[-1] * -wt)
        for k in range(1, order + 1):  # (v - v_t)^k = sum_j binom(k, j) (v - c)^j (c - v_t)^(k - j)
            acc = raw[k].clone()
            for j in range(k):
                acc += math.comb(k, j) * raw[j] * neg[k - j]
            moments[k - 1, b : b + step] = acc
        # E_p[v] - v_y = mu_1 - (v_y - v_top): exactly mu_1 when y is the top class (relative precision
        # for a confident sample, where E_p[v] - v_y from a dot product keeps only eps |v| absolute)
        gap[b : b + step] = moments[0, b : b + step] - (Wb[:, labels] - wt)
    return moments, gap

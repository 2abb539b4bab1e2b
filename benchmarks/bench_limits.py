"""The arithmetic limit of the closed-form (cpu) path: the FLOPs it does, at the machine's matmul rate.

Counted (not timed), with the library's own building blocks, on the benchmarked selection:

* capture: one forward pass, ``2 N sum(in x out)`` over the model's Linear layers (float32);
* moments: ``2 N C M D`` for the M units that get raw moments (float64 GEMMs, D = 6);
* per pair (float64): ``PAIR_DELTA_FLOPS`` for every (weight, sample) in stage 1; for each pair with
  d != 0, ``MOMENT_PAIR_FLOPS`` when its moment-path truncation is certified, otherwise the exact
  O(C) loop at ``exact_flops_per_class(x) x C`` (its Horner degree from x = |d| range); and ``FLIP_FLOPS_PER_CLASS x C`` for each pair the
  margin test does not prune (the O(C) argmax).

"Time at peak" = capture FLOPs / float32 matmul rate + (moment + pair FLOPs) / float64 matmul rate,
with the best rate measured by ``test_matmul_rate`` in the same session. It is a lower bound: the
per-pair work is element-wise code that rarely runs at GEMM speed.
"""
from __future__ import annotations

import torch
from torch import nn

PAIR_DELTA_FLOPS = 4  # w*a, g*z + s, u + du, the ReLU branch
MOMENT_PAIR_FLOPS = 70  # |d| vabs, var, truncation tail (2(D+1)), series (3(D-1)), log1p_minus (~38)
# dot (2) + centred phi series: v-m1, d*w, Horner of Deg - 1 terms (2 each), 2 products, 2 sums; the
# kernel picks Deg from the pair's x = |d| * range (score_deltas_cpu.cpp): 5, 7, 9, 11 or 14 terms
EXACT_FLOPS_BASE = 10
HORNER_TIERS = ((1e-4, 5), (5e-3, 7), (3e-2, 9), (0.1, 11), (float("inf"), 14))


def exact_flops_per_class(x: torch.Tensor) -> torch.Tensor:
    deg = torch.full_like(x, 14.0)
    for bound, d in reversed(HORNER_TIERS):
        deg = torch.where(x <= bound, float(d), deg)
    return EXACT_FLOPS_BASE + 2 * (deg - 1)
FLIP_FLOPS_PER_CLASS = 3  # l + d v, compare


@torch.no_grad()
def count_flops(wl, weights) -> dict:
    from weightablate import _reference as ref
    from weightablate import closed_form, ops
    from weightablate.capture import capture
    from weightablate.plan import closed_form_head
    from weightablate.selection import select_weights

    model, target = wl.model, wl.model.get_submodule(wl.layer)
    I, J = target.weight.shape
    flat = select_weights(weights, (I, J), 0)
    rows, cols = flat // J, flat % J
    w = target.weight.detach().reshape(-1)[flat]
    cap = capture(model, target, wl.layer, wl.X)
    N, C = cap.logits.shape
    head = closed_form_head(model, wl.layer, target, wl.X[:2])
    if head.kind != "piecewise":
        return {}
    V = head.rows()  # (I, C) float64
    slot = closed_form._moment_slots(rows, I, C, "cpu", "auto", torch.device("cpu"))
    M = int((slot >= 0).sum()) if slot is not None else 0
    D = closed_form.MOMENT_ORDER
    logits = cap.logits.double()
    probs = torch.softmax(logits, 1)
    moments = closed_form._moments(V, slot, probs) if M else None
    top2 = logits.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    vmax, vmin = V.amax(1), V.amin(1)
    vrange, vabs = vmax - vmin, torch.maximum(vmax.abs(), vmin.abs())
    a_t, z_t = cap.a.t().contiguous(), cap.z.t().contiguous()
    n_nonzero = n_moment = n_flip_cand = 0
    exact_flops = 0.0
    step = max(1, (64 << 20) // (8 * N))
    for s in range(0, flat.numel(), step):
        r, c = rows[s:s + step], cols[s:s + step]
        d = ops.pair_deltas("cpu", a_t, z_t, r, c, w[s:s + step], head.gain, head.shift, head.slope)
        k, n = (d != 0).nonzero(as_tuple=True)
        dd, i = d[k, n], r[k]
        n_nonzero += dd.numel()
        n_flip_cand += int((dd.abs() * vrange[i] >= margin[n]).sum())
        exact = torch.ones_like(dd, dtype=torch.bool)
        if moments is not None:
            has = slot[i] >= 0
            if has.any():
                m = moments[:, slot[i][has], n[has]]
                _, _, ok = ref._moment_kl(m, dd[has], vabs[i][has])
                n_moment += int(ok.sum())
                exact[has.nonzero()[:, 0][ok]] = False
        exact_flops += float(exact_flops_per_class(dd[exact].abs() * vrange[i][exact]).sum()) * C
    n_exact = n_nonzero - n_moment
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    capture_flops = 2 * N * sum(m.in_features * m.out_features for m in linears)
    moment_flops = 2 * N * C * M * D
    pair_flops = (flat.numel() * N * PAIR_DELTA_FLOPS + n_moment * MOMENT_PAIR_FLOPS
                  + exact_flops + n_flip_cand * FLIP_FLOPS_PER_CLASS * C)
    return {"weights": flat.numel(), "samples": N, "classes": C, "moment_units": M, "moment_order": D,
            "pairs": flat.numel() * N, "pairs_nonzero": n_nonzero, "pairs_moment_path": n_moment,
            "pairs_exact_path": n_exact, "pairs_flip_candidates": n_flip_cand,
            "capture_flops": capture_flops, "moment_flops": moment_flops, "pair_flops": pair_flops,
            "pair_flops_exact_path": exact_flops}


def arithmetic_limit(wl, weights, gflops: dict) -> dict | None:
    if "float32" not in gflops or "float64" not in gflops:
        return None
    f = count_flops(wl, weights)
    if not f:
        return None
    r32, r64 = gflops["float32"] * 1e9, gflops["float64"] * 1e9
    f["capture_s_at_peak"] = f["capture_flops"] / r32
    f["moments_s_at_peak"] = f["moment_flops"] / r64
    f["pairs_s_at_peak"] = f["pair_flops"] / r64
    f["time_at_peak_s"] = f["capture_s_at_peak"] + f["moments_s_at_peak"] + f["pairs_s_at_peak"]
    f["matmul_gflops_used"] = {"float32": gflops["float32"], "float64": gflops["float64"]}
    return f

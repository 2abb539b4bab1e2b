"""The self-check ``ablate`` runs before the sweep (``verify=True``, the default).

The chosen method scores a few of the chosen weights (the two of largest |w| and two drawn at
random) on the first few samples of the first batch, and the float64 zero-evaluate-restore loop
does the same on a float64 copy of the model. A summed delta_loss or delta_kl outside the stated
bound stops the call with a VerificationError naming the method and the weights: a construct the
dispatch did not see can make a method wrong, and then no number is returned."""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from .model_copy import copy_model
from .naive import Entries
from .tokens import IGNORE_INDEX, flat_tokens

SAMPLES = 8  # of the first batch
LARGEST, RANDOM = 2, 2  # probe weights: the largest |w| and a few drawn at random
# the stated accuracy (README, ablate's docstring): |error| <= RTOL |d| + ATOL sum_n |dCE_n| (+ the
# float64 loop's own rounding), for float32 activations and for float64 ones
BOUNDS = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-8, 1e-8)}


class VerificationError(RuntimeError):
    """The chosen method disagreed with the float64 zero-evaluate-restore loop on the self-check."""


def probe(flat: torch.Tensor, values: torch.Tensor, seed: int) -> torch.Tensor:
    """Positions (into ``flat``) of the weights the self-check scores."""
    K = flat.numel()
    if K <= LARGEST + RANDOM:
        return torch.arange(K)
    top = values.abs().double().topk(LARGEST).indices
    rest = torch.ones(K, dtype=torch.bool)
    rest[top] = False
    g = torch.Generator().manual_seed(seed)
    pick = rest.nonzero()[:, 0][torch.randperm(int(rest.sum()), generator=g)[:RANDOM]]
    return torch.cat([top, pick]).sort().values


def naive64(model64, name: str, param: str, flat: torch.Tensor, x, y) -> dict:
    """Per weight, over the samples x: summed dCE, summed |dCE|, KL, and the loop's own rounding."""
    layer = model64.get_submodule(name)
    store = Entries(getattr(layer, param + "_orig", getattr(layer, param)).data)
    x = x.double() if x.is_floating_point() else x
    out = {k: [] for k in ("delta_loss", "abs_sum", "delta_kl", "round")}
    with torch.no_grad():
        base, rows = flat_tokens(model64(x), y)  # per-token logits: one row per token that counts
        ce0, logp0 = F.cross_entropy(base, rows, reduction="none"), F.log_softmax(base, 1)
        for idx in flat.tolist():
            keep = store[idx].clone()
            try:
                store[idx] = 0
                logits = flat_tokens(model64(x), y)[0]
            finally:
                store[idx] = keep
            diff = F.cross_entropy(logits, rows, reduction="none") - ce0
            out["delta_loss"].append(diff.sum().item())
            out["abs_sum"].append(diff.abs().sum().item())
            out["delta_kl"].append((logp0.exp() * (logp0 - F.log_softmax(logits, 1))).sum().item())
            scale = logits.abs().amax(1) + base.abs().amax(1) + ce0.abs()
            out["round"].append(8 * torch.finfo(torch.float64).eps * scale.sum().item())
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _compare(got: dict, ref: dict, bound) -> tuple[float, tuple | None]:
    """The worst error as a fraction of the bound, and the first (key, k, allowed) beyond it."""
    rtol, atol = bound
    worst, bad = 0.0, None
    for key in ("delta_loss", "delta_kl"):
        have, want = got[key].cpu().double(), ref[key]
        allowed = rtol * want.abs() + atol * (ref["abs_sum"] + ref["delta_kl"].abs()) + ref["round"] + 1e-300
        ratio = (have - want).abs() / allowed
        over = ~(ratio <= 1)  # NaN counts as over
        if over.any() and bad is None:
            k = int(over.nonzero()[0, 0])
            bad = (key, k, float(have[k]), float(want[k]), float(allowed[k]), float(ratio[k]))
        worst = max(worst, float(ratio.nan_to_num(float("inf")).max()))
    return worst, bad


def self_check(run, name: str, target, param: str, flat: torch.Tensor, x, y, score, seed: int, method: str) -> str:
    """Score the probe weights with ``score(model, weights, x, y) -> dict`` (the chosen method) and
    with the float64 loop; raise VerificationError beyond the bound. Returns a one-line summary.

    A float32 run beyond the float32 bound is scored again by the same method on the float64 copy:
    if that agrees with the loop, the method is right and the float32 activations' rounding is
    what exceeded the bound (tiny effects of units near a ReLU kink): a UserWarning says so and
    suggests precision="float64"; otherwise the method is wrong and the call stops."""
    started = time.perf_counter()
    tensor = getattr(target, param)
    values = tensor.detach().reshape(-1)[flat.to(tensor.device)].cpu()
    positions = probe(flat.cpu(), values, seed)
    weights = flat.cpu()[positions]
    if y.dim() == 2:  # per-token labels: sequences with at least one token that counts
        keep = (y != IGNORE_INDEX).any(1)
        if not bool(keep.any()):
            return "not run: no token of the first batch counts (every label is ignore_index, -100)"
        if not bool(keep.all()) and isinstance(x, torch.Tensor):
            x, y = x[keep.to(x.device)], y[keep]
    x, y = x[:SAMPLES], y[:SAMPLES]
    got = score(run, weights, x, y)
    in64 = tensor.dtype == torch.float64
    model64 = run if in64 else copy_model(run, torch.float64)
    model64.eval()
    ref = naive64(model64, name, param, weights, x, y.to(next(model64.parameters()).device))
    worst, bad = _compare(got, ref, BOUNDS[torch.float64 if in64 else torch.float32])
    note = ""
    if bad is not None and not in64:
        worst64, bad64 = _compare(score(model64, weights, x.double() if x.is_floating_point() else x, y), ref,
                                  BOUNDS[torch.float64])
        if bad64 is None:
            key, k, have, want, allowed, ratio = bad
            note = (f"; float32 rounding gave {ratio:.3g}x the float32 bound on entry {int(weights[k])} ({key} "
                    f"{have:.6g} vs {want:.6g}), the method in float64 agreed")
            warnings.warn(f"ablate: on layer {name!r} the float32 activations' rounding exceeds the stated float32 "
                          f"bound on entry {int(weights[k])} ({key} {have:.6g}, the float64 loop {want:.6g}: "
                          f"{ratio:.3g}x the bound); the method itself agrees with the float64 loop when run in "
                          "float64, so the model's own float32 forward is what rounds (a tiny effect next to large "
                          "activations, a large common logit offset): pass precision='float64' for exact numbers",
                          UserWarning, stacklevel=3)
            worst = worst64
            bad = None
        else:
            bad = bad64
    if bad is not None:
        key, k, have, want, allowed, _ = bad
        raise VerificationError(
            f"ablate: self-check failed: method {method!r} gives {key}={have:.10g} for entry {int(weights[k])} of "
            f"{name}.{param} (value {values[positions[k]].item():.6g}) on the first {len(y)} samples, the float64 "
            f"zero-evaluate-restore loop {want:.10g} (allowed error {allowed:.3g}). The model has a construct this "
            "method does not follow: please report it; backend='naive' is exact on any model (slow); verify=False "
            "skips this check (not advised)")
    return (f"{len(weights)} weights x {len(y)} samples agreed with the float64 loop (worst error "
            f"{100 * worst:.2g}% of the bound) in {time.perf_counter() - started:.2f} s{note}")

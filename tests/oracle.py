"""The independent float64 oracle: zero one weight of a float64 copy, evaluate, restore.

Kept apart from weightablate.naive on purpose: the tests trust this file, not the library.
"""
import copy

import torch
import torch.nn.functional as F


class _Strided:
    """Entries of a non-contiguous tensor by row-major flat index, in place."""

    def __init__(self, t):
        self.t = t

    def _at(self, idx):
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), self.t.shape))

    def __getitem__(self, idx):
        return self.t[self._at(idx)]

    def __setitem__(self, idx, value):
        self.t[self._at(idx)] = value


def oracle(model, layer: str, X, y, flat_idx, param="weight"):
    """Per weight: summed CE change, sum of |per-sample CE change|, the oracle's own rounding
    bound, summed KL, flips and whether every logit stayed bitwise equal; all in float64."""
    m = copy.deepcopy(model).double().eval()
    X = X.double() if X.is_floating_point() else X
    t = getattr(m.get_submodule(layer), param).data
    w = t.view(-1) if t.is_contiguous() else _Strided(t)
    with torch.no_grad():
        base = m(X)
        ce0 = F.cross_entropy(base, y, reduction="none")
        logp0 = F.log_softmax(base, 1)
        pred0 = base.argmax(1)
        out = {k: [] for k in ("delta_loss", "abs_sum", "round", "delta_kl", "flips", "exact_zero")}
        for idx in flat_idx.tolist():
            keep = w[idx].item()
            w[idx] = 0.0
            logits = m(X)
            w[idx] = keep
            ce = F.cross_entropy(logits, y, reduction="none")
            diff = ce - ce0
            # the oracle's own float64 rounding: a few ulps of the logits behind every loss it subtracts
            # and of the two losses themselves (log C when the logits are tiny)
            scale = logits.abs().amax(1) + base.abs().amax(1) + ce.abs() + ce0.abs()
            out["round"].append(4 * torch.finfo(torch.float64).eps * scale.sum().item())
            out["delta_loss"].append(diff.sum().item())
            out["abs_sum"].append(diff.abs().sum().item())
            out["delta_kl"].append((logp0.exp() * (logp0 - F.log_softmax(logits, 1))).sum().item())
            out["flips"].append(int((logits.argmax(1) != pred0).sum()))
            out["exact_zero"].append(bool(torch.equal(logits, base)))
    dtypes = {"delta_loss": torch.float64, "abs_sum": torch.float64, "round": torch.float64, "delta_kl": torch.float64}
    return {k: torch.tensor(v, dtype=dtypes.get(k)) for k, v in out.items()}


def token_oracle(model, layer: str, X, y, flat_idx, param="weight", ignore_index=-100):
    """The oracle for a language model: logits (N, T, V), labels (N, T); every token whose label is
    not ``ignore_index`` counts once (summed token CE change, summed KL, flipped tokens)."""
    m = copy.deepcopy(model).double().eval()
    X = X.double() if X.is_floating_point() else X
    t = getattr(m.get_submodule(layer), param).data
    w = t.view(-1) if t.is_contiguous() else _Strided(t)
    keep_tok = (y != ignore_index).reshape(-1)

    def rows(logits):
        return logits.reshape(-1, logits.shape[-1])[keep_tok]

    labels = y.reshape(-1)[keep_tok]
    with torch.no_grad():
        base = rows(m(X))
        ce0 = F.cross_entropy(base, labels, reduction="none")
        logp0 = F.log_softmax(base, 1)
        out = {k: [] for k in ("delta_loss", "abs_sum", "delta_kl", "flips")}
        for idx in flat_idx.tolist():
            keep = w[idx].item()
            w[idx] = 0.0
            logits = rows(m(X))
            w[idx] = keep
            diff = F.cross_entropy(logits, labels, reduction="none") - ce0
            out["delta_loss"].append(diff.sum().item())
            out["abs_sum"].append(diff.abs().sum().item())
            out["delta_kl"].append((logp0.exp() * (logp0 - F.log_softmax(logits, 1))).sum().item())
            out["flips"].append(int((logits.argmax(1) != base.argmax(1)).sum()))
    out = {k: torch.tensor(v, dtype=torch.int64 if k == "flips" else torch.float64) for k, v in out.items()}
    out["n_tokens"] = int(keep_tok.sum())
    out["base_loss"] = ce0.mean().item()
    return out

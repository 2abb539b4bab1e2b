"""Statistics of one ablation sweep, as a JSON-ready dict and as text.

``summarize(result, train_result=None)`` collects what the original AlexNet study looked at: the
distribution of the loss change, how many weights help when zeroed (negative change) or change
nothing at all, prediction flips, how well |w| and w^2 predict importance (Pearson and
Spearman), and how well importance measured on train data predicts importance on test data.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

QUANTILES = (("q01", 0.01), ("q50", 0.50), ("q99", 0.99))


def _f(x) -> float:
    return float(x)


def _corr(x: np.ndarray, y: np.ndarray) -> dict:
    """Pearson and Spearman of two equal-length arrays; nan where undefined (fewer than 2
    finite pairs, or a constant input)."""
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return {"pearson": math.nan, "spearman": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = stats.pearsonr(x, y)[0]
        spearman = stats.spearmanr(x, y)[0]
    return {"pearson": _f(pearson), "spearman": _f(spearman)}


def _distribution(x: np.ndarray) -> dict:
    if x.size == 0:
        return {k: math.nan for k in ("mean", "std", "min", *(q for q, _ in QUANTILES), "max")}
    out = {"mean": _f(x.mean()), "std": _f(x.std()), "min": _f(x.min())}
    for name, q in QUANTILES:
        out[name] = _f(np.quantile(x, q))
    out["max"] = _f(x.max())
    return out


def _np(t):
    return None if t is None else t.detach().cpu().numpy()


def summarize(result, train_result=None, top: int = 5) -> dict:
    """A dict of plain Python numbers (nan where a statistic is undefined).

    Keys: ``layer``, ``layer_shape``, ``n_weights``, ``n_samples``, ``method``, ``head``,
    ``backend``, ``mode``, ``precision``, ``seconds``, ``base_loss``, ``base_accuracy``;
    ``delta_loss`` (mean/std/min/q01/q50/q99/max of the per-weight loss change summed over the
    samples), ``delta_loss_mean_per_sample`` (the same divided by n_samples: the change of the
    dataset's mean cross-entropy), ``n_negative`` (zeroing lowers the loss), ``n_exact_zero``
    (zeroing changes no logit), ``max_flips``, ``n_with_flips``, ``max_new_errors``,
    ``max_new_correct``; ``correlation`` with ``abs_w`` and ``w2`` (Pearson and Spearman of
    delta_loss against |w| and w^2), ``by_abs_w_quartile`` (delta_loss within each quartile of
    |w|), ``top`` (the ``top`` weights with the largest delta_loss) and, when ``train_result``
    is given, ``train`` (its base loss/accuracy and the train-vs-test Pearson/Spearman of
    delta_loss over the weights both results contain).
    """
    w = _np(result.weight).astype(np.float64)
    dl = _np(result.delta_loss)
    out = {
        "layer": result.layer, "layer_shape": list(result.layer_shape), "n_weights": int(len(result)),
        "weight_shape": list(result.weight_shape), "param": result.param, "position": position_names(result),
        "structure": getattr(result, "structure", "weight"),
        "n_samples": int(result.n_samples), "method": result.method, "head": result.head,
        "backend": result.backend, "mode": result.mode, "precision": result.precision,
        "seconds": _f(result.seconds), "base_loss": _f(result.base_loss),
        "base_accuracy": _f(result.base_accuracy),
        "n_exact_zero": int(_np(result.exact_zero).sum()),
    }
    if dl is not None:
        out["delta_loss"] = _distribution(dl)
        out["delta_loss_mean_per_sample"] = _distribution(dl / max(result.n_samples, 1))
        out["n_negative"] = int((dl < 0).sum())
        out["n_zero_delta"] = int((dl == 0).sum())
        out["correlation"] = {"abs_w": _corr(np.abs(w), dl), "w2": _corr(w * w, dl)}
        out["by_abs_w_quartile"] = _quartiles(np.abs(w), dl)
        order = np.argsort(-dl, kind="stable")[:top]
        rows, cols = _np(result.rows), _np(result.cols)
        at = positions(result)
        out["top"] = [{"row": int(rows[k]), "col": int(cols[k]), "at": at[int(k)], "weight": _f(w[k]),
                       "delta_loss": _f(dl[k])} for k in order]
    if result.delta_kl is not None:
        out["delta_kl"] = _distribution(_np(result.delta_kl))
    if result.flips is not None:
        flips = _np(result.flips)
        out["max_flips"] = int(flips.max()) if flips.size else 0
        out["n_with_flips"] = int((flips > 0).sum())
        out["max_new_errors"] = int(_np(result.new_errors).max()) if flips.size else 0
        out["max_new_correct"] = int(_np(result.new_correct).max()) if flips.size else 0
    if train_result is not None:
        out["train"] = _train_vs_test(result, train_result)
    return out


def position_names(result) -> str:
    """What a weight's position means: "(out, in, kh, kw)" for a Conv2d weight, "(row, col)" for a
    Linear weight, "(out)" for a bias entry."""
    names = list(result.coords())
    return "(row, col)" if names == ["out", "in"] else "(" + ", ".join(names) + ")"


def positions(result) -> list:
    """Each weight's position as text, in the result's order: "(3, 1, 0, 2)" for a Conv2d weight
    (out, in, kh, kw), "(row, col)" for a Linear weight, "(out)" for a bias entry."""
    coords = np.stack(list(result.coords().values()), axis=1) if len(result) else np.zeros((0, 1), np.int64)
    return ["(" + ", ".join(str(int(v)) for v in row) + ")" for row in coords]


def _quartiles(absw: np.ndarray, dl: np.ndarray) -> list:
    if absw.size < 4:
        return []
    edges = np.quantile(absw, [0.0, 0.25, 0.5, 0.75, 1.0])
    which = np.clip(np.searchsorted(edges, absw, side="right") - 1, 0, 3)
    out = []
    for q in range(4):
        sel = dl[which == q]
        out.append({"abs_w_from": _f(edges[q]), "abs_w_to": _f(edges[q + 1]), "n": int(sel.size),
                    "mean": _f(sel.mean()) if sel.size else math.nan,
                    "max": _f(sel.max()) if sel.size else math.nan})
    return out


def _train_vs_test(result, train_result) -> dict:
    out = {"n_samples": int(train_result.n_samples), "base_loss": _f(train_result.base_loss),
           "base_accuracy": _f(train_result.base_accuracy), "seconds": _f(train_result.seconds)}
    if result.layer != train_result.layer or tuple(result.layer_shape) != tuple(train_result.layer_shape):
        raise ValueError(f"train_result is for layer {train_result.layer!r} {tuple(train_result.layer_shape)}, "
                         f"result for {result.layer!r} {tuple(result.layer_shape)}")
    if result.delta_loss is None or train_result.delta_loss is None:
        return out
    _, i_test, i_train = np.intersect1d(_np(result.indices), _np(train_result.indices), assume_unique=True,
                                        return_indices=True)
    c = _corr(_np(train_result.delta_loss)[i_train], _np(result.delta_loss)[i_test])
    out.update(n_common_weights=int(i_test.size), pearson=c["pearson"], spearman=c["spearman"])
    return out


def count(n: int, one: str, many: str | None = None) -> str:
    """``n`` and the words in agreement with it: count(1, "weight flips", "weights flip")."""
    return f"{n} {one if n == 1 else (many if many is not None else one + 's')}"


def _g(x, spec=".4g") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_summary(d: dict) -> str:
    """The dict of ``summarize`` as a short human-readable report."""
    shape = d.get("weight_shape") or d["layer_shape"]
    what = {"out": "output units", "branch": "output units (branch)", "in": "input units"}.get(d.get("structure"),
                                                             "bias entries" if d.get("param") == "bias" else "weights")
    lines = [
        f"layer {d['layer']} ({'x'.join(map(str, shape))}), {d['n_weights']} {what} ablated one at a time, "
        f"{count(d['n_samples'], 'sample')}",
        f"method {d['method']} ({d['head']}), backend {d['backend']}, mode {d['mode']}, "
        f"precision {d['precision']}, {d['seconds']:.2f} s",
        f"base: loss {d['base_loss']:.6g}, accuracy {d['base_accuracy']:.4f}",
    ]
    if "delta_loss" in d:
        q = d["delta_loss"]
        lines += [
            "delta_loss (change of the summed cross-entropy when the weight is zeroed; > 0: the weight helps):",
            "  mean {}  std {}".format(_g(q["mean"]), _g(q["std"])),
            "  min {}  1% {}  50% {}  99% {}  max {}".format(*(_g(q[k]) for k in ("min", "q01", "q50", "q99", "max"))),
            f"  per sample (mean-loss change): mean {_g(d['delta_loss_mean_per_sample']['mean'])}, "
            f"max {_g(d['delta_loss_mean_per_sample']['max'])}",
            f"  {count(d['n_negative'], 'weight lowers', 'weights lower')} the loss when zeroed (delta < 0); "
            f"{count(d['n_exact_zero'], 'changes', 'change')} no logit at all (exactly zero)",
        ]
    if "max_flips" in d:
        lines.append(f"prediction flips: at most {d['max_flips']} per weight; "
                     f"{count(d['n_with_flips'], 'weight flips', 'weights flip')} any "
                     f"(at most {count(d['max_new_errors'], 'new error')}, {d['max_new_correct']} newly correct)")
    if "correlation" in d:
        c = d["correlation"]
        lines.append("delta_loss vs |w|: Pearson {}  Spearman {};  vs w^2: Pearson {}  Spearman {}".format(
            _g(c["abs_w"]["pearson"], ".3f"), _g(c["abs_w"]["spearman"], ".3f"),
            _g(c["w2"]["pearson"], ".3f"), _g(c["w2"]["spearman"], ".3f")))
    if d.get("by_abs_w_quartile"):
        lines.append("delta_loss by quartile of |w|:")
        for k, b in enumerate(d["by_abs_w_quartile"], 1):
            lines.append(f"  Q{k} |w| in [{b['abs_w_from']:.3g}, {b['abs_w_to']:.3g}]: mean {_g(b['mean'])}, "
                         f"max {_g(b['max'])}")
    if d.get("top"):
        lines.append(f"most important {what} {d.get('position', '(row, col)')}, w, delta_loss:")
        lines += [f"  {t.get('at') or (t['row'], t['col'])}  w={t['weight']:+.4g}  delta={_g(t['delta_loss'])}"
                  for t in d["top"]]
    if "train" in d:
        t = d["train"]
        lines.append(f"train subset: {count(t['n_samples'], 'sample')}, loss {t['base_loss']:.6g}, "
                     f"accuracy {t['base_accuracy']:.4f}, {t['seconds']:.2f} s")
        if "pearson" in t:
            lines.append(f"train vs test delta_loss over {count(t['n_common_weights'], 'weight')}: "
                         f"Pearson {_g(t['pearson'], '.3f')}  Spearman {_g(t['spearman'], '.3f')}")
    return "\n".join(lines)


def to_json(d: dict) -> dict:
    """``d`` with every nan/inf replaced by None, for strict JSON."""
    if isinstance(d, dict):
        return {k: to_json(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [to_json(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d

"""The study as a report: PNG figures, one self-contained HTML page and ``summary.json``.

``report(results, out, model=None, layer=None, data=None, train_result=None)`` writes into ``out``:

* ``delta_hist.png``        distribution of delta_loss (linear and symlog axis), exact zeros, negatives
* ``delta_vs_w.png``        delta vs w and vs w^2 (scatter; a hexbin of every point above ``max_points``)
* ``delta_over_absw.png``   distribution of delta/|w|
* ``per_class.png``         classes hurt/helped, the most class-specific weights (needs ``class_loss``):
                            those whose dominant class's part of delta_loss exceeds, in absolute value,
                            the parts of all other classes together, by the largest margin
* ``flips.png``             prediction flips per weight
* ``train_vs_test.png``     train vs test delta_loss of the same weights (with ``train_result``)
* ``criteria.png``          pruning criteria against the exact delta (Spearman, Kendall, top/bottom overlaps)
* ``taylor2_vs_delta.png``  the second-order estimate against the truth (with a model and data)
* for a structured result (``structure="out"/"branch"/"in"``, one entry per unit) the same sections
  over the units, with the channel-level criteria of ``weightablate.channel_criteria`` (filter L1/L2
  norm, BatchNorm |gamma|, Taylor, Hessian) and ``hessian_vs_delta.png`` instead
* ``activations_*.png``     pre-activation statistics of the layer (with a model and data)
* ``pruning.png``           test accuracy against sparsity per pruning criterion (with ``pruning``:
                            ``weightablate prune``'s history.json or prune_experiment.json)
* ``report.html``           all of it, figures embedded (base64): opens offline, a single file
* ``summary.json``          every number shown (``weightablate.summary.summarize`` plus the report's)

Statistics always use every weight; only the drawing of scatter plots is bounded (a hexbin of all
points replaces the scatter above ``max_points``). With ``model`` and ``data`` the criteria of
``weightablate.criteria`` are computed on that data (one pass) and saved as ``criteria.npz``, and
the layer's activation statistics as ``activations.npz``, so that ``weightablate report DIR``
reproduces the page later. Without them the criteria are the data-free ones (|w| and w^2).
"""
from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .figures import _BLUE, _GREY, _RED, DPI, _figure, _png
from .report_pruning import fig_pruning, pruning_rows, pruning_table, summarize_pruning
from .result import AblationResult, load
from .summary import _corr, _distribution, _f, _np, count, positions, summarize, to_json

MAX_POINTS = 20_000
BOOTSTRAP = 1000
BOOTSTRAP_WORK = 5e7  # replicates x weights: B = min(bootstrap, max(100, BOOTSTRAP_WORK / n))
FRACTIONS = (0.01, 0.10)
TOP = 10
HIST_BINS = 80


# --- inputs -----------------------------------------------------------------------------------

def _as_result(obj) -> AblationResult | None:
    if obj is None:
        return None
    if isinstance(obj, AblationResult):
        return obj
    if isinstance(obj, (str, Path)):
        return load(obj)
    if isinstance(obj, (list, tuple)):
        return concat([_as_result(o) for o in obj])
    raise TypeError(f"results must be an AblationResult, a path or a list of them, got {type(obj).__name__}")


def concat(results) -> AblationResult:
    """One result from several sweeps of the same layer on the same data (e.g. shards of the
    weights): per-weight tensors concatenated; they must not share a weight."""
    results = list(results)
    if not results:
        raise ValueError("results: nothing to report")
    if len(results) == 1:
        return results[0]
    first = results[0]
    for r in results[1:]:
        same = (r.layer == first.layer and tuple(r.layer_shape) == tuple(first.layer_shape)
                and r.n_samples == first.n_samples and r.base_loss == first.base_loss)
        if not same:
            raise ValueError(f"results: {r!r} and {first!r} are not the same layer on the same data "
                             "(a train result goes to train_result / --train)")
    fields = ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl", "flips", "new_errors", "new_correct",
              "exact_zero", "class_loss")
    merged = {}
    for f in fields:
        parts = [getattr(r, f) for r in results]
        merged[f] = None if any(p is None for p in parts) else torch.cat(parts)
    if torch.unique(merged["indices"]).numel() != merged["indices"].numel():
        raise ValueError("results: the same weight appears in several results")
    meta = {k: getattr(first, k) for k in ("n_samples", "base_loss", "base_accuracy", "layer", "layer_shape",
                                            "weight_shape", "param", "method", "head", "backend", "mode", "precision",
                                            "structure")}
    return AblationResult(**merged, **meta, seconds=sum(r.seconds for r in results))


def _pick(score, result: AblationResult) -> np.ndarray:
    """A criterion (layer-shaped or one value per ablated weight) at the result's weights."""
    t = score if isinstance(score, torch.Tensor) else torch.as_tensor(np.asarray(score))
    t = t.detach().cpu().double()
    numel = int(np.prod(result.layer_shape))
    if t.dim() == 1 and t.numel() == len(result):  # one value per ablated weight, in the result's order
        return t.numpy()
    if t.numel() == numel:  # layer-shaped (or flat over the layer)
        return t.reshape(-1)[result.indices].numpy()
    raise ValueError(f"criterion of {t.numel()} values: expected {numel} (the layer) or {len(result)} (the weights)")


# --- statistics -------------------------------------------------------------------------------

class _Ranked:
    """One sort of ``x``: its order (ascending; ties in an arbitrary but deterministic order) and
    its average ranks (1-based, ties share their mean rank, as scipy.stats.rankdata)."""

    def __init__(self, x: np.ndarray):
        self.order = np.argsort(x)
        xs = x[self.order]
        starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]]) if x.size else np.zeros(0, dtype=np.int64)
        sizes = np.diff(np.r_[starts, x.size])
        self.ranks = np.empty(x.size)
        self.ranks[self.order] = np.repeat(starts + (sizes + 1) / 2, sizes)


def _ranks(x: np.ndarray) -> np.ndarray:
    return _Ranked(x).ranks


def _same_order(a: np.ndarray, b: np.ndarray, order: np.ndarray) -> bool:
    """Whether ``b`` is a strictly increasing function of ``a`` (then every rank statistic agrees);
    ``order`` sorts ``a``."""
    sa, sb = a[order], b[order]
    return bool(np.array_equal(np.diff(sa) > 0, np.diff(sb) > 0) and np.all(np.diff(sb) >= 0))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # not a @ b: numpy's threaded BLAS stalls for ~10 ms per call next to torch's OpenMP pool
    return float(np.multiply(a, b).sum())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(_dot(a, a) * _dot(b, b))
    return _dot(a, b) / den if den > 0 else math.nan


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return _f(kendalltau(x, y).statistic)


def _overlap(order: np.ndarray, truth_order: np.ndarray, k: int, top: bool) -> float:
    """|top-k (or bottom-k) by a score and by the truth| / k, from both ascending orders."""
    a, b = (order[::-1][:k], truth_order[::-1][:k]) if top else (order[:k], truth_order[:k])
    return len(np.intersect1d(a, b, assume_unique=True)) / k


def _tie_groups(x: np.ndarray):
    order = np.argsort(x)
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]]) if xs.size else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, xs.size])
    return order, starts, sizes


def _resampled_ranks(counts: np.ndarray, order, starts, sizes) -> np.ndarray:
    """Average ranks of every point within the bootstrap sample given by ``counts``: the exact
    ranks of the resample (ties, including repeated draws, share their mean rank)."""
    group = np.add.reduceat(counts[order], starts)
    rank = np.cumsum(group) - group + (group + 1) / 2
    out = np.empty(counts.size)
    out[order] = np.repeat(rank, sizes)
    return out


def _wpearson(a, b, w) -> float:
    s = w.sum()
    ma, mb = _dot(w, a) / s, _dot(w, b) / s
    da, db = a - ma, b - mb
    wa = w * da
    den = math.sqrt(_dot(wa, da) * _dot(w * db, db))
    return _dot(wa, db) / den if den > 0 else math.nan


def bootstrap_ci(x: np.ndarray, y: np.ndarray, replicates: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Percentile 95% intervals of Pearson and Spearman over ``replicates`` bootstrap resamples of
    the pairs. Each replicate draws ``n`` indices with ``numpy.random.default_rng(seed)
    .integers(0, n, n)`` and evaluates both coefficients on that resample exactly (Spearman with
    the resample's own average ranks), in O(n) per replicate."""
    n = x.size
    out = {"bootstrap_replicates": int(replicates), "bootstrap_seed": int(seed)}
    if n < 3 or replicates < 1:
        return {**out, "pearson_ci95": [math.nan, math.nan], "spearman_ci95": [math.nan, math.nan]}
    rng = np.random.default_rng(seed)
    gx, gy = _tie_groups(x), _tie_groups(y)
    pear = np.empty(replicates)
    spear = np.empty(replicates)
    for b in range(replicates):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        pear[b] = _wpearson(x, y, counts)
        spear[b] = _wpearson(_resampled_ranks(counts, *gx), _resampled_ranks(counts, *gy), counts)

    def ci(v):
        v = v[np.isfinite(v)]
        return [_f(q) for q in np.percentile(v, [2.5, 97.5])] if v.size else [math.nan, math.nan]

    return {**out, "pearson_ci95": ci(pear), "spearman_ci95": ci(spear)}


def _weight_rows(result, order, extra) -> list:
    rows, cols, w = _np(result.rows), _np(result.cols), _np(result.weight).astype(np.float64)
    dl = _np(result.delta_loss)
    at = positions(result)
    out = []
    for k in order:
        item = {"row": int(rows[k]), "col": int(cols[k]), "at": at[int(k)], "weight": _f(w[k])}
        if dl is not None:
            item["delta_loss"] = _f(dl[k])
        item.update({name: fn(k) for name, fn in extra.items()})
        out.append(item)
    return out


# --- figures ----------------------------------------------------------------------------------

def _xy(ax, x, y, max_points, xlabel, ylabel, color=_BLUE) -> dict:
    """A scatter of every point, or above ``max_points`` a hexbin (log counts) of every point."""
    n = int(x.size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color=_GREY, lw=0.6, zorder=0)
    if n <= max_points:
        ax.scatter(x, y, s=5, alpha=0.5, linewidths=0, color=color)
        return {"kind": "scatter", "points": n}
    hb = ax.hexbin(x, y, gridsize=90, bins="log", mincnt=1, cmap="viridis", linewidths=0)
    ax.figure.colorbar(hb, ax=ax, label="weights per hexagon")
    return {"kind": "hexbin", "points": n, "gridsize": 90}


def _symlog_edges(x: np.ndarray, bins: int):
    nz = np.abs(x[x != 0])
    c = float(np.quantile(nz, 0.05)) if nz.size else 1.0
    c = c if c > 0 else 1.0
    t = np.sign(x) * np.log10(1 + np.abs(x) / c)
    lo, hi = float(t.min()), float(t.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    tt = np.linspace(lo, hi, bins + 1)
    edges = np.sign(tt) * c * (10 ** np.abs(tt) - 1)
    if x.min() < x.max():  # the round trip through log10 must not drop the extremes
        edges[0], edges[-1] = x.min(), x.max()
    return c, edges


def fig_delta_hist(dl: np.ndarray, n_exact_zero: int, symlog: bool = True):
    fig, axes = _figure(12 if symlog else 7, 4, 2 if symlog else 1)
    counts, edges = np.histogram(dl, bins=HIST_BINS)
    info = {"histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
    neg, zero = int((dl < 0).sum()), int((dl == 0).sum())
    note = (f"{count(dl.size, 'weight')}: {neg} with delta < 0 (zeroing helps), {zero} exactly 0 "
            f"({count(n_exact_zero, 'changes', 'change')} no logit at all)")
    axes[0].stairs(counts, edges, fill=True, color=_BLUE, alpha=0.8)
    axes[0].axvline(0, color=_RED, lw=0.8)
    axes[0].set_xlabel("delta_loss (summed CE change when the weight is zeroed)")
    axes[0].set_ylabel("weights")
    axes[0].set_title("linear axis", fontsize=10)
    if symlog:
        c, sedges = _symlog_edges(dl, HIST_BINS)
        scounts, _ = np.histogram(dl, bins=sedges)
        axes[1].stairs(scounts, sedges, fill=True, color=_BLUE, alpha=0.8)
        axes[1].set_xscale("symlog", linthresh=c)
        axes[1].set_yscale("log")
        axes[1].axvline(0, color=_RED, lw=0.8)
        axes[1].set_xlabel(f"delta_loss (symlog, linear within ±{c:.2g})")
        axes[1].set_title("symlog axis, log counts", fontsize=10)
        info["symlog_histogram"] = {"linthresh": c, "edges": sedges.tolist(), "counts": scounts.tolist()}
    fig.suptitle(note, fontsize=10)
    return fig, info


def fig_delta_vs_w(w, dl, max_points):
    fig, axes = _figure(12, 4.4, 2)
    a = _xy(axes[0], w, dl, max_points, "w", "delta_loss")
    _xy(axes[1], w * w, dl, max_points, "w²", "delta_loss")
    axes[0].set_title("delta vs w", fontsize=10)
    axes[1].set_title("delta vs w²", fontsize=10)
    return fig, a


def fig_ratio(ratio, lo, hi):
    fig, (ax,) = _figure(7, 4)
    counts, edges = np.histogram(ratio, bins=HIST_BINS, range=(lo, hi) if hi > lo else None)
    ax.stairs(counts, edges, fill=True, color=_BLUE, alpha=0.8)
    ax.axvline(0, color=_RED, lw=0.8)
    ax.set_xlabel("delta_loss / |w|  (central 99%)")
    ax.set_ylabel("weights")
    return fig, {"edges": edges.tolist(), "counts": counts.tolist()}


def fig_per_class(cls_stats, heat, labels):
    fig, axes = _figure(13, 4.6, 2)
    ax = axes[0]
    c = np.arange(len(cls_stats))
    ax.bar(c, [s["sum_hurt"] for s in cls_stats], color=_RED, label="sum of positive parts (removal hurts)")
    ax.bar(c, [s["sum_help"] for s in cls_stats], color=_BLUE, label="sum of negative parts (removal helps)")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("class (samples' label)")
    ax.set_ylabel("delta_loss summed over weights")
    ax.legend(fontsize=8)
    ax = axes[1]
    if heat.size:
        m = float(np.abs(heat).max()) or 1.0
        im = ax.imshow(heat, aspect="auto", cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="class part of delta_loss")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(cls_stats) <= 30:
        axes[0].set_xticks(c)
        ax.set_xticks(c)
    ax.set_xlabel("class")
    ax.set_title("most class-specific weights (row, col)", fontsize=10)
    return fig


def fig_flips(values, counts):
    fig, (ax,) = _figure(7, 4)
    from matplotlib.ticker import MaxNLocator

    ax.bar(values, counts, color=_BLUE, width=0.8)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # flips are counts: no 0.5 ticks
    ax.set_xlabel("prediction flips when the weight is zeroed")
    ax.set_ylabel("weights")
    return fig


def fig_train_test(train, test, max_points, stats):
    fig, (ax,) = _figure(6.5, 5)
    info = _xy(ax, train, test, max_points, "delta_loss on train subset", "delta_loss on test")
    lo, hi = float(min(train.min(), test.min())), float(max(train.max(), test.max()))
    ax.plot([lo, hi], [lo, hi], color=_RED, lw=0.7, label="y = x")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Pearson {}  Spearman {}".format(_num(stats.get("pearson")), _num(stats.get("spearman"))),
                 fontsize=10)
    return fig, info


def fig_criteria(table: dict):
    keys = [("spearman", "Spearman"), ("kendall", "Kendall")]
    keys += [(f"{side}_{_pct(f)}", f"{side} {_pct(f)}") for side in ("top", "bottom") for f in FRACTIONS]
    names = list(table)
    fig, (ax,) = _figure(max(8.0, 1.6 * len(names) + 3), 4.4)
    width = 0.8 / len(keys)
    cmap = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a"]
    for k, (key, label) in enumerate(keys):
        vals = [table[n].get(key, math.nan) for n in names]
        vals = [math.nan if v is None else v for v in vals]
        ax.bar(np.arange(len(names)) + (k - (len(keys) - 1) / 2) * width, vals, width, label=label,
               color=cmap[k % len(cmap)])
    for f in FRACTIONS:
        ax.axhline(f, color=_GREY, lw=0.6, ls="--")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("agreement with the exact delta_loss")
    ax.set_title("criteria vs truth (dashed: the overlap a random ranking gives)", fontsize=10)
    ax.legend(fontsize=8, ncols=3)
    return fig


def fig_activation_units(stats):
    fig, (ax,) = _figure(14, 4.6)
    vals = stats.show_values.astype(np.float64)
    units = stats.show_units
    if vals.size:
        parts = ax.violinplot([vals[:, k] for k in range(vals.shape[1])], positions=np.arange(len(units)),
                              widths=0.85, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(_BLUE)
            body.set_alpha(0.6)
        ax.scatter(np.arange(len(units)), stats.median[units], s=6, color="k", zorder=3, label="median")
        ax.set_xticks(np.arange(len(units)), [str(u) for u in units], rotation=90, fontsize=6)
        ax2 = ax.twinx()
        ax2.plot(np.arange(len(units)), stats.pass_fraction[units], color=_RED, lw=1, label="pass fraction")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("fraction > 0", color=_RED)
    ax.axhline(0, color=_GREY, lw=0.6)
    ax.set_xlabel(f"{len(units)} units of {stats.layer}, ordered by pass fraction")
    ax.set_ylabel(f"input of {stats.activation}" if stats.activation else "layer output")
    return fig


def fig_activation_pass(stats):
    fig, axes = _figure(12, 4, 2)
    pf = stats.pass_fraction
    counts, edges = np.histogram(pf, bins=40, range=(0, 1))
    axes[0].stairs(counts, edges, fill=True, color=_BLUE, alpha=0.8)
    axes[0].axvline(0.25, color=_RED, lw=0.8, ls="--")
    axes[0].set_xlabel(f"fraction of values > 0 (passes the {stats.activation})" if stats.activation
                       else "fraction of values > 0 (no activation follows)")
    axes[0].set_ylabel("units")
    axes[0].set_title(f"{stats.layer}: {(pf <= 0.25).mean():.0%} of {pf.size} units pass 25% or less",
                      fontsize=10)
    ms = stats.median_over_std
    ms = ms[np.isfinite(ms)]
    counts2, edges2 = np.histogram(ms, bins=40) if ms.size else (np.zeros(0, dtype=int), np.zeros(1))
    if ms.size:
        axes[1].stairs(counts2, edges2, fill=True, color=_BLUE, alpha=0.8)
    axes[1].axvline(0, color=_RED, lw=0.8)
    axes[1].set_xlabel("median / std of the value")
    axes[1].set_ylabel("units")
    return fig, {"pass_fraction": {"edges": edges.tolist(), "counts": counts.tolist()},
                 "median_over_std": {"edges": np.asarray(edges2).tolist(), "counts": np.asarray(counts2).tolist()}}


# --- the report -------------------------------------------------------------------------------

def _pct(f: float) -> str:
    return f"{f * 100:g}pct"


def report(results, out, *, model=None, layer=None, data=None, train_result=None, criteria=None,
           activations=None, summary: dict | None = None, symlog: bool = True, max_points: int = MAX_POINTS,
           bootstrap: int = BOOTSTRAP, seed: int = 0, batch_size: int | None = None, title: str | None = None,
           pruning=None, criteria_notes: dict | None = None, log=None) -> dict:
    """Write the report of one ablation sweep into the directory ``out``; return ``summary.json``'s dict.

    Args:
        results: an AblationResult, a path written by ``save``, or a list of them (shards of one
            sweep, concatenated).
        out: output directory (created).
        model, layer, data: when ``model`` and ``data`` are given, the pruning criteria of
            ``weightablate.criteria`` and the activation statistics of ``layer`` (default: the
            result's layer) are computed on ``data`` (same forms as ``ablate``).
        train_result: the same weights ablated on other data (e.g. a train subset): train vs test.
        criteria: precomputed ``{name: scores}`` (layer-shaped, or one value per ablated weight).
        criteria_notes: with ``criteria``, where they came from and why some were left out:
            ``{"source": str, "skipped": {name: reason}}`` (saved in criteria.npz as ``__notes__``, so
            that ``weightablate report DIR`` shows the run's notes again).
        activations: a precomputed ``ActivationStats`` (or a list of them).
        summary: a dict to merge into (default ``summarize(result, train_result)``).
        symlog: also draw the delta histogram on a symlog axis.
        max_points: scatter plots draw at most this many points; above, a hexbin of all points.
        bootstrap: replicates for the train-vs-test intervals (capped at
            ``max(100, 5e7 / n_weights)`` so that the report stays cheaper than the sweep).
        pruning: pruning trajectories to plot (accuracy vs sparsity per criterion): paths to, or
            loaded, ``history.json`` of ``weightablate prune`` or ``prune_experiment.json``.
    """
    started = time.perf_counter()
    say = log or (lambda msg: None)
    result = _as_result(results)
    train = _as_result(train_result)
    if result.delta_loss is None:
        raise ValueError("report: the result has no delta_loss (ablate with metrics including 'loss')")
    if not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = dict(summary) if summary is not None else summarize(result, train)
    figs = _Figures()
    add = figs.add

    dl = _np(result.delta_loss).astype(np.float64)
    w = _np(result.weight).astype(np.float64)
    truth = _Ranked(dl)
    rank_dl = truth.ranks

    d["delta_distribution"] = _distribution_section(result, dl, symlog, add)
    say(f"report: distribution ({time.perf_counter() - started:.1f} s)")

    d["weight_relation"] = _weight_section(w, dl, rank_dl, d.get("correlation"), max_points, add)
    say(f"report: weights ({time.perf_counter() - started:.1f} s)")

    if result.class_loss is not None:
        d["per_class"] = _class_section(result, dl, add)
    if result.flips is not None:
        d["flips"] = _flips_section(result, dl, add)
    say(f"report: classes and flips ({time.perf_counter() - started:.1f} s)")

    # 4. train vs test
    if train is not None and train.delta_loss is not None:
        tv = d.get("train") or summarize(result, train)["train"]
        _, i_test, i_train = np.intersect1d(_np(result.indices), _np(train.indices), assume_unique=True,
                                            return_indices=True)
        x_tr, y_te = _np(train.delta_loss)[i_train], dl[i_test]
        reps = int(min(bootstrap, max(100, BOOTSTRAP_WORK // max(x_tr.size, 1)))) if bootstrap > 0 else 0
        boot = bootstrap_ci(x_tr, y_te, reps, seed)
        fig, plot = fig_train_test(x_tr, y_te, max_points, tv)
        d["train_vs_test"] = {"n_common_weights": int(i_test.size), "pearson": tv.get("pearson", math.nan),
                              "spearman": tv.get("spearman", math.nan), **boot, "plot": plot,
                              "train_n_samples": int(train.n_samples), "test_n_samples": int(result.n_samples)}
        add("train", "train_vs_test", "The same weights' loss change on the train subset and on the test data.",
            fig, **plot)
        say(f"report: train vs test ({time.perf_counter() - started:.1f} s)")

    # 5. criteria
    scores, skipped, source = _criteria_scores(result, criteria, model, layer, data, batch_size, out,
                                               criteria_notes)
    if scores:
        d["criteria"] = _criteria_section(result, scores, skipped, source, dl, truth, max_points, add)
        say(f"report: criteria ({time.perf_counter() - started:.1f} s)")

    # 6. activations
    acts = _activation_list(activations, model, layer or result.layer, data, batch_size, out, result)
    if acts:
        d["activations"] = {}
        for k, st in enumerate(acts):
            suffix = "" if k == 0 else f"_{_safe(st.layer)}"
            entry = st.summary()
            add("activations", f"activations_units{suffix}", f"Values of {len(st.show_units)} units of {st.layer} "
                f"at {st.at or 'its output'} (violins; dots: median; red: fraction > 0).",
                fig_activation_units(st), units=[int(u) for u in st.show_units])
            fig, hists = fig_activation_pass(st)
            entry["histograms"] = hists
            lets = f"its {st.activation} lets through" if st.activation else "is > 0 (no activation follows)"
            add("activations", f"activations_pass{suffix}", f"How much of the data each unit of {st.layer} {lets}, "
                "and its median relative to its spread.", fig)
            d["activations"][st.layer] = entry
        say(f"report: activations ({time.perf_counter() - started:.1f} s)")

    # 7. pruning
    if pruning is not None:
        prune_summary = summarize_pruning(pruning_rows(pruning))
        d["pruning"] = prune_summary
        add("pruning", "pruning", "Test accuracy after pruning and fine-tuning, against sparsity: mean and sd over "
            "seeds, one line per criterion (the same fine-tuning budget for each).", fig_pruning(prune_summary))

    for section, name, caption, png in figs.items:
        (out / f"{name}.png").write_bytes(png)
    d["report"] = {"figures": figs.meta, "max_points": max_points, "symlog": bool(symlog),
                   "seconds": time.perf_counter() - started, "html": "report.html"}
    d = to_json(d)
    (out / "report.html").write_text(render_html(d, figs.items, title), encoding="utf-8")
    with open(out / "summary.json", "w") as fh:
        json.dump(d, fh, indent=2, allow_nan=False)
        fh.write("\n")
    say(f"report: wrote {out / 'report.html'} ({time.perf_counter() - started:.1f} s)")
    return d


class _Figures:
    """The report's figures in order, (section, name, caption, png), and each one's metadata."""

    def __init__(self):
        self.items: list[tuple[str, str, str, bytes]] = []
        self.meta: dict = {}

    def add(self, section, name, caption, fig, **info):
        png = _png(fig)
        w, h = (int(round(v * DPI)) for v in fig.get_size_inches())
        self.items.append((section, name, caption, png))
        self.meta[name] = {"file": f"{name}.png", "width": w, "height": h, "section": section, **info}


def _distribution_section(result, dl, symlog, add) -> dict:
    """1. The distribution of delta_loss over the weights."""
    n = dl.size
    n_exact = int(_np(result.exact_zero).sum())
    fig, hist = fig_delta_hist(dl, n_exact, symlog)
    add("delta", "delta_hist", "Distribution of the loss change over the weights.", fig)
    from scipy import stats as sps

    return {
        "n_weights": n, "n_positive": int((dl > 0).sum()), "n_negative": int((dl < 0).sum()),
        "n_zero_delta": int((dl == 0).sum()), "n_exact_zero": n_exact,
        "frac_negative": _f((dl < 0).mean()) if n else math.nan,
        "sum_positive": _f(dl[dl > 0].sum()), "sum_negative": _f(dl[dl < 0].sum()),
        "skewness": _f(sps.skew(dl)) if n > 2 and dl.std() > 0 else math.nan,
        "excess_kurtosis": _f(sps.kurtosis(dl)) if n > 3 and dl.std() > 0 else math.nan,
        **hist,
    }


def _weight_section(w, dl, rank_dl, correlation, max_points, add) -> dict:
    """2. delta_loss against the weight: correlations, delta / |w|."""
    fig, plot = fig_delta_vs_w(w, dl, max_points)
    add("weights", "delta_vs_w", "The loss change against the weight and its square.", fig, **plot)
    nz = w != 0
    ratio = dl[nz] / np.abs(w[nz])
    rel = {"n": int(ratio.size), "n_w_zero": int((~nz).sum()), "distribution": _distribution(ratio)}
    if ratio.size:
        q25, q50, q75, q005, q995 = np.quantile(ratio, [0.25, 0.5, 0.75, 0.005, 0.995])
        mean = ratio.mean()
        rel["dispersion"] = {
            "std": _f(ratio.std()), "iqr": _f(q75 - q25), "mad": _f(np.median(np.abs(ratio - q50))),
            "cv": _f(ratio.std() / abs(mean)) if mean != 0 else math.nan,
            "quartile_coefficient": _f((q75 - q25) / abs(q50)) if q50 != 0 else math.nan,
        }
        rank_absw_nz = _ranks(np.abs(w[nz]))
        rel["vs_abs_w"] = {"pearson": _pearson(ratio, np.abs(w[nz])),
                           "spearman": _pearson(_ranks(ratio), rank_absw_nz)}
        fig, rhist = fig_ratio(ratio, float(q005), float(q995))
        rel["histogram"] = {**rhist, "n_below": int((ratio < q005).sum()), "n_above": int((ratio > q995).sum())}
        add("weights", "delta_over_absw", "delta_loss / |w|: the loss change per unit of weight magnitude.", fig)
    corr = correlation or {"abs_w": _corr(np.abs(w), dl), "w2": _corr(w * w, dl)}
    return {"w": {"pearson": _pearson(w, dl), "spearman": _pearson(_ranks(w), rank_dl)},
                            "abs_w": corr["abs_w"], "w2": corr["w2"], "ratio": rel, "plot": plot}


def _class_section(result, dl, add) -> dict:
    """3a. Which classes each weight's removal hurts or helps (by_class results)."""
    n = dl.size
    cl = _np(result.class_loss).astype(np.float64)
    pos, neg = np.where(cl > 0, cl, 0.0), np.where(cl < 0, cl, 0.0)
    cls_stats = [{"class": c, "n_hurt": int((cl[:, c] > 0).sum()), "n_help": int((cl[:, c] < 0).sum()),
                  "sum_hurt": _f(pos[:, c].sum()), "sum_help": _f(neg[:, c].sum()), "total": _f(cl[:, c].sum()),
                  "max_hurt": _f(cl[:, c].max()) if n else math.nan,
                  "max_help": _f(cl[:, c].min()) if n else math.nan}
                 for c in range(cl.shape[1])]
    absum = np.abs(cl).sum(1)
    dom = np.abs(cl).argmax(1) if n else np.zeros(0, dtype=np.int64)
    dom_abs = np.abs(cl[np.arange(n), dom])
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(absum > 0, dom_abs / np.where(absum > 0, absum, 1.0), np.nan)
    net = 2 * dom_abs - absum  # the dominant class's part beyond all other classes together
    order = np.argsort(-net, kind="stable")[:TOP]
    order = order[net[order] > 0]
    most = _weight_rows(result, order, {"class": lambda k: int(dom[k]),
                                        "class_delta": lambda k: _f(cl[k, dom[k]]),
                                        "share": lambda k: _f(share[k]), "net": lambda k: _f(net[k])})
    heat_order = np.argsort(-net, kind="stable")[:20]
    at = positions(result)
    labels = [at[int(k)] for k in heat_order]
    fig = fig_per_class(cls_stats, cl[heat_order], labels)
    add("classes", "per_class", "Which classes a weight's removal hurts (red) or helps (blue); right: the "
        "class parts of delta_loss of the weights whose effect is most concentrated on one class.", fig)
    return {"n_classes": int(cl.shape[1]), "classes": cls_stats,
                      "specificity": _distribution(share[np.isfinite(share)]),
                      "n_share_above_half": int((share > 0.5).sum()), "most_specific": most}


def _flips_section(result, dl, add) -> dict:
    """3b. Prediction flips per weight."""
    n = dl.size
    flips = _np(result.flips)
    values = np.arange(int(flips.max()) + 1 if n else 1)
    counts = np.bincount(flips, minlength=values.size) if n else np.zeros(1, dtype=np.int64)
    order = np.lexsort((-np.abs(dl), -flips))[:TOP]
    order = order[flips[order] > 0]
    ne, nc = _np(result.new_errors), _np(result.new_correct)
    entry = {"n_with_flips": int((flips > 0).sum()), "max_flips": int(flips.max()) if n else 0,
                  "histogram": {"flips": values.tolist(), "counts": counts.tolist()},
                  "most_flips": _weight_rows(result, order, {"flips": lambda k: int(flips[k]),
                                                             "new_errors": lambda k: int(ne[k]),
                                                             "new_correct": lambda k: int(nc[k])})}
    add("classes", "flips", "Prediction flips per weight (log scale).", fig_flips(values, counts))
    return entry


def _criteria_section(result, scores, skipped, source, dl, truth, max_points, add) -> dict:
    """5. Each criterion (or channel-level criterion) against the exact delta_loss: rank statistics,
    top/bottom-set overlaps, and the second-order estimate plotted against the truth."""
    n, rank_dl = dl.size, truth.ranks
    rank_abs = _ranks(np.abs(dl))
    table, ranked = {}, {}
    units = result.structure != "weight"
    signed, estimate = (("taylor", "hessian"), "hessian") if units else (("taylor2",), "taylor2")
    for name, s in scores.items():
        kind = "signed estimate of delta_loss" if name in signed else "importance (>= 0)"
        prev = ranked.get("magnitude")
        if name == "squared" and prev is not None and _same_order(scores["magnitude"], s, prev.order):
            # w^2 is a strictly increasing function of |w| here: every rank statistic is magnitude's
            table[name] = {**table["magnitude"], "kind": kind, "pearson": _pearson(s, dl)}
            continue
        rs = ranked[name] = _Ranked(s)
        r_abs = rs.ranks if s.size and s.min() >= 0 else _ranks(np.abs(s))
        row = {"kind": kind, "spearman": _pearson(rs.ranks, rank_dl), "kendall": _kendall(s, dl),
               "pearson": _pearson(s, dl), "spearman_abs": _pearson(r_abs, rank_abs)}
        for f in FRACTIONS:
            k = max(1, int(round(f * n)))
            row[f"top_{_pct(f)}"] = _overlap(rs.order, truth.order, k, True)
            row[f"bottom_{_pct(f)}"] = _overlap(rs.order, truth.order, k, False)
        table[name] = row
    entry = {"source": source, "n_weights": n, "fractions": list(FRACTIONS),
             "set_sizes": [max(1, int(round(f * n))) for f in FRACTIONS], "scores": table,
             "skipped": skipped}
    what = "channel-level criterion against the exact effect of removing the unit" if units \
        else "pruning criterion against the exact delta_loss"
    add("criteria", "criteria", f"Each {what}: rank correlations and the overlap of its top (most important) "
        "and bottom (least important) sets with the truth's.", fig_criteria(table))
    if estimate in scores:
        fig, (ax,) = _figure(6.5, 5)
        label = ("hessian = -g.θ + θ'Hθ/2 over the unit (estimate)" if units
                 else "taylor2 = -g w + h w²/2 (estimate)")
        plot = _xy(ax, scores[estimate], dl, max_points, label, "delta_loss (exact)")
        lo, hi = float(min(scores[estimate].min(), dl.min())), float(max(scores[estimate].max(), dl.max()))
        ax.plot([lo, hi], [lo, hi], color=_RED, lw=0.7)
        entry[f"{estimate}_plot"] = plot
        add("criteria", f"{estimate}_vs_delta", "The second-order Taylor estimate against the exact change.",
            fig, **plot)
    return entry

def _criteria_scores(result, given, model, layer, data, batch_size, out, notes=None):
    """(scores at the result's weights or units, skipped criteria, where they came from)."""
    from . import criteria as crit

    units = result.structure != "weight"
    names = crit.CHANNEL_NAMES if units else crit.NAMES
    scores, skipped = {}, {}
    source = ("the units' weight norms only (l2; pass model and data for the others)" if units
              else "weights only (|w| and w^2; pass model and data for the others)")
    if given is not None:
        scores = {k: _pick(v, result) for k, v in given.items()}
        source, skipped = (notes or {}).get("source", "given"), dict((notes or {}).get("skipped") or {})
    elif model is not None and data is not None and result.param.endswith("bias"):
        skipped = {name: "bias entries: the data-dependent criteria score weights" for name in crit.NAMES
                   if name not in ("magnitude", "squared")}
        source = "the bias values only (|b| and b^2)"
    elif model is not None and data is not None:
        target = layer if layer is not None else result.layer
        if units:
            full, skipped = crit.channel_compute(model, target, data, result.structure, batch_size=batch_size)
        else:
            full, skipped = crit._compute(model, target, data, crit.NAMES, batch_size=batch_size, strict=False)
        scores = {k: _pick(v, result) for k, v in full.items()}
        source = "computed from the model on the data given" + (" (channel-level criteria)" if units else "")
        with open(out / "criteria.npz", "wb") as fh:  # the notes too: a re-rendered report shows them
            np.savez(fh, indices=_np(result.indices), __notes__=np.array(json.dumps(
                {"source": source, "skipped": skipped})), **scores)
    w = _np(result.weight).astype(np.float64)
    if units:
        scores.setdefault("l2", w)  # the result's weight: the L2 norm of the weights each unit removes
    else:
        scores.setdefault("magnitude", np.abs(w))
        scores.setdefault("squared", w * w)
    ordered = {k: scores[k] for k in names if k in scores}
    ordered.update({k: v for k, v in scores.items() if k not in ordered})
    return ordered, skipped, source


def _activation_list(given, model, layer, data, batch_size, out, result):
    from .activations import ActivationStats, activation_stats

    if given is not None:
        return [given] if isinstance(given, ActivationStats) else list(given)
    if model is None or data is None:
        return []
    st = activation_stats(model, layer, data, batch_size=batch_size)
    st.save(out / "activations.npz")
    return [st]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# --- HTML -------------------------------------------------------------------------------------

def _num(x, spec=".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return format(x, spec)
    return html.escape(str(x))


def _table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c if isinstance(c, str) else _num(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _weights_table(items, keys, position="(row, col)") -> str:
    """One row per weight; the key "at" is its position, headed by ``position`` ("(out, in, kh, kw)")."""
    if not items:
        return "<p>(none)</p>"

    def cell(it, k):
        return (it.get("at") or f"({it.get('row')}, {it.get('col')})") if k == "at" else it.get(k)
    return _table([[cell(it, k) for k in keys] for it in items], [position if k == "at" else k for k in keys])


_SECTIONS = (  # numbered in the page in order of those present: no gaps
    ("delta", "Distribution of the loss change"),
    ("weights", "The loss change and the weight's value"),
    ("classes", "Classes and prediction flips"),
    ("train", "Train vs test"),
    ("criteria", "Pruning criteria against the exact truth"),
    ("activations", "Activation statistics"),
    ("pruning", "Pruning: accuracy against sparsity"),
)

_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message || e)); }, true);
  var consoleError = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, ' '));
                                return consoleError.apply(console, arguments); };
  window.addEventListener('load', function () {
    var sizes = Array.prototype.map.call(document.images, function (im) {
      return (im.complete ? im.naturalWidth : 0) + 'x' + (im.complete ? im.naturalHeight : 0);
    });
    document.body.setAttribute('data-images', sizes.join(' '));
    document.body.setAttribute('data-errors', String(errors.length));
    document.body.setAttribute('data-loaded', '1');
  });
})();
"""

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1320px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; } .note { color: #555; } nav a { margin-right: 1em; }
"""


def render_html(d: dict, figures, title=None) -> str:
    layer = d.get("layer", "")
    rows, cols = (d.get("layer_shape") or [0, 0])[:2]
    if len(d.get("weight_shape") or []) > 2:  # a conv: out x in x kh x kw
        rows, cols = d["weight_shape"][0], "x".join(str(v) for v in d["weight_shape"][1:])
    title = title or f"weightablate report: {layer}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    head_rows = [[key.replace("_", " "), html.escape(str(d[key]))] for key in ("model", "model_weights", "data")
                 if key in d]
    head_rows += [["layer", f"{html.escape(str(layer))} ({rows}x{cols})"], ["weights ablated", d.get("n_weights")],
                  [d.get("counted", "samples"), d.get("n_samples")], ["method", html.escape(f"{d.get('method')} ({d.get('head')})")],
                  ["base loss (mean CE)", d.get("base_loss")], ["base accuracy", d.get("base_accuracy")],
                  ["ablation seconds", d.get("seconds")]]
    if "seed" in d:
        head_rows.append(["seed", d["seed"]])
    body.append(_table(head_rows))
    present = {s for s, *_ in figures}
    shown = [(s, f"{k}. {t}") for k, (s, t) in enumerate([(s, t) for s, t in _SECTIONS if s in present], 1)]
    body.append("<nav>" + "".join(f'<a href="#{s}">{html.escape(t)}</a>' for s, t in shown) + "</nav>")
    text = _section_text(d)
    for section, heading in shown:
        body.append(f'<section id="{section}"><h2>{html.escape(heading)}</h2>')
        body.append(text.get(section, ""))
        for s, name, caption, png in figures:
            if s != section:
                continue
            info = d["report"]["figures"][name]
            b64 = base64.b64encode(png).decode("ascii")
            body.append(f'<figure><img id="fig-{name}" src="data:image/png;base64,{b64}" alt="{html.escape(caption)}"'
                        f' width="{info["width"]}" height="{info["height"]}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("</section>")
    body.append(f'<p class="note">Every number on this page is in summary.json. Report made in '
                f'{d["report"]["seconds"]:.2f} s.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<link rel=\"icon\" href=\"data:,\">\n"
            f"<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _section_text(d: dict) -> dict:
    t = {}
    pos = d.get("position") or "(row, col)"
    dd = d.get("delta_distribution", {})
    q = d.get("delta_loss", {})
    t["delta"] = _table([
        ["weights", dd.get("n_weights")], ["delta > 0 (the weight helps)", dd.get("n_positive")],
        ["delta < 0 (zeroing helps)", dd.get("n_negative")], ["delta exactly 0", dd.get("n_zero_delta")],
        ["no logit changes at all (exact_zero)", dd.get("n_exact_zero")],
        ["mean", q.get("mean")], ["std", q.get("std")], ["min", q.get("min")], ["1%", q.get("q01")],
        ["median", q.get("q50")], ["99%", q.get("q99")], ["max", q.get("max")],
        ["skewness", dd.get("skewness")], ["excess kurtosis", dd.get("excess_kurtosis")],
    ])
    if d.get("top"):
        t["delta"] += "<p>Most important weights (largest delta_loss):</p>" + _weights_table(
            d["top"], ["at", "weight", "delta_loss"], pos)
    wr = d.get("weight_relation", {})
    if wr:
        rel = wr.get("ratio", {})
        disp = rel.get("dispersion", {})
        rows = [[name, wr.get(k, {}).get("pearson"), wr.get(k, {}).get("spearman")]
                for k, name in (("w", "delta vs w"), ("abs_w", "delta vs |w|"), ("w2", "delta vs w²"))]
        rows.append(["delta/|w| vs |w|", rel.get("vs_abs_w", {}).get("pearson"),
                     rel.get("vs_abs_w", {}).get("spearman")])
        t["weights"] = (_table(rows, ["", "Pearson", "Spearman"])
                        + _table([["delta/|w| median", rel.get("distribution", {}).get("q50")],
                                  ["std", disp.get("std")], ["IQR", disp.get("iqr")], ["MAD", disp.get("mad")],
                                  ["coefficient of variation", disp.get("cv")],
                                  ["IQR / |median|", disp.get("quartile_coefficient")],
                                  ["weights with w = 0 (left out)", rel.get("n_w_zero")]], ["dispersion", ""])
                        + f'<p class="note">Plot: {wr.get("plot", {}).get("kind")} of '
                          f'{wr.get("plot", {}).get("points")} points.</p>')
    parts = []
    pc = d.get("per_class")
    if not pc:
        parts.append('<p class="note">No per-class split in this result (ablate with by_class=True; '
                     "<code>weightablate run</code> asks for it when weights x classes &lt;= 2^25).</p>")
    else:
        parts.append(_table([[c["class"], c["n_hurt"], c["n_help"], c["sum_hurt"], c["sum_help"], c["total"]]
                             for c in pc["classes"]],
                            ["class", "weights hurting it", "weights helping it", "sum hurt", "sum help", "total"]))
        spec = pc.get("specificity", {})
        parts.append(f'<p>Share of a weight\'s absolute effect on its dominant class: median {_num(spec.get("q50"))}'
                     f', {count(pc.get("n_share_above_half") or 0, "weight puts", "weights put")} more than half '
                     'of it on one class. Most '
                     "class-specific (dominant class's part beyond all others together):</p>")
        parts.append(_weights_table(pc.get("most_specific"), ["at", "weight", "delta_loss", "class",
                                                              "class_delta", "share"], pos))
    fl = d.get("flips")
    if fl:
        parts.append(f"<p>{count(fl['n_with_flips'], 'weight flips', 'weights flip')} at least one prediction; "
                     f"at most {fl['max_flips']}. "
                     "Most flips:</p>")
        parts.append(_weights_table(fl.get("most_flips"), ["at", "weight", "delta_loss", "flips",
                                                           "new_errors", "new_correct"], pos))
    t["classes"] = "\n".join(parts)
    tv = d.get("train_vs_test")
    if tv:
        t["train"] = _table([
            ["weights in both", tv.get("n_common_weights")],
            ["Pearson", tv.get("pearson")], ["Pearson 95% (bootstrap)", _ci(tv.get("pearson_ci95"))],
            ["Spearman", tv.get("spearman")], ["Spearman 95% (bootstrap)", _ci(tv.get("spearman_ci95"))],
            ["bootstrap replicates", tv.get("bootstrap_replicates")],
            ["train / test samples", f"{tv.get('train_n_samples')} / {tv.get('test_n_samples')}"]])
    cr = d.get("criteria")
    if cr:
        keys = ["spearman", "kendall"] + [f"{s}_{_pct(f)}" for s in ("top", "bottom") for f in FRACTIONS]
        keys.append("spearman_abs")
        rows = [[name] + [row.get(k) for k in keys] + [row.get("kind")] for name, row in cr["scores"].items()]
        t["criteria"] = (f'<p class="note">Criteria: {html.escape(cr["source"])}. Sets of '
                         f'{" and ".join(map(str, cr["set_sizes"]))} weights; a random ranking overlaps by the '
                         "set's fraction.</p>" + _table(rows, ["criterion", *keys, "kind"])
                         + "".join(f"<p class=\"note\">{html.escape(k)} left out: {html.escape(v)}</p>"
                                   for k, v in (cr.get("skipped") or {}).items()))
    ac = d.get("activations")
    if ac:
        rows = []
        for name, a in ac.items():
            pf = a["pass_fraction"]
            rows.append([name, a.get("at") or "the layer's output", a["n_units"], a["n_values_per_unit"],
                         pf.get("mean"), pf.get("q50"),
                         a["frac_units_pass_le_25pct"], a["n_dead"], a["median_over_std"].get("q50"),
                         "exact" if a["median_exact"] else f"{a['median_rows']} rows"])
        t["activations"] = _table(rows, ["layer", "measured at", "units", "values per unit", "mean pass fraction",
                                         "median pass fraction", "units passing <= 25%", "dead units",
                                         "median of median/std", "median over"])
    pr = d.get("pruning")
    if pr:
        t["pruning"] = _table(pruning_table(pr), ["model", "criterion", "sparsity", "test accuracy (%)", "test loss",
                                                  "seeds"])
    return t


def _ci(v) -> str:
    if not v:
        return "n/a"
    return f"[{_num(v[0])}, {_num(v[1])}]"


def format_report(d: dict) -> str:
    """The report's main numbers as text lines (for the terminal and summary.txt)."""
    lines = []
    tv = d.get("train_vs_test")
    if tv:
        lines.append(f"train vs test 95% bootstrap intervals ({tv['bootstrap_replicates']} replicates): "
                     f"Pearson {_ci(tv.get('pearson_ci95'))}  Spearman {_ci(tv.get('spearman_ci95'))}")
    cr = d.get("criteria")
    if cr:
        what = "unit" if d.get("structure", "weight") != "weight" else "weight"
        lines.append(f"pruning criteria vs the exact delta_loss ({count(cr['n_weights'], what)}; top/bottom "
                     "overlap of "
                     f"the {' / '.join(_pct(f) for f in FRACTIONS)} sets):")
        for name, row in cr["scores"].items():
            lines.append(f"  {name:<10} Spearman {_num(row['spearman'], '+.3f')}  Kendall {_num(row['kendall'], '+.3f')}"
                         f"  top {_num(row['top_1pct'], '.2f')}/{_num(row['top_10pct'], '.2f')}"
                         f"  bottom {_num(row['bottom_1pct'], '.2f')}/{_num(row['bottom_10pct'], '.2f')}")
    for name, a in (d.get("activations") or {}).items():
        passes = f"pass the {a['activation']}" if a.get("activation") else "are > 0"
        lines.append(f"activations of {name}, measured at {a.get('at') or 'its output'}: {a['n_units']} units "
                     f"{passes} on {_num(a['pass_fraction']['mean'], '.1%')} of the values on average; "
                     f"{_num(a['frac_units_pass_le_25pct'], '.0%')} of the units pass 25% or less, "
                     f"{a['n_dead']} never")
    return "\n".join(lines)

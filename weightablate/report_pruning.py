"""The pruning section of the report: test accuracy against sparsity, one line per criterion.

Takes what ``weightablate prune`` writes (``history.json``: one trajectory) and what
``benchmarks/prune_experiment.py`` writes (``prune_experiment.json``: rows of many models,
criteria and seeds), as paths or already loaded; mean and spread over seeds per point.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


OPTIONAL = ("accuracy_pruned", "loss_pruned")  # right after pruning, before fine-tuning
LABELS = {"accuracy": "test accuracy after fine-tuning (%)", "accuracy_pruned": "test accuracy right after pruning (%)",
          "loss": "test loss after fine-tuning", "loss_pruned": "test loss right after pruning"}


def pruning_rows(sources) -> list[dict]:
    """Flat rows {model, criterion, seed, sparsity, accuracy, loss} from paths or loaded JSON."""
    if isinstance(sources, (str, Path, dict)):
        sources = [sources]
    elif sources and all(isinstance(r, dict) and "history" not in r for r in sources):
        sources = [sources]  # the rows of one experiment, already loaded
    rows = []
    for src in sources:
        obj = src
        if isinstance(src, (str, Path)):
            try:
                obj = json.loads(Path(src).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"pruning: {str(src)!r} is not a readable JSON file: {exc}") from None
        if isinstance(obj, dict) and "history" in obj:  # weightablate prune's history.json
            crit = obj.get("criterion", "?") + (" (abs rank)" if obj.get("ranking") == "abs" else "")
            base = dict(model=str(obj.get("model", "model")), criterion=crit, seed=obj.get("seed", 0))
            rows.append({**base, "sparsity": 0.0, "accuracy": obj["base_accuracy"], "loss": obj["base_loss"]})
            rows += [{**base, "sparsity": h["sparsity"], "accuracy": h["accuracy"], "loss": h["loss"]}
                     for h in obj["history"]]
        elif isinstance(obj, list) and all(isinstance(r, dict) and {"criterion", "accuracy", "loss"} <= r.keys()
                                           and ("target" in r or "sparsity" in r) for r in obj):
            # prune_experiment.json
            for r in obj:
                crit = r["criterion"] + (" (abs rank)" if r.get("ranking") == "abs" else "")
                rows.append({**{k: r[k] for k in OPTIONAL if k in r}, "model": str(r.get("model", "model")),
                             "criterion": crit, "seed": r.get("seed", 0),
                             "sparsity": r.get("target", r.get("sparsity")),  # the milestone, not the count
                             "accuracy": r["accuracy"], "loss": r["loss"]})
        else:
            raise ValueError("pruning: expected weightablate prune's history.json or rows of "
                             "prune_experiment.json (criterion, sparsity or target, accuracy, loss), got "
                             f"{str(obj)[:80]}")
    if not rows:
        raise ValueError("pruning: no rows")
    return rows


def summarize_pruning(rows: list[dict]) -> dict:
    """{model: {criterion: [{sparsity, n_seeds, accuracy_mean, accuracy_sd, loss_mean, loss_sd, ...}]}}
    (also *_pruned where the rows have them). A dense row (criterion "dense") starts every line."""
    groups: dict = {}
    for r in rows:
        key = (r["model"], r["criterion"], round(float(r["sparsity"]), 6))
        groups.setdefault(key, []).append(r)
    out: dict = {}
    for (model, crit, s), rs in sorted(groups.items()):
        point = {"sparsity": s, "n_seeds": len(rs)}
        for key in ("accuracy", "loss", *OPTIONAL):
            vals = [float(r.get(key, r["accuracy" if "acc" in key else "loss"])) for r in rs]  # dense: same
            point[f"{key}_mean"], point[f"{key}_sd"] = _mean(vals), _sd(vals)
        out.setdefault(model, {}).setdefault(crit, []).append(point)
    for model, by_crit in out.items():
        dense = by_crit.pop("dense", None)
        if dense:
            for line in by_crit.values():
                if line[0]["sparsity"] > 0:
                    line.insert(0, dense[0])
    return out


def fig_pruning(summary: dict, keys=("accuracy",)):
    """One panel per (key, model): the key against sparsity, mean and sd (error bar) over seeds."""
    from .figures import _figure

    models = list(summary)
    fig, axes = _figure(5.5 * len(models), 4.2 * len(keys), len(models), len(keys))
    for r, key in enumerate(keys):
        scale = 100 if "acc" in key else 1
        for ax, model in zip(axes[r * len(models):], models):
            for crit, line in summary[model].items():
                x = [p["sparsity"] * 100 for p in line]
                y = [p[f"{key}_mean"] * scale for p in line]
                e = [0.0 if p[f"{key}_sd"] is None else p[f"{key}_sd"] * scale for p in line]
                ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=crit)
            ax.set_title(model)
            ax.set_xlabel("sparsity of the pruned layers (%)")
            ax.set_ylabel(LABELS.get(key, key))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return fig


def plot_pruning(sources, path, keys=("accuracy",), title: str | None = None) -> Path:
    """Write fig_pruning of ``sources`` (as for pruning_rows) to the PNG ``path``; returns it."""
    from .figures import _png

    fig = fig_pruning(summarize_pruning(pruning_rows(sources)), keys)
    if title:
        fig.suptitle(title)
    Path(path).write_bytes(_png(fig))
    return Path(path)


def pruning_table(summary: dict) -> list[list]:
    """Rows for the HTML table: model, criterion, sparsity, accuracy mean ± sd, loss mean ± sd, seeds."""
    return [[model, crit, f"{100 * p['sparsity']:.0f}%", _pm(p["accuracy_mean"], p["accuracy_sd"], 100),
             _pm(p["loss_mean"], p["loss_sd"]), p["n_seeds"]]
            for model, by_crit in summary.items() for crit, line in by_crit.items() for p in line]


def _mean(v):
    return sum(v) / len(v)


def _sd(v):
    if len(v) < 2:
        return None  # one seed: no spread (JSON null)
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _pm(m, s, scale=1) -> str:
    return f"{m * scale:.4g}" if s is None else f"{m * scale:.4g} ± {s * scale:.2g}"

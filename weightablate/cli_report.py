"""The ``report`` and ``stats`` subcommands, and the report at the end of ``run``.

    weightablate report weightablate-out --out report/          # a directory written by `run`
    weightablate report shard0.npz shard1.npz --train train.npz --out report/
    weightablate stats --layer fc1 --layer fc2 --out stats/     # digits MLP; same model/data options as run
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BY_CLASS_MAX = 1 << 25  # weights x classes for which `run` also splits delta_loss by class (256 MiB)


def add_parsers(sub) -> None:
    """Add ``report`` and ``stats`` to the ``weightablate`` subparsers."""
    from .cli_common import DEVICE_HELP, _positive, add_folder_args
    from .reporting import BOOTSTRAP, MAX_POINTS

    rep = sub.add_parser(
        "report", help="figures, statistics and one HTML page from saved results",
        description="Write PNG figures, a self-contained report.html and summary.json for ablation results: the "
                    "distribution of the loss change, its relation to w, per-class effects and flips, train vs "
                    "test, pruning criteria against the exact truth and activation statistics (the last two when "
                    "the directory of `weightablate run` holds criteria.npz / activations.npz).")
    rep.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                     help="result files (.npz from `run` or AblationResult.save; several = shards of one sweep, "
                          "concatenated) or a directory written by `weightablate run`")
    rep.add_argument("--train", action="append", type=Path, metavar="FILE",
                     help="results of the same weights on train data; repeat for shards (default: "
                          "results_train.npz of a directory)")
    rep.add_argument("--out", type=Path, required=True, help="output directory (created): figures, report.html, "
                                                             "summary.json")
    rep.add_argument("--pruning", action="append", type=Path, metavar="JSON",
                     help="history.json of `weightablate prune` or prune_experiment.json: adds accuracy vs sparsity "
                          "per criterion; repeat to put several runs in one figure")
    rep.add_argument("--no-symlog", action="store_true", help="no symlog panel in the delta histogram")
    rep.add_argument("--max-points", type=_positive, default=MAX_POINTS, metavar="N",
                     help=f"scatter plots draw at most N points, a hexbin of all above (default {MAX_POINTS})")
    rep.add_argument("--bootstrap", type=int, default=BOOTSTRAP, metavar="B",
                     help=f"bootstrap replicates for train-vs-test intervals (default {BOOTSTRAP}, fewer for "
                          "very many weights)")
    rep.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    rep.add_argument("--quiet", action="store_true", help="no status lines on stderr (the summary is still printed)")
    rep.set_defaults(func=cmd_report, parser=rep)

    st = sub.add_parser(
        "stats", help="pre-activation statistics of Linear/Conv2d layers",
        description="Per unit of each layer: the fraction of values > 0 at the input of the layer's activation "
                    "(found in the model's graph: through BatchNorm and a residual add to the first ReLU, GELU, "
                    "...; the layer's output when none follows, e.g. the logits), i.e. what a ReLU lets through, "
                    "and median/std of those values; a figure of 64 units and the layer-wide distribution. Each "
                    "line says where it measured. Same model and data options as `run`.")
    st.add_argument("--model", help="as for `run` (default: the digits MLP)")
    st.add_argument("--checkpoint", type=Path, help="a state dict loaded into the model")
    st.add_argument("--data", default="digits", help="'digits' (default) or an ImageFolder directory")
    st.add_argument("--split", choices=("test", "train"), default="test",
                    help="which digits split to measure on: test (default) or train")
    st.add_argument("--layer", action="append", metavar="NAME",
                    help="dotted name of an nn.Linear or nn.Conv2d; repeat for several (default: the layer `run` "
                         "ablates)")
    st.add_argument("--seed", type=int, default=0, help="seed of the digits split/training (default 0)")
    st.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    add_folder_args(st)  # --image-size, --resize, --normalize, --num-classes, --class-map
    st.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                    help="batch size (default 64 for an ImageFolder, 1024 for digits)")
    st.add_argument("--workers", type=int, default=0, help="DataLoader workers for an ImageFolder (default 0)")
    st.add_argument("--out", type=Path, default=Path("weightablate-out"),
                    help="output directory (default weightablate-out): activations.json and figures")
    st.add_argument("--quiet", action="store_true", help="no status lines on stderr (the numbers are still printed)")
    st.set_defaults(func=cmd_stats, parser=st, backend="auto")


def _logger(args):
    return (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


# --- report -----------------------------------------------------------------------------------

def _inputs(paths: list[Path]):
    """Result files, plus what a `run` directory holds: (results, train, criteria, activations, extra)."""
    from .cli_common import CLIError

    files, train, crit, acts, extra = [], [], None, None, {}
    for p in paths:
        if p.is_dir():
            if not (p / "results.npz").is_file():
                raise CLIError(f"RESULTS {str(p)!r}: a directory without results.npz (not written by `run`?)")
            files.append(p / "results.npz")
            if (p / "results_train.npz").is_file():
                train.append(p / "results_train.npz")
            if (p / "criteria.npz").is_file():
                crit = p / "criteria.npz"
            if (p / "activations.npz").is_file():
                acts = p / "activations.npz"
            if (p / "summary.json").is_file():
                try:
                    old = json.loads((p / "summary.json").read_text())
                    extra = {k: old[k] for k in ("model", "data", "seed", "model_weights") if k in old}
                except (OSError, ValueError):
                    pass
        elif p.is_file():
            files.append(p)
        else:
            raise CLIError(f"RESULTS {str(p)!r}: no such file or directory")
    return files, train, crit, acts, extra


def _load_all(paths):
    from .cli_common import CLIError
    from .result import load

    out = []
    for p in paths:
        try:
            out.append(load(p))
        except ValueError as exc:  # load names the file and what is wrong with it
            raise CLIError(str(exc)) from None
        except OSError as exc:
            raise CLIError(f"{str(p)!r}: cannot read it: {exc}") from None
    return out


def _load_criteria(path, result, log):
    """criteria.npz beside a result: ({name: per-weight scores}, notes), or (None, None) with a line in
    the log when it scores other weights than ``result``; a CLIError when it is not such a file."""
    import numpy as np

    from .cli_common import CLIError

    try:
        with np.load(path, allow_pickle=False) as z:
            idx = z["indices"]
            criteria = {k: z[k] for k in z.files if k not in ("indices", "__notes__")}
            notes = json.loads(str(z["__notes__"])) if "__notes__" in z.files else None  # source, what was left out
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise CLIError(f"{str(path)!r} is not a criteria file written by weightablate: {exc}") from None
    if idx.shape != tuple(result.indices.shape) or not np.array_equal(idx, result.indices.numpy()):
        log(f"{path}: scores other weights than the result; criteria left out of the report")
        return None, None
    bad = [k for k, v in criteria.items() if v.shape != (idx.shape[0],)]
    if bad:
        raise CLIError(f"{str(path)!r}: {', '.join(bad)} do not hold one score per weight ({idx.shape[0]})")
    return criteria, notes


def cmd_report(args) -> int:
    from .activations import ActivationStats
    from .cli_common import CLIError
    from .outputs import check_outputs
    from .reporting import concat, format_report, report
    from .summary import format_summary, summarize

    check_outputs(args)
    log = _logger(args)
    files, train_files, crit_path, act_path, extra = _inputs(args.results)
    if args.train:
        train_files = list(args.train)
        for p in train_files:
            if not p.is_file():
                raise CLIError(f"--train {str(p)!r}: no such file")
    result = concat(_load_all(files))
    train = concat(_load_all(train_files)) if train_files else None
    criteria, notes = _load_criteria(crit_path, result, log) if crit_path is not None and len(files) == 1 else (None, None)
    try:
        activations = ActivationStats.load(act_path) if act_path is not None and len(files) == 1 else None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    for p in args.pruning or []:
        if not p.is_file():
            raise CLIError(f"--pruning {str(p)!r}: no such file")
    summary = {**summarize(result, train), **extra}
    try:
        d = report(result, args.out, train_result=train, criteria=criteria, activations=activations, summary=summary,
                   symlog=not args.no_symlog, max_points=args.max_points, bootstrap=args.bootstrap, seed=args.seed,
                   pruning=args.pruning, criteria_notes=notes, log=log)
    except ValueError as exc:
        if str(exc).startswith("pruning:"):
            raise CLIError(f"--pruning: {exc}") from None
        raise
    text = format_summary(d)
    extra_text = format_report(d)
    print(text + ("\n" + extra_text if extra_text else ""))
    log(f"wrote {args.out / 'report.html'}, {len(d['report']['figures'])} figures, summary.json")
    return 0


REPORT_STAGES = 7  # distribution, weights, classes, train vs test, criteria, activations, html


def report_after_run(args, summary: dict, result, train_result, model, layer: str, data, log) -> str:
    """The report at the end of ``weightablate run``: criteria and activation statistics on ``data``
    (the test split), figures and report.html into ``args.out``; merges into ``summary``; returns
    the extra text lines for the terminal and summary.txt."""
    from .reporting import format_report, report

    batch_size = args.batch_size if isinstance(data, tuple) else None
    from .progress import bar

    log("report: pruning criteria, activation statistics, figures...")
    with bar(REPORT_STAGES, "report (stages)", False if args.quiet else None) as pbar:
        d = report(result, args.out, model=model, layer=layer, data=data, train_result=train_result,
                   summary=summary, batch_size=batch_size, log=lambda msg: pbar.update(1))
    summary.clear()
    summary.update(d)
    text = format_report(d)
    return "\n" + text if text else ""


def by_class_ok(n_weights: int, n_classes: int) -> bool:
    """Whether `run` asks ablate for the per-class split (K x C float64 on the device)."""
    return n_weights * n_classes <= BY_CLASS_MAX


# --- stats ------------------------------------------------------------------------------------

def _model_and_data(args, log):
    """The model and data of `run`'s options: (model, default layer, data, description)."""
    from . import digits as dg
    from .cli_common import default_layer, model_and_folder

    on_digits = args.data == "digits"
    model, _, folder, device = model_and_folder(args, log)
    default = dg.DEFAULT_LAYER if args.model is None else default_layer(model)
    if on_digits:
        X_tr, y_tr, X_te, y_te = dg.load_digits_split(args.seed)
        X, y = (X_te, y_te) if args.split == "test" else (X_tr, y_tr)
        dtype = next(model.parameters()).dtype
        return model, default, (X.to(dtype), y), f"digits {args.split} split ({X.shape[0]} samples)"
    loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size or 64, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    return model, default, loader, f"ImageFolder {args.data} ({len(folder)} images)"


def cmd_stats(args) -> int:
    from .activations import activation_stats
    from .cli_common import layer_arg
    from .reporting import _png, _safe, fig_activation_pass, fig_activation_units
    from .summary import to_json

    from .outputs import check_outputs

    check_outputs(args)
    log = _logger(args)
    model, default, data, desc = _model_and_data(args, log)
    layers = args.layer or [default]
    for name in layers:
        layer_arg(model, name)
    args.out.mkdir(parents=True, exist_ok=True)
    batch_size = args.batch_size if isinstance(data, tuple) else None
    everything, lines = {"data": desc, "layers": {}}, [f"data: {desc}"]
    for name in layers:
        log(f"activation statistics of {name}...")
        st = activation_stats(model, name, data, batch_size=batch_size)
        safe = _safe(name)
        (args.out / f"activations_{safe}_units.png").write_bytes(_png(fig_activation_units(st)))
        fig, hists = fig_activation_pass(st)
        (args.out / f"activations_{safe}_pass.png").write_bytes(_png(fig))
        st.save(args.out / f"activations_{safe}.npz")
        d = st.to_dict()
        d["histograms"] = hists
        everything["layers"][name] = d
        s = st.summary()
        pf = s["pass_fraction"]
        lines.append(f"{name} ({s['kind']}, {s['n_units']} units, {s['n_values_per_unit']} values each) at "
                     f"{s['at']}: {'pass' if s['activation'] else '> 0'} fraction mean {pf['mean']:.3f}, median {pf['q50']:.3f}; "
                     f"{s['frac_units_pass_le_25pct']:.0%} of the units pass 25% or less, {s['n_dead']} never, "
                     f"{s['n_always_on']} always; median/std: median {s['median_over_std']['q50']:.3g}"
                     + ("" if s["median_exact"] else f" (median over {s['median_rows']} rows)"))
    with open(args.out / "activations.json", "w") as fh:
        json.dump(to_json(everything), fh, indent=1, allow_nan=False)
        fh.write("\n")
    print("\n".join(lines))
    log(f"wrote activations.json and the figures into {args.out}")
    return 0

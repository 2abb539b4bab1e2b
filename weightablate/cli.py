"""The ``weightablate`` command line.

    weightablate run                       # digits MLP: every weight of fc2, test and train subset
    weightablate run --model resnet18 --data path/to/imagefolder --checkpoint r18.pt
    weightablate run --model mypkg.models:build --data digits --layer 0

Writes ``results.npz`` (``weightablate.load``), ``results_train.npz`` (digits data only),
``summary.txt`` and ``summary.json`` into ``--out`` and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .api import MODES, PRECISIONS
from .checkpoint import CheckpointError
from .dispatch import METHODS
from .cli_common import (DEVICE_HELP, CLIError, _device, _positive, add_folder_args, default_layer, image_folder,
                         layer_arg, map_classes, model_and_folder)
from .outputs import OutputError, check_outputs
from .ops import BACKENDS

DEFAULT_K = 4096
_DEFAULT = object()  # --weights not given (argparse applies type= to string defaults only)


BACKEND_HELP = ("auto (default): the compiled kernel for the model's device when it is built, else torch; "
                "cpu / cuda: the compiled CPU / CUDA kernel; torch: the pure-PyTorch reference (same numbers, "
                "slower); naive: zero, evaluate, restore for every weight (the slow reference loop)")


def _weights_arg(text: str):
    if text.lower() == "all":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _add_loading_args(p, batch_help: str, out: str) -> None:
    """The ImageFolder options, --batch-size, --workers and --out, shared by `run` and `prune`."""
    add_folder_args(p)
    p.add_argument("--batch-size", type=_positive, default=None, metavar="B", help=batch_help)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for an ImageFolder (default 0)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")


def _size(text: str) -> int:
    from .memory import check_max_memory

    try:
        return check_max_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightablate",
        description="Exact single-weight ablation: the loss and accuracy change of zeroing each weight.")
    parser.add_argument("--version", action="version", version=f"weightablate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser(
        "run", help="ablate the weights of one Linear or Conv2d layer and summarise",
        description="Zero each chosen weight of one Linear or Conv2d layer, alone, and measure the exact change of the "
                    "loss, KL and predictions over the dataset. Without arguments: a small MLP trained on "
                    "scikit-learn's digits (cached), every weight of fc2, on the test split and on a train subset "
                    "of the same size.")
    run.add_argument("--model", help="a torchvision model name (e.g. resnet18, alexnet; randomly initialised "
                                     "unless --checkpoint) or 'module:function' returning an nn.Module "
                                     "(called with num_classes= when it accepts it). Default: the digits MLP")
    run.add_argument("--checkpoint", type=Path, help="a state dict (torch.save) loaded into the model")
    run.add_argument("--data", default="digits",
                     help="'digits' (default; scikit-learn's bundled digits) or a torchvision ImageFolder directory")
    run.add_argument("--layer", help="dotted name of the nn.Linear or nn.Conv2d to ablate. Default: fc2 for the "
                                     "digits MLP, else the second-to-last Linear (the last when there is only one)")
    run.add_argument("--weights", type=_weights_arg, default=_DEFAULT, metavar="K",
                     help=f"how many weights to draw (with --seed), or 'all'. Default: all for the digits MLP, "
                          f"else {DEFAULT_K} (all if fewer)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weight draw, the digits split/training and "
                                                         "the train subset (default 0)")
    run.add_argument("--param", choices=("weight", "bias"), default="weight",
                     help="weight (default): ablate entries of the layer's weight; bias: its bias entries "
                          "(--weights then counts bias entries)")
    run.add_argument("--structure", choices=("weight", "out", "branch", "in"), default="weight",
                     help="weight (default): each weight alone; out: whole output units/channels (row/filter, "
                          "bias and what follows the channel on its own removed: its consumers see zero from "
                          "it; refused where the channel meets a residual add); branch: as out, and at a residual "
                          "add the add sees zero from this branch (the skip keeps the channel); in: whole input "
                          "features/channels (the column zeroed in this layer only). "
                          "--weights then counts units")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    run.add_argument("--method", choices=METHODS, default="auto",
                     help="auto (default): the fastest exact method that fits the layer; closed_form: a Linear "
                          "followed by element-wise modules and the final Linear (or producing the logits); "
                          "funnel: the changed channel reaches the final Linear through per-channel maps, a "
                          "residual add and global average pooling (ResNet's last conv); replay: any layer of a "
                          "model torch.fx can trace (re-runs the later layers on the changes, chunk by chunk). "
                          "Forcing one that does not apply is an error saying why. See docs/DESIGN.md")
    run.add_argument("--mode", choices=MODES, default="auto",
                     help="auto (default): the O(D) moment form of the KL where its truncation error is "
                          "certified below 1e-10 relative, else the O(C) loop over classes; exact: always the "
                          "O(C) loop. Both are exact to rounding; auto is faster with many classes")
    run.add_argument("--precision", choices=PRECISIONS, default="model",
                     help="model (default): activations captured in the model's dtype (float32: error ~1e-7 "
                          "relative); float64: captured on a float64 copy of the model, agreeing with a float64 "
                          "zero-evaluate-restore loop to ~1e-12 (slower, a copy of the model in memory)")
    run.add_argument("--by-class", action=argparse.BooleanOptionalAction, default=None,
                     help="also split delta_loss by the samples' label (class_loss, K x C float64 on the "
                          "device; results.npz and the report's per-class section). Default: on when the "
                          "report is made and weights x classes <= 2^25; --no-by-class turns it off")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    _add_loading_args(run, "batch size (default 64 for an ImageFolder, 1024 for digits)", "weightablate-out")
    run.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    run.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                     help="scratch memory budget of the scoring, e.g. 2GiB or 512MB (default 1GiB); data is "
                          "streamed batch by batch, so memory does not grow with the dataset")
    run.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                     help="save the running sums in DIR (atomically, with checksums and fingerprints); rerunning "
                          "the same command after an interruption resumes with a bit-identical result")
    run.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                     help="seconds between checkpoint saves (default 60; 0 = after every chunk of weights); "
                          "Ctrl-C and the end always save")
    run.add_argument("--no-report", action="store_true",
                     help="skip the report (criteria, activation statistics, figures, report.html)")
    run.add_argument("--estimate", action="store_true",
                     help="print the estimate (method, weights x samples, expected time from a timed chunk of the "
                          "first batch, memory) and stop; every run prints it at the start")
    run.set_defaults(func=cmd_run, parser=run)
    _add_prune_parser(sub)
    from .cli_report import add_parsers as _add_report_parsers

    _add_report_parsers(sub)  # report, stats
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args) or 0
    except CLIError as exc:
        args.parser.error(str(exc))  # exits 2 with the subcommand's usage line
    except (OutputError, CheckpointError) as exc:  # an unusable --out / --checkpoint-dir, another run's checkpoint
        print(f"weightablate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: where it stopped and what was kept, no traceback
        print(f"weightablate {args.command}: {interrupted_message(exc)}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # the library's message; a full disk
        print(f"weightablate {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"weightablate: warning: {message}", file=sys.stderr if file is None else file)


def interrupted_message(exc: KeyboardInterrupt) -> str:
    """What a Ctrl-C stopped and where the work is (sweep.Interrupted knows the batch)."""
    from .sweep import Interrupted

    if not isinstance(exc, Interrupted):
        return "interrupted"
    if exc.checkpoint_path is None:
        return f"interrupted after {exc.position()}; nothing was saved (with --checkpoint-dir DIR a rerun resumes " \
               "from where it stopped)"
    return (f"interrupted after {exc.position()}, checkpoint saved in {exc.checkpoint_path.parent}: rerun the same "
            "command to resume")


def estimate_run(args, model: nn.Module, layer: str, k, by_class: bool, folder) -> str:
    """The estimate line of `run`: timed on the first batch, scaled to every weight and sample
    (digits: the test split and the train subset of its size)."""
    from . import digits as dg
    from .estimate import estimate

    if folder is None:
        X_te, y_te = dg.load_digits_split(args.seed)[2:]
        dtype = next(model.parameters()).dtype
        first, n_samples = (X_te[: args.batch_size or 1024].to(dtype), y_te[: args.batch_size or 1024]), \
            2 * X_te.shape[0]
    else:
        loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size or 64, shuffle=False)
        first, n_samples = next(iter(loader)), len(folder)
    est = estimate(model, layer, first, n_samples, k, seed=args.seed, backend=args.backend, mode=args.mode,
                   precision=args.precision, max_memory=args.max_memory, by_class=by_class)
    return est.text()


def save_model_weights(model: nn.Module, args) -> str:
    """Where the weights the run used are kept, as said in the summary: --checkpoint itself, or
    model.pt in --out (a randomly initialised or the digits model), so a result can be traced to
    its model and the run repeated on the same weights (plus their fingerprint)."""
    from .checkpoint import model_fingerprint

    if args.checkpoint is not None:
        where = str(args.checkpoint.resolve())
    else:
        torch.save({k: t.detach().cpu() for k, t in model.state_dict().items()}, args.out / "model.pt")
        where = str(args.out / "model.pt")
    return f"{where} (fingerprint {model_fingerprint(model)})"


# --- the run command --------------------------------------------------------------------------

def cmd_run(args) -> int:
    from . import distributed
    from .memory import keep_freed_memory

    keep_freed_memory()  # chunks reuse freed scratch instead of faulting fresh pages in (benchmarks/README)

    own_group = distributed.init_from_env(_device(args).type)  # under torchrun: join the process group
    try:
        return _run(args, distributed)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, distributed) -> int:
    from . import ablate
    from . import digits as dg
    from .summary import format_summary, summarize, to_json

    main_rank = distributed.is_main()  # under torchrun every rank computes, rank 0 alone writes and prints
    quiet = args.quiet or not main_rank
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    progress = False if quiet else None
    on_digits = args.data == "digits"
    default_model = args.model is None
    if main_rank and not args.estimate:
        check_outputs(args)  # before any work: an unwritable --out must not cost the whole run
    model, model_desc, folder, device = model_and_folder(args, log, distributed.main_first)
    num_classes = dg.N_CLASSES if folder is None else folder.model_classes

    # layer and weights
    layer = args.layer or (dg.DEFAULT_LAYER if default_model else default_layer(model))
    target = layer_arg(model, layer)
    if args.param == "bias" and target.bias is None:
        raise CLIError(f"--param bias: layer {layer!r} has no bias")
    if args.structure != "weight" and args.param == "bias":
        raise CLIError(f"--structure {args.structure} removes whole units, their bias included: drop --param bias")
    if args.structure != "weight":
        from .structured import n_units, unit_word

        numel, what = n_units(target, args.structure), unit_word(target, args.structure)
    else:
        numel, what = getattr(target, args.param).numel(), f"{args.param} entries"
    if args.weights is _DEFAULT:
        k = None if default_model else min(DEFAULT_K, numel)
    else:
        k = args.weights
    if k is not None and k > numel:
        raise CLIError(f"--weights {k}: layer {layer!r} has only {numel} {what}")
    if k == numel:
        k = None
    common = dict(backend=args.backend, mode=args.mode, precision=args.precision, seed=args.seed,
                  method=args.method, param=args.param, structure=args.structure,
                  progress=progress, batch_size=args.batch_size, max_memory=args.max_memory,
                  checkpoint_every=args.checkpoint_every)
    ckpt = (lambda sub: None) if args.checkpoint_dir is None else \
        (lambda sub: args.checkpoint_dir / sub if on_digits else args.checkpoint_dir)
    from .cli_report import by_class_ok

    by_class = args.by_class if args.by_class is not None else \
        not args.no_report and by_class_ok(numel if k is None else k, num_classes)

    if main_rank and (args.estimate or not quiet):
        text = estimate_run(args, model, layer, k, by_class, folder)
        if args.estimate:
            print(text)
            return 0
        log(text)
    weights_file = save_model_weights(model, args) if main_rank else None
    train_result = None
    if on_digits:
        X_tr, y_tr, X_te, y_te = dg.load_digits_split(args.seed)
        dtype = target.weight.dtype
        X_tr, X_te = X_tr.to(dtype), X_te.to(dtype)
        n_desc = f"digits test split ({X_te.shape[0]} samples)"
        log(f"ablating {numel if k is None else k} {what} of {layer} on the {n_desc}...")
        result = ablate(model, layer, (X_te, y_te), weights=k, by_class=by_class, checkpoint_dir=ckpt("test"),
                        **common)
        test_data = (X_te, y_te)
        X_sub, y_sub = dg.train_subset(X_tr, y_tr, X_te.shape[0], args.seed)
        log(f"... and on a train subset of {X_sub.shape[0]} samples")
        train_result = ablate(model, layer, (X_sub, y_sub), weights=result.indices, checkpoint_dir=ckpt("train"),
                              **common)
    else:
        loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size or 64, shuffle=False,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        common["batch_size"] = None
        n_desc = f"ImageFolder {args.data} ({len(folder)} images, {folder.description})"
        log(f"ablating {numel if k is None else k} {what} of {layer} on the {n_desc}...")
        result = ablate(model, layer, loader, weights=k, by_class=by_class, checkpoint_dir=ckpt(""), **common)
        test_data = loader
    if not main_rank:
        return 0
    result.save(args.out / "results.npz")
    if train_result is not None:
        train_result.save(args.out / "results_train.npz")

    summary = summarize(result, train_result)
    summary["model"] = model_desc
    summary["data"] = n_desc
    summary["seed"] = args.seed
    summary["model_weights"] = weights_file
    report_text = ""
    if not args.no_report:
        from .cli_report import report_after_run

        report_text = report_after_run(args, summary, result, train_result, model, layer, test_data, log)
    text = f"model {model_desc}, data {n_desc}\nmodel weights: {weights_file}\n" + format_summary(summary) \
        + report_text
    (args.out / "summary.txt").write_text(text + "\n")
    with open(args.out / "summary.json", "w") as fh:
        json.dump(to_json(summary), fh, indent=2, allow_nan=False)
        fh.write("\n")
    print(text)
    log(f"wrote {args.out / 'results.npz'}" + (", results_train.npz" if train_result is not None else "")
        + ", summary.txt, summary.json" + ("" if args.no_report else ", report.html and figures")
        + ("" if args.checkpoint is not None else ", model.pt (the model's weights)"))
    return 0


# --- the prune command ------------------------------------------------------------------------

def _sparsities_arg(text: str):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sparsity in (0, 1) or increasing ones like 0.5,0.8,0.9, "
                                         f"got {text!r}") from None
    if not values or any(not 0.0 < v < 1.0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"expected a sparsity in (0, 1) or increasing ones like 0.5,0.8,0.9, "
                                         f"got {text!r}")
    return values[0] if len(values) == 1 else values


CRITERION_HELP = (
    "how weights are scored (higher = kept). wanda (default): |w| x the L2 norm of its input over the data, "
    "one forward pass, any Linear/Conv2d; in benchmarks/prune_experiment.py the best of the any-layer criteria "
    "before fine-tuning and within a point of the dense model after it, up to 95%% sparsity; magnitude: |w| "
    "(no data), squared: w^2; taylor: |gradient x w|; obd: 0.5 h w^2 with the exact "
    "Hessian diagonal (best before fine-tuning in the experiment, but only for a Linear with a closed-form "
    "head); taylor2: -g w + 0.5 h w^2, a signed estimate of exact (same layers as obd); exact: the measured "
    "loss change of zeroing each weight alone (any layer ablate scores, slowest): the truth for ONE weight, "
    "but a poor criterion for removing many at once (their effects do not add up: 50%% in one step wrecked "
    "the model in the experiment)")


def _add_prune_parser(sub) -> None:
    from .prune import CRITERIA, DEFAULT_CRITERION, RANKINGS

    p = sub.add_parser(
        "prune", help="iterative pruning by WANDA, exact or another importance, torch.nn.utils.prune masks",
        description="Iterative global unstructured pruning: score the weights of the chosen Linear/Conv2d "
                    f"layers (--criterion, default {DEFAULT_CRITERION}), prune the least important ones with "
                    "torch.nn.utils.prune (signed ranking: smallest score first), fine-tune with the masks "
                    "held, re-score, repeat up to the target sparsity. Without arguments: every Linear layer "
                    "of the digits MLP to 50% in 3 steps, scored and fine-tuned on the train split, "
                    "evaluated on the test split. Writes pruned.pt (a plain state dict, pruned weights zero), "
                    "history.json and summary.txt.")
    p.add_argument("--model", help="a torchvision model name or 'module:function' (as for run). Default: the "
                                   "digits MLP")
    p.add_argument("--checkpoint", type=Path, help="a state dict (torch.save) loaded into the model")
    p.add_argument("--data", default="digits",
                   help="'digits' (default: train split to score and fine-tune, test split to evaluate) or an "
                        "ImageFolder directory (scores and fine-tunes on it)")
    p.add_argument("--eval-data", help="an ImageFolder directory to evaluate on (default: --data itself)")
    p.add_argument("--layers", help="comma-separated dotted names of the nn.Linear / nn.Conv2d layers to prune "
                                    "together (ranked globally). Default: every nn.Linear layer the criterion "
                                    "can score (all of them, except for obd/taylor2: those with a closed-form "
                                    "head)")
    p.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION, help=CRITERION_HELP)
    p.add_argument("--ranking", choices=RANKINGS, default="signed",
                   help="signed (default: smallest score pruned first) or abs (torch's L1Unstructured order, "
                        "for comparison)")
    p.add_argument("--sparsity", type=_sparsities_arg, default=0.5, metavar="S",
                   help="target sparsity of the layers together, reached in --steps geometric steps, or "
                        "increasing milestones like 0.5,0.8,0.9 (one step each). Default 0.5")
    p.add_argument("--steps", type=_positive, default=3, help="pruning steps to a single target (default 3)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after each step (default 2; 0: none)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for fine-tuning (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the digits split/model and of fine-tuning")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="for --criterion exact: " + BACKEND_HELP)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    _add_loading_args(p, "fine-tuning batch size (default 32 for digits, 64 for an ImageFolder)", "weightablate-prune")
    p.add_argument("--quiet", action="store_true", help="no status lines on stderr (the summary is still printed)")
    p.set_defaults(func=cmd_prune, parser=p)


def cmd_prune(args) -> int:
    from . import digits as dg
    from . import prune as wp

    check_outputs(args)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.epochs < 0:
        raise CLIError(f"--epochs must be >= 0, got {args.epochs}")
    on_digits = args.data == "digits"
    if on_digits and args.eval_data is not None:
        raise CLIError("--eval-data goes with an ImageFolder --data (digits evaluates on its test split)")
    model, model_desc, folder, device = model_and_folder(args, log)
    if not on_digits:
        eval_folder = folder
        if args.eval_data is not None:
            eval_folder = image_folder(Path(args.eval_data), args, "--eval-data")
            how = map_classes(eval_folder, args, folder.model_classes, "--eval-data")
            if how == "index" and eval_folder.classes != folder.classes:
                raise CLIError(f"--eval-data has the classes {eval_folder.classes[:5]}, --data "
                               f"{folder.classes[:5]}: mapped by index they must be the same")

    if on_digits:
        X_tr, y_tr, X_te, y_te = dg.load_digits_split(args.seed)
        score_data, train_data, eval_data = (X_tr, y_tr), (X_tr, y_tr), (X_te, y_te)
        data_desc = f"digits: scored and fine-tuned on the train split ({X_tr.shape[0]}), evaluated on the test " \
                    f"split ({X_te.shape[0]})"
        batch_size, threads = args.batch_size or 32, (1 if device.type == "cpu" else None)
    else:
        bs = args.batch_size or 64
        loader = lambda ds, shuffle: torch.utils.data.DataLoader(  # noqa: E731
            ds, batch_size=bs, shuffle=shuffle, num_workers=args.workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(args.seed) if shuffle else None)
        score_data, train_data, eval_data = loader(folder, False), loader(folder, True), loader(eval_folder, False)
        data_desc = f"ImageFolder {args.data} ({len(folder)} images); evaluated on " + \
                    ("the same images" if args.eval_data is None else f"{args.eval_data} ({len(eval_folder)})")
        batch_size, threads = bs, None

    kinds = (nn.Linear, nn.Conv2d)
    prunable = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    if args.layers:
        layers = [t.strip() for t in args.layers.split(",") if t.strip()]
        for name in layers:
            if name not in prunable:
                raise CLIError(f"--layers: {name!r} is not an nn.Linear or nn.Conv2d of the model; those are: "
                               f"{prunable}")
        scorable = wp.scorable_layers(model, score_data, args.criterion, kinds)
        for name in layers:
            if name not in scorable:
                why = ("it needs the closed form: a Linear producing the logits or followed by element-wise "
                       "modules and the final Linear" if args.criterion in ("obd", "taylor2") else
                       "ablate cannot score it (see `weightablate run --layer " + name + "`)")
                raise CLIError(f"--layers: {name!r} cannot be scored by --criterion {args.criterion}: {why}; "
                               f"scorable: {scorable or 'none'}")
    else:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise CLIError(f"--model {model_desc}: has no nn.Linear layer to prune by default; name nn.Conv2d "
                           f"layers with --layers (its layers: {prunable[:8]}{'...' if len(prunable) > 8 else ''})")
        layers = wp.scorable_layers(model, score_data, args.criterion)
        if not layers:
            raise CLIError(f"--criterion {args.criterion} can score none of the Linear layers {linears} of "
                           f"--model {model_desc}; pass --layers, or --criterion wanda/magnitude/taylor")
    total = sum(model.get_submodule(n).weight.numel() for n in layers)
    log(f"pruning {', '.join(layers)} ({total} weights) of {model_desc} by {args.criterion} ({args.ranking} ranking) "
        f"to {args.sparsity}; {data_desc}")
    base_loss, base_acc = wp.evaluate(model, eval_data)
    kwargs = {"backend": args.backend} if args.criterion == "exact" else {}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # tiny models: one thread is the fastest (also for scoring)
    try:
        history = wp.iterative(model, layers, args.sparsity, score_data, criterion=args.criterion,
                               steps=args.steps, epochs=args.epochs, train_data=train_data, eval_data=eval_data,
                               lr=args.lr, batch_size=batch_size, seed=args.seed, ranking=args.ranking, log=log,
                               **kwargs)
    finally:
        torch.set_num_threads(old_threads)
    wp.remove(model)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "pruned.pt")
    summary = {"model": model_desc, "data": data_desc, "layers": layers, "criterion": args.criterion,
               "ranking": args.ranking, "seed": args.seed, "epochs_per_step": args.epochs,
               "base_loss": base_loss, "base_accuracy": base_acc, "history": history}
    with open(args.out / "history.json", "w") as fh:
        json.dump(summary, fh, indent=2, allow_nan=False)
        fh.write("\n")
    lines = [f"model {model_desc}, layers {', '.join(layers)} ({total} weights), criterion {args.criterion} "
             f"({args.ranking} ranking), {args.epochs} fine-tuning epochs per step",
             data_desc, f"dense: loss {base_loss:.4f}, accuracy {100 * base_acc:.2f}%",
             "step  sparsity  acc pruned  acc tuned  loss pruned  loss tuned"]
    for h in history:
        lines.append(f"{h['step']:>4}  {100 * h['sparsity']:7.2f}%  {100 * h['accuracy_pruned']:9.2f}%  "
                     f"{100 * h['accuracy']:8.2f}%  {h['loss_pruned']:11.4f}  {h['loss']:10.4f}")
    text = "\n".join(lines)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    log(f"wrote {args.out / 'pruned.pt'} (plain state dict, pruned weights are zeros), history.json, summary.txt")
    return 0

"""The ``weightablate`` command line.

    weightablate run                       # digits MLP: every weight of fc2, test and train subset
    weightablate run --model resnet18 --data path/to/imagefolder --checkpoint r18.pt
    weightablate run --model mypkg.models:build --data digits --layer 0

Writes ``results.npz`` (``weightablate.load``), ``results_train.npz`` (digits data only),
``summary.txt`` and ``summary.json`` into ``--out`` and prints the summary.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .api import MODES, PRECISIONS
from .ops import BACKENDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_K = 4096
_DEFAULT = object()  # --weights not given (argparse applies type= to string defaults only)


class CLIError(Exception):
    """An error in what the user asked for: reported as ``weightablate run: error: ...``."""


def _weights_arg(text: str):
    if text.lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {k}")
    return k


def _positive(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {k}")
    return k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightablate",
        description="Exact single-weight ablation: the loss and accuracy change of zeroing each weight.")
    parser.add_argument("--version", action="version", version=f"weightablate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser(
        "run", help="ablate the weights of one Linear layer and summarise",
        description="Zero each chosen weight of one Linear layer, alone, and measure the exact change of the "
                    "loss, KL and predictions over the dataset. Without arguments: a small MLP trained on "
                    "scikit-learn's digits (cached), every weight of fc2, on the test split and on a train subset "
                    "of the same size.")
    run.add_argument("--model", help="a torchvision model name (e.g. resnet18, alexnet; randomly initialised "
                                     "unless --checkpoint) or 'module:function' returning an nn.Module "
                                     "(called with num_classes= when it accepts it). Default: the digits MLP")
    run.add_argument("--checkpoint", type=Path, help="a state dict (torch.save) loaded into the model")
    run.add_argument("--data", default="digits",
                     help="'digits' (default; scikit-learn's bundled digits) or a torchvision ImageFolder directory")
    run.add_argument("--layer", help="dotted name of the nn.Linear to ablate. Default: fc2 for the digits MLP, "
                                     "else the second-to-last Linear (the last when there is only one)")
    run.add_argument("--weights", type=_weights_arg, default=_DEFAULT, metavar="K",
                     help=f"how many weights to draw (with --seed), or 'all'. Default: all for the digits MLP, "
                          f"else {DEFAULT_K} (all if fewer)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weight draw, the digits split/training and "
                                                         "the train subset (default 0)")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help="default auto")
    run.add_argument("--mode", choices=MODES, default="auto", help="default auto")
    run.add_argument("--precision", choices=PRECISIONS, default="model", help="default model")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where the model runs; auto: cuda when available unless --backend cpu")
    run.add_argument("--image-size", type=_positive, default=224, metavar="S",
                     help="ImageFolder images are resized to SxS (default 224)")
    run.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                     help="batch size (default 64 for an ImageFolder, 1024 for digits)")
    run.add_argument("--workers", type=int, default=0, help="DataLoader workers for an ImageFolder (default 0)")
    run.add_argument("--out", type=Path, default=Path("weightablate-out"),
                     help="output directory (default weightablate-out)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    run.set_defaults(func=cmd_run, parser=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as exc:
        args.parser.error(str(exc))  # exits 2 with the subcommand's usage line
    except (ValueError, TypeError, RuntimeError) as exc:  # raised by the library with a message
        print(f"weightablate {args.command}: error: {exc}", file=sys.stderr)
        return 1


# --- model and data ---------------------------------------------------------------------------

def _resolve_callable(spec: str):
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise CLIError(f"--model {spec!r}: expected 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules in the working directory are importable
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CLIError(f"--model {spec!r}: cannot import module {mod_name!r}: {exc}") from None
    obj = module
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--model {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"--model {spec!r}: {fn_name!r} is not callable")
    return obj


def build_model(spec: str, num_classes: int) -> nn.Module:
    """A torchvision model name (random weights) or 'module:function'."""
    if ":" in spec:
        fn = _resolve_callable(spec)
        try:
            params = inspect.signature(fn).parameters
            takes = "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            takes = False
        model = fn(num_classes=num_classes) if takes else fn()
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        import torchvision
    except ImportError:
        raise CLIError(f"--model {spec!r}: torchvision models need torchvision (pip install torchvision)") from None
    names = torchvision.models.list_models()
    if spec not in names:
        import difflib

        classifiers = torchvision.models.list_models(module=torchvision.models)
        close = [n for n in classifiers if n.startswith(spec.lower())][:8] or \
            difflib.get_close_matches(spec.lower(), classifiers, n=5)
        hint = f"; did you mean one of {close}?" if close else "; see torchvision.models.list_models()"
        raise CLIError(f"--model {spec!r} is not a torchvision model name nor 'module:function'{hint}")
    kwargs = {"weights": None, "num_classes": num_classes}
    if spec.startswith("inception") or spec.startswith("googlenet"):
        kwargs["aux_logits"] = False  # forward returns a namedtuple otherwise
        kwargs["init_weights"] = True
    return torchvision.models.get_model(spec, **kwargs)


def load_checkpoint(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CLIError(f"--checkpoint {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--checkpoint {str(path)!r}: cannot read a state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CLIError(f"--checkpoint {str(path)!r}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CLIError(f"--checkpoint {str(path)!r} does not fit the model: {exc}") from None


def default_layer(model: nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CLIError("--layer: the model has no nn.Linear layer to ablate")
    return linears[-2] if len(linears) >= 2 else linears[-1]


def image_folder(path: Path, size: int):
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise CLIError(f"--data {str(path)!r}: an ImageFolder needs torchvision (pip install torchvision)") from None
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        return datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise CLIError(f"--data {str(path)!r}: not a usable ImageFolder (one subdirectory of images per class): "
                       f"{exc}") from None


# --- the run command --------------------------------------------------------------------------

def _device(args) -> torch.device:
    if args.device == "auto":
        use_cuda = torch.cuda.is_available() and args.backend not in ("cpu",)
        return torch.device("cuda" if use_cuda else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return torch.device(args.device)


def cmd_run(args) -> int:
    from . import ablate
    from . import digits as dg
    from .summary import format_summary, summarize, to_json

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    progress = False if args.quiet else None
    on_digits = args.data == "digits"
    folder = None
    if not on_digits:
        path = Path(args.data)
        if not path.is_dir():
            raise CLIError(f"--data {args.data!r}: neither 'digits' nor an existing directory")
        if args.model is None:
            raise CLIError("--model is required with an ImageFolder --data (the default model is for digits)")
        folder = image_folder(path, args.image_size)
        num_classes = len(folder.classes)
    else:
        num_classes = dg.N_CLASSES
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CLIError(f"--checkpoint {str(args.checkpoint)!r}: no such file")
    device = _device(args)

    # model
    default_model = args.model is None
    if default_model:
        if args.checkpoint is not None:
            model = dg.digits_mlp()
        else:
            started = time.perf_counter()
            model = dg.digits_model(args.seed, cache=True, log=log)
            log(f"digits MLP ready in {time.perf_counter() - started:.1f} s")
        model_desc = "digits MLP 64-256-256-10"
    else:
        model = build_model(args.model, num_classes)
        model_desc = args.model
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model = model.to(device).eval()

    # layer and weights
    layer = args.layer or (dg.DEFAULT_LAYER if default_model else default_layer(model))
    try:
        target = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise CLIError(f"--layer {layer!r} is not a module of the model; its Linear layers are: {names}") from None
    if not isinstance(target, nn.Linear):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise CLIError(f"--layer {layer!r} is a {type(target).__name__}, not an nn.Linear; "
                       f"the model's Linear layers are: {names}")
    numel = target.weight.numel()
    if args.weights is _DEFAULT:
        k = None if default_model else min(DEFAULT_K, numel)
    else:
        k = args.weights
    if k is not None and k > numel:
        raise CLIError(f"--weights {k}: layer {layer!r} has only {numel} weights")
    if k == numel:
        k = None
    common = dict(backend=args.backend, mode=args.mode, precision=args.precision, seed=args.seed,
                  progress=progress, batch_size=args.batch_size)

    args.out.mkdir(parents=True, exist_ok=True)
    train_result = None
    if on_digits:
        X_tr, y_tr, X_te, y_te = dg.load_digits_split(args.seed)
        dtype = target.weight.dtype
        X_tr, X_te = X_tr.to(dtype), X_te.to(dtype)
        n_desc = f"digits test split ({X_te.shape[0]} samples)"
        log(f"ablating {numel if k is None else k} weights of {layer} on the {n_desc}...")
        result = ablate(model, layer, (X_te, y_te), weights=k, **common)
        X_sub, y_sub = dg.train_subset(X_tr, y_tr, X_te.shape[0], args.seed)
        log(f"... and on a train subset of {X_sub.shape[0]} samples")
        train_result = ablate(model, layer, (X_sub, y_sub), weights=result.indices, **common)
        train_result.save(args.out / "results_train.npz")
    else:
        loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size or 64, shuffle=False,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        common["batch_size"] = None
        n_desc = f"ImageFolder {args.data} ({len(folder)} images, {num_classes} classes)"
        log(f"ablating {numel if k is None else k} weights of {layer} on the {n_desc}...")
        result = ablate(model, layer, loader, weights=k, **common)
    result.save(args.out / "results.npz")

    summary = summarize(result, train_result)
    summary["model"] = model_desc
    summary["data"] = n_desc
    summary["seed"] = args.seed
    text = f"model {model_desc}, data {n_desc}\n" + format_summary(summary)
    (args.out / "summary.txt").write_text(text + "\n")
    with open(args.out / "summary.json", "w") as fh:
        json.dump(to_json(summary), fh, indent=2, allow_nan=False)
        fh.write("\n")
    print(text)
    log(f"wrote {args.out / 'results.npz'}" + (", results_train.npz" if train_result is not None else "")
        + ", summary.txt, summary.json")
    return 0

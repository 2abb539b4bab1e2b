"""What the commands share: the user-error type, the model and data options (--model,
--checkpoint, --data and the ImageFolder options, --device, --seed) and the loading of both.
``cli`` (run, prune) and ``cli_report`` (report, stats) import from here, so that cli_report does not
import cli (which imports it)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

DEVICE_HELP = "where the model runs: auto (default: cuda when available unless --backend cpu), cpu or cuda"


class CLIError(Exception):
    """An error in what the user asked for: reported as ``weightablate run: error: ...``."""


def _positive(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {k}")
    return k


def _normalize_arg(text: str):
    from .folder import parse_normalize

    try:
        return parse_normalize(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_folder_args(p) -> None:
    """How an ImageFolder --data is read (run, prune, stats): weightablate/folder.py."""
    from .folder import RESIZES

    p.add_argument("--image-size", type=_positive, default=224, metavar="S",
                   help="ImageFolder images become SxS (default 224), see --resize")
    p.add_argument("--resize", choices=RESIZES, default="squash",
                   help="squash (default): resize to SxS, aspect ratio not kept; center-crop: shorter side to "
                        "S*256/224, then the central SxS (torchvision's ImageNet evaluation transform)")
    p.add_argument("--normalize", type=_normalize_arg, default="imagenet", metavar="imagenet|none|M:S",
                   help="after ToTensor (RGB in [0, 1]): imagenet (default: mean 0.485,0.456,0.406, std "
                        "0.229,0.224,0.225), none, or m1,m2,m3:s1,s2,s3")
    p.add_argument("--num-classes", type=_positive, default=None, metavar="N",
                   help="outputs of the model that --model builds (default: the ImageFolder's number of "
                        "classes; e.g. 1000 for an ImageNet checkpoint)")
    p.add_argument("--class-map", default="auto", metavar="auto|index|name|categories|FILE",
                   help="which model class each ImageFolder subdirectory is: index: the k-th subdirectory in "
                        "sorted order is class k; name: subdirectories named by class numbers (0, 17, 954); "
                        "categories: named by the model's category names (torchvision's ImageNet names, e.g. "
                        "goldfish); FILE: a JSON object {\"subdirectory\": class}. auto (default): name if every "
                        "subdirectory is a class number, else index if the counts agree, else categories")


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


STATE_DICT_HINT = "--checkpoint takes a model's weights: a file written by torch.save(model.state_dict(), path)"


def check_checkpoint_path(path: Path) -> None:
    """--checkpoint must be a state dict file: name the option that was meant for a sweep's
    checkpoint (or its directory) and for a result file, before any work."""
    from .checkpoint import MAGIC

    if path.is_dir():
        if any(path.glob("*.ckpt")) or any(path.glob("*/*.ckpt")):
            raise CLIError(f"--checkpoint {str(path)!r} is the directory of a sweep's saved progress: to resume "
                           f"that sweep pass it as --checkpoint-dir {str(path)!r}. {STATE_DICT_HINT}")
        raise CLIError(f"--checkpoint {str(path)!r} is a directory. {STATE_DICT_HINT}")
    if not path.is_file():
        raise CLIError(f"--checkpoint {str(path)!r}: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as exc:
        raise CLIError(f"--checkpoint {str(path)!r}: cannot read it: {exc}") from None
    if head == MAGIC:
        raise CLIError(f"--checkpoint {str(path)!r} is a sweep checkpoint (saved progress of `run "
                       f"--checkpoint-dir`): to resume that sweep pass its directory as --checkpoint-dir "
                       f"{str(path.parent)!r}. {STATE_DICT_HINT}")
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "__meta__.npy" in z.namelist():
                raise CLIError(f"--checkpoint {str(path)!r} is a weightablate result (results.npz), not model "
                               f"weights; `weightablate report` reads results. {STATE_DICT_HINT}")


def load_checkpoint(model: nn.Module, path: Path) -> None:
    check_checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc):  # pickled objects: never advise weights_only=False (it runs code)
            msg = ("it holds pickled Python objects (a whole model saved with torch.save(model)?), which are "
                   "not loaded because unpickling can run arbitrary code; save model.state_dict() instead")
        raise CLIError(f"--checkpoint {str(path)!r}: not a state dict: {msg}. {STATE_DICT_HINT}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CLIError(f"--checkpoint {str(path)!r}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        own = model.state_dict()
        hint = ""
        for key, t in state.items():  # a classifier of another size: name --num-classes
            if key in own and isinstance(t, torch.Tensor) and t.dim() >= 1 and own[key].dim() == t.dim() and \
                    own[key].shape[1:] == t.shape[1:] and own[key].shape[0] != t.shape[0] and key.endswith("weight"):
                hint = (f" ({key} has {t.shape[0]} outputs in the checkpoint, {own[key].shape[0]} in the model "
                        f"built: pass --num-classes {t.shape[0]})")
                break
        first = str(exc).strip().splitlines()
        raise CLIError(f"--checkpoint {str(path)!r} does not fit the model{hint}: "
                       f"{' '.join(x.strip() for x in first[:3])}") from None


def default_layer(model: nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CLIError("--layer: the model has no nn.Linear layer to ablate")
    return linears[-2] if len(linears) >= 2 else linears[-1]


def image_folder(path: Path, args, option: str = "--data"):
    """The ImageFolder at ``path``, read as --image-size/--resize/--normalize say (weightablate/folder.py)."""
    from .folder import IMAGENET_MEAN, IMAGENET_STD, transform

    try:
        from torchvision import datasets
    except ImportError:
        raise CLIError(f"{option} {str(path)!r}: an ImageFolder needs torchvision (pip install torchvision)") from None
    tf = transform(args.image_size, getattr(args, "resize", "squash"),
                   getattr(args, "normalize", (IMAGENET_MEAN, IMAGENET_STD)))  # parsed by _normalize_arg
    try:
        return datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise CLIError(f"{option} {str(path)!r}: not a usable ImageFolder (one subdirectory of images per class): "
                       f"{exc}") from None


def map_classes(folder, args, num_classes: int, option: str = "--data") -> str:
    """Give ``folder`` the model's class numbers as labels (--class-map); returns the rule used."""
    from .folder import MapTarget, categories_of, class_map

    try:
        table, how = class_map(folder.classes, num_classes, getattr(args, "class_map", "auto"),
                               categories_of(args.model))
    except ValueError as exc:
        raise CLIError(f"--class-map: {option} {exc}") from None
    folder.target_transform = MapTarget(table)
    folder.model_classes = num_classes
    return how


def _device(args) -> torch.device:
    if args.device == "auto":
        use_cuda = torch.cuda.is_available() and args.backend not in ("cpu",)
        kind = "cuda" if use_cuda else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    else:
        kind = args.device
    if kind == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(kind)


def layer_arg(model: nn.Module, name: str) -> nn.Module:
    """The --layer module: an nn.Linear or nn.Conv2d of the model, or a CLIError listing those."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CLIError(f"--layer {name!r} is not a module of the model; its Linear and Conv2d layers are: "
                       f"{names}") from None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise CLIError(f"--layer {name!r} is a {type(module).__name__}, not an nn.Linear or nn.Conv2d; "
                       f"the model's Linear and Conv2d layers are: {names}")
    return module


def model_and_folder(args, log, main_first=contextlib.nullcontext):
    """The options every command shares (--model, --checkpoint, --data, --image-size, --device,
    --seed): (model on its device in eval mode, its description, the ImageFolder or None for
    digits, the device). main_first: a context in which only rank 0 trains the digits default."""
    from . import digits as dg

    folder = None
    if args.data != "digits":
        path = Path(args.data)
        if not path.is_dir():
            raise CLIError(f"--data {args.data!r}: neither 'digits' nor an existing directory")
        if args.model is None:
            raise CLIError("--model is required with an ImageFolder --data (the default model is for digits)")
        folder = image_folder(path, args)
    elif getattr(args, "num_classes", None) not in (None, 10):
        raise CLIError(f"--num-classes {args.num_classes}: digits has 10 classes (--num-classes is for an ImageFolder)")
    if args.checkpoint is not None:
        check_checkpoint_path(args.checkpoint)
    ckdir = getattr(args, "checkpoint_dir", None)
    if ckdir is not None and ckdir.is_file():
        raise CLIError(f"--checkpoint-dir {str(ckdir)!r} is a file; --checkpoint-dir takes the directory where a "
                       "sweep saves its progress (for a model's state dict use --checkpoint)")
    device = _device(args)
    if args.model is None:
        if args.checkpoint is not None:
            model = dg.digits_mlp()
        else:
            started = time.perf_counter()
            with main_first():  # under torchrun rank 0 trains and caches, the others read the cache
                model = dg.digits_model(args.seed, cache=True, log=log)
            log(f"digits MLP ready in {time.perf_counter() - started:.1f} s")
        desc = "digits MLP 64-256-256-10"
    else:
        n_classes = dg.N_CLASSES if folder is None else getattr(args, "num_classes", None) or len(folder.classes)
        torch.manual_seed(args.seed)  # a randomly initialised model is the same in every run with this seed
        model = build_model(args.model, n_classes)
        desc = args.model
    if folder is not None:
        how = map_classes(folder, args, n_classes)  # folder implies --model
        folder.description = f"{len(folder.classes)} classes, mapped to the model's {folder.model_classes} by {how}"
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    return model.to(device).eval(), desc, folder, device

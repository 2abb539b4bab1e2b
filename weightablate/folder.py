"""An ImageFolder as the command line reads it: preprocessing and the map from folder classes to the
model's output classes.

Preprocessing (``transform``): ``resize="squash"`` resizes every image to ``size x size`` (aspect
ratio not kept); ``"center-crop"`` resizes the shorter side to ``size * 256 / 224`` and takes the
central ``size x size`` (torchvision's ImageNet evaluation transform); then ``ToTensor`` (RGB in
[0, 1]) and ``Normalize(mean, std)``: ``normalize="imagenet"`` (mean 0.485,0.456,0.406, std
0.229,0.224,0.225), ``"none"``, or ``"m1,m2,m3:s1,s2,s3"``.

Class map (``class_map``): ImageFolder numbers its subdirectories 0..K-1 in sorted order; the model
has ``num_classes`` outputs. Folder class ``k`` becomes model class:

* ``"index"``: ``k`` (the sorted position);
* ``"name"``: ``int(name)``: subdirectories named by the model's class numbers (``0``, ``17``, ``954``);
* ``"categories"``: the position of the subdirectory's name among the model's category names
  (torchvision's ImageNet names of the weights, e.g. ``goldfish``, ``tiger_shark``: case and ``_``
  versus space ignored);
* a JSON file ``{"folder name": model class, ...}`` covering every subdirectory;
* ``"auto"`` (default): ``name`` when every subdirectory is an integer below ``num_classes``, else
  ``index`` when the folder has exactly ``num_classes`` classes, else ``categories`` when every name
  is one of ``categories``; anything else is an error asking for ``--class-map``.
"""
from __future__ import annotations

import json
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZES = ("squash", "center-crop")
CLASS_MAPS = ("auto", "index", "name", "categories")


def parse_normalize(text: str):
    """``"imagenet"`` | ``"none"`` | ``"m1,m2,m3:s1,s2,s3"`` -> (mean, std) or None; ValueError otherwise."""
    if text == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if text == "none":
        return None
    mean, sep, std = text.partition(":")
    try:
        m = tuple(float(v) for v in mean.split(","))
        s = tuple(float(v) for v in std.split(","))
    except ValueError:
        m = s = ()
    if not sep or len(m) != 3 or len(s) != 3 or any(v <= 0 for v in s):
        raise ValueError(f"expected imagenet, none or three means and three positive stds like "
                         f"0.5,0.5,0.5:0.25,0.25,0.25, got {text!r}")
    return m, s


def transform(size: int, resize: str = "squash", normalize=(IMAGENET_MEAN, IMAGENET_STD)):
    """The torchvision transform described in the module docstring."""
    from torchvision import transforms

    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    steps = [transforms.Resize((size, size))] if resize == "squash" else \
        [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    steps.append(transforms.ToTensor())
    if normalize is not None:
        steps.append(transforms.Normalize(*normalize))
    return transforms.Compose(steps)


def _key(name: str) -> str:
    return name.lower().replace("_", " ").strip()


def class_map(folder_classes: list[str], num_classes: int, how: str = "auto", categories=None) -> tuple[list, str]:
    """(model class of each folder class, in the folder's sorted order; the rule used: "index", "name",
    "categories" or the file); ValueError saying why not."""
    k = len(folder_classes)
    ints = [int(c) for c in folder_classes if c.isdigit()]
    if how == "auto":
        if len(ints) == k and all(i < num_classes for i in ints):
            how = "name"
        elif k == num_classes:
            how = "index"
        elif categories and len(categories) == num_classes and \
                all(_key(c) in {_key(n) for n in categories} for c in folder_classes):
            how = "categories"
        else:
            raise ValueError(
                f"the folder has {k} classes {folder_classes[:5]}{'...' if k > 5 else ''} but the model "
                f"{num_classes}: say which model class each is: 'index' (folder class k, in sorted order, is "
                f"model class k), 'name' (subdirectories named by model class numbers), 'categories' (names "
                f"of the model's categories, e.g. ImageNet's) or a JSON file {{\"{folder_classes[0]}\": 0, ...}}")
    if how == "index":
        if k > num_classes:
            raise ValueError(f"'index': the folder has {k} classes, more than the model's {num_classes}")
        return list(range(k)), how
    if how == "name":
        bad = [c for c in folder_classes if not c.isdigit() or int(c) >= num_classes]
        if bad:
            raise ValueError(f"'name': subdirectories {bad[:5]} are not class numbers below {num_classes}")
        return [int(c) for c in folder_classes], how
    if how == "categories":
        if not categories or len(categories) != num_classes:
            raise ValueError(f"'categories': the model has no list of {num_classes} category names (torchvision "
                             "ImageNet models with 1000 classes have one)")
        index = {_key(n): i for i, n in enumerate(categories)}
        bad = [c for c in folder_classes if _key(c) not in index]
        if bad:
            raise ValueError(f"'categories': subdirectories {bad[:5]} are not category names of the model "
                             f"(e.g. {list(categories[:3])})")
        return [index[_key(c)] for c in folder_classes], how
    path = Path(how)
    if not path.is_file():
        raise ValueError(f"expected auto, index, name, categories or a JSON file, got {how!r} (no such file)")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{how!r}: not a JSON file: {exc}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{how!r}: expected a JSON object {{\"folder name\": model class}}")
    missing = [c for c in folder_classes if c not in mapping]
    if missing:
        raise ValueError(f"{how!r} does not map the subdirectories {missing[:5]}")
    out = [mapping[c] for c in folder_classes]
    bad = [(c, v) for c, v in zip(folder_classes, out)
           if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"{how!r}: {bad[:3]} are not model classes in [0, {num_classes})")
    return out, how


def categories_of(model_name: str | None) -> list | None:
    """The category names of a torchvision model's pretrained weights (offline metadata), or None."""
    if not model_name or ":" in model_name:
        return None
    try:
        import torchvision

        weights = torchvision.models.get_model_weights(model_name)
        return list(next(iter(weights)).meta.get("categories") or []) or None
    except Exception:  # noqa: BLE001 - unknown name or no weights: no category names
        return None


class MapTarget:
    """``target_transform`` of an ImageFolder: folder class -> model class (a class, so workers can pickle it)."""

    def __init__(self, table: list[int]):
        self.table = list(table)

    def __call__(self, target: int) -> int:
        return self.table[target]

"""AblationResult: what one ablation sweep measured, and its save/load round trip."""
from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field, fields

import numpy as np
import torch

_TENSORS = ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl", "flips", "new_errors",
            "new_correct", "exact_zero", "class_loss")


@dataclass
class AblationResult:
    """The effect of zeroing each selected weight, alone, over the whole dataset.

    Tensors, each (K,) on the CPU: ``indices`` (int64 flat index into ``layer.weight``),
    ``rows``/``cols``, ``weight`` (the original values), ``delta_loss`` (float64,
    ``sum_n CE_n(ablated) - CE_n(base)``: positive = the weight helps), ``delta_kl`` (float64,
    ``sum_n KL(p_n || p'_n)``), ``flips``/``new_errors``/``new_correct`` (int64 prediction
    changes), ``exact_zero`` (bool: zeroing changes no sample's logits at all); with
    ``by_class=True`` also ``class_loss`` (K, C) float64, delta_loss split by the samples' label
    (its rows sum to delta_loss). Metrics not asked for are None.

    ``rows``/``cols`` index the 2-D view ``layer_shape`` = (out units, entries per unit); for a
    Conv2d ``cols`` is a flat index into ``in_channels/groups * kh * kw``. With ``structure="out"`` or ``"in"``
    each entry is a whole unit: ``indices`` = ``rows`` = the unit, ``cols`` = 0, ``layer_shape`` =
    (units, 1) and ``weight`` the L2 norm of the weights it removes. ``coords()`` (and the
    dataframe's ``out``/``in``/``kh``/``kw`` columns) give the position in ``weight_shape``.
    """

    indices: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    weight: torch.Tensor
    delta_loss: torch.Tensor | None
    delta_kl: torch.Tensor | None
    flips: torch.Tensor | None
    new_errors: torch.Tensor | None
    new_correct: torch.Tensor | None
    exact_zero: torch.Tensor
    n_samples: int
    base_loss: float  # mean cross-entropy over the dataset
    base_accuracy: float
    class_loss: torch.Tensor | None = None  # (K, C) float64: delta_loss split by label (by_class=True)
    layer: str = ""
    layer_shape: tuple[int, int] = (0, 0)  # the 2-D view rows/cols index: (out units, entries per unit)
    weight_shape: tuple = ()  # the parameter's own shape, e.g. (out, in, kh, kw) for a Conv2d; () = unknown
    param: str = "weight"  # which parameter the indices refer to: "weight" or "bias" (rows = entry, cols = 0);
    # "in_proj_weight"/"in_proj_bias" for an nn.MultiheadAttention layer
    method: str = ""  # which exact path ran: "logits", "piecewise", "elementwise", "funnel", "replay" or "naive"
    head: str = ""  # what the method saw after the layer
    backend: str = ""
    mode: str = ""
    structure: str = "weight"  # "weight": one weight each; "out"/"branch"/"in": whole output/input units (indices = units)
    precision: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def delta_loss_mean(self) -> torch.Tensor | None:
        """delta_loss per sample: the change of the dataset's mean cross-entropy."""
        return None if self.delta_loss is None else self.delta_loss / self.n_samples

    def __len__(self) -> int:
        return self.indices.numel()

    def __repr__(self) -> str:
        return (f"AblationResult({len(self)} weights of {self.layer!r} {tuple(self.layer_shape)}, "
                f"{self.n_samples} {self.extra.get('counted', 'samples')}, method={self.method!r}, backend={self.backend!r}, "
                f"base_loss={self.base_loss:.6g}, base_accuracy={self.base_accuracy:.4f})")

    def coords(self) -> dict:
        """The position of each weight in ``weight_shape``: ``{"out", "in", "kh", "kw"}`` (int64 numpy
        arrays) for a Conv2d weight, ``{"out", "in"}`` for a Linear weight, ``{"out"}`` for a bias; for a
        structured result ``{"out"}`` or ``{"in"}``: the unit."""
        if self.structure != "weight":  # whole units: the index is the unit
            return {"in" if self.structure == "in" else "out": self.indices.numpy().astype(np.int64)}
        shape = tuple(self.weight_shape) or tuple(self.layer_shape)
        if self.param.endswith("bias"):
            shape = shape[:1]
        names = ("out", "in", "kh", "kw")[:len(shape)] if len(shape) <= 4 else [f"d{k}" for k in range(len(shape))]
        idx = np.unravel_index(self.indices.numpy(), shape)
        return {name: np.asarray(i, dtype=np.int64) for name, i in zip(names, idx)}

    def to_dataframe(self):
        """One row per weight (needs pandas); a Conv2d's weights also get their ``out``, ``in``,
        ``kh``, ``kw`` position (``coords()``)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        cols = {name: getattr(self, name).numpy() for name in _TENSORS
                if getattr(self, name) is not None and name != "class_loss"}
        if self.delta_loss is not None:
            cols["delta_loss_mean"] = self.delta_loss_mean.numpy()
        coords = self.coords()
        if len(coords) > 2:
            at = list(cols).index("cols") + 1
            items = list(cols.items())
            cols = dict(items[:at] + list(coords.items()) + items[at:])
        return pd.DataFrame(cols)

    def save(self, path) -> None:
        """Write an .npz file; ``weightablate.load`` returns a bit-identical result."""
        arrays = {name: getattr(self, name).numpy() for name in _TENSORS if getattr(self, name) is not None}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TENSORS}
        with open(path, "wb") as fh:  # a file handle: numpy adds no ".npz" suffix of its own
            np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)


def load(path) -> AblationResult:
    """Read a result written by ``AblationResult.save``, checked: a file that is not one, or whose
    contents are inconsistent (lengths, NaN, n_samples <= 0, ...), raises ValueError naming the file
    and the problem. Never load files from untrusted sources (see the README: the checksums of
    checkpoints are integrity, not authenticity; an .npz is read without pickle)."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if "__meta__" not in names:
                raise ValueError("no __meta__ entry")
            meta = json.loads(str(z["__meta__"]))
            arrays = {name: z[name].copy() for name in _TENSORS if name in names}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        # np.load: "Cannot load file containing pickled data" / not a zip; json: bad metadata
        raise ValueError(f"{where!r} is not a weightablate result (a file written by AblationResult.save): "
                         f"{exc}") from None
    try:
        return _checked(meta, arrays)
    except ValueError as exc:
        raise ValueError(f"{where!r} is not a valid weightablate result: {exc}") from None


_INT = ("indices", "rows", "cols", "flips", "new_errors", "new_correct")
_FLOAT = ("weight", "delta_loss", "delta_kl", "class_loss")
_REQUIRED = ("indices", "rows", "cols", "weight", "exact_zero")


def _checked(meta, arrays) -> AblationResult:
    """An AblationResult from loaded metadata and arrays, or ValueError saying what is wrong."""
    if not isinstance(meta, dict):
        raise ValueError(f"__meta__ is a {type(meta).__name__}, not a dict")
    known = {f.name for f in fields(AblationResult)} - set(_TENSORS)
    required = {"n_samples", "base_loss", "base_accuracy", "layer_shape"}
    if required - set(meta) or set(meta) - known:
        raise ValueError(f"__meta__ lacks {sorted(required - set(meta))} / has unknown keys "
                         f"{sorted(set(meta) - known)}")
    n = meta["n_samples"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n_samples must be a positive int, got {n!r}")
    for key in ("base_loss", "base_accuracy", "seconds"):
        v = meta.get(key, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")
    if meta["base_accuracy"] > 1:
        raise ValueError(f"base_accuracy must lie in [0, 1], got {meta['base_accuracy']!r}")
    shapes = {"layer_shape": 2, "weight_shape": None}
    for key, length in shapes.items():
        v = meta.get(key, [])
        if not isinstance(v, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in v) \
                or (length is not None and len(v) != length):
            raise ValueError(f"{key} must be a list of positive ints, got {v!r}")
        meta[key] = tuple(v)
    if meta.get("structure", "weight") not in ("weight", "out", "branch", "in"):
        raise ValueError(f"structure must be 'weight', 'out', 'branch' or 'in', got {meta['structure']!r}")
    if meta.get("param", "weight") not in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
        raise ValueError(f"param must be 'weight', 'bias', 'in_proj_weight' or 'in_proj_bias', got {meta['param']!r}")
    missing = [name for name in _REQUIRED if name not in arrays]
    if missing:
        raise ValueError(f"missing arrays {missing}")
    k = arrays["indices"].shape[0] if arrays["indices"].ndim == 1 else -1
    for name, a in arrays.items():
        want = (k, a.shape[1] if a.ndim == 2 else -1) if name == "class_loss" else (k,)
        if a.shape != want or k < 0:
            raise ValueError(f"{name} has shape {a.shape}, expected {want} (one entry per weight: indices has "
                             f"shape {arrays['indices'].shape})")
        if name in _INT and a.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got {a.dtype}")
        if name in _FLOAT and a.dtype.kind != "f":
            raise ValueError(f"{name} must hold floats, got {a.dtype}")
        if name == "exact_zero" and a.dtype != np.bool_:
            raise ValueError(f"exact_zero must be bool, got {a.dtype}")
        if name in _FLOAT and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
        if name in ("flips", "new_errors", "new_correct") and (a < 0).any():
            raise ValueError(f"{name} contains negative counts")
    n_out, n_in = meta["layer_shape"]
    idx = arrays["indices"]
    if k and (idx.min() < 0 or idx.max() >= n_out * n_in):
        raise ValueError(f"indices must lie in [0, {n_out * n_in}) for layer_shape {meta['layer_shape']}")
    if np.unique(idx).size != k:
        raise ValueError("indices repeat a weight")
    if not (np.array_equal(arrays["rows"], idx // n_in) and np.array_equal(arrays["cols"], idx % n_in)):
        raise ValueError("rows/cols do not match indices and layer_shape")
    tensors = {name: (torch.from_numpy(arrays[name]) if name in arrays else None) for name in _TENSORS}
    return AblationResult(**tensors, **meta)

"""Pre-activation statistics of one Linear or Conv2d layer: how much of the data each unit's
activation lets through.

``activation_stats(model, layer, data)`` runs the model once over ``data`` and, per output unit
(a Linear's neuron, a Conv2d's channel), takes the value ``z`` that the layer's activation sees,
over every sample (and, for a Conv2d, every position). Where that is comes from the model's
torch.fx graph: from the layer, through per-channel maps (BatchNorm in eval, dropout, identity)
and a residual add, to the first element-wise activation (ReLU, GELU, SiLU, ...; modules or
functions): ``z`` is that activation's input, e.g. for ResNet's ``layer4.1.conv2`` the input of
``relu`` after ``bn2`` and the residual add. When no activation follows (the logits layer; a layer
followed by pooling or another layer first), or the model cannot be traced, ``z`` is the layer's
own output. ``ActivationStats.at`` says which, in words, and ``activation`` names the activation
("" when none):

* ``pass_fraction``: the fraction of values with ``z > 0`` (what a ReLU lets through),
* ``mean``, ``std`` (population), ``min``, ``max``, and ``median``,
* ``median_over_std``: ``median / std`` (nan for a constant unit).

Counts, sums, extremes and the pass fraction are exact over all values (float64 sums). The median
needs the values themselves: they are kept while ``rows * units <= max_values`` (default 2**26,
256 MiB in float32), which covers e.g. 16k samples of a 4096-unit layer; beyond that every
``2**k``-th row is kept (a systematic subsample of the rows, deterministic), and
``median_rows < n_values`` says so.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .api import _check_model, _resolve_layer
from .data import batches

MAX_VALUES = 1 << 26
N_SHOW = 64  # neurons drawn in the figure
SHOW_ROWS = 2000  # values per drawn neuron


@dataclass
class ActivationStats:
    """Per-unit statistics of one layer's pre-activations (see the module docstring)."""

    layer: str
    kind: str  # "Linear" or "Conv2d"
    n_units: int
    n_samples: int
    n_values: int  # values per unit: samples (x positions for a Conv2d)
    pass_fraction: np.ndarray  # (U,) float64
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    median: np.ndarray
    median_rows: int  # values per unit the median was taken over (== n_values: exact)
    show_units: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # drawn units
    show_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # (R, len(show))
    at: str = ""  # where z was measured, in words
    activation: str = ""  # the activation whose input z is ("" when none follows)

    @property
    def median_over_std(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.std > 0, self.median / np.where(self.std > 0, self.std, 1.0), np.nan)

    def summary(self) -> dict:
        """Layer-wide numbers (plain Python, nan where undefined)."""
        from .summary import _distribution

        pf, ms = self.pass_fraction, self.median_over_std
        finite = ms[np.isfinite(ms)]
        return {
            "layer": self.layer, "kind": self.kind, "at": self.at, "activation": self.activation,
            "n_units": int(self.n_units), "n_samples": int(self.n_samples),
            "n_values_per_unit": int(self.n_values), "median_rows": int(self.median_rows),
            "median_exact": bool(self.median_rows == self.n_values),
            "pass_fraction": _distribution(pf),
            "n_dead": int((pf == 0).sum()), "n_always_on": int((pf == 1).sum()),
            "frac_units_pass_le_25pct": float((pf <= 0.25).mean()) if pf.size else math.nan,
            "frac_units_pass_le_50pct": float((pf <= 0.5).mean()) if pf.size else math.nan,
            "median_over_std": _distribution(finite),
            "n_constant_units": int((~np.isfinite(ms)).sum()),
        }

    def to_dict(self) -> dict:
        """The summary plus every per-unit array, as JSON-ready lists."""
        d = self.summary()
        d["units"] = {k: getattr(self, k).tolist() for k in ("pass_fraction", "mean", "std", "median")}
        d["units"]["median_over_std"] = self.median_over_std.tolist()
        return d

    def save(self, path) -> None:
        arrays = {k: getattr(self, k) for k in ("pass_fraction", "mean", "std", "min", "max", "median",
                                                   "show_units", "show_values")}
        meta = {k: getattr(self, k) for k in ("layer", "kind", "n_units", "n_samples", "n_values", "median_rows",
                                              "at", "activation")}
        with open(path, "wb") as fh:
            np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path) -> "ActivationStats":
        """Read a file ``save`` wrote; a ValueError names the file and what is wrong with it."""
        arrays_ = ("pass_fraction", "mean", "std", "min", "max", "median", "show_units", "show_values")
        metas = ("layer", "kind", "n_units", "n_samples", "n_values", "median_rows", "at", "activation")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                arrays = {k: z[k].copy() for k in arrays_}
        except (OSError, ValueError, KeyError, EOFError) as exc:  # not an npz, pickled, a key missing, bad json
            raise ValueError(f"{str(path)!r} is not an activations file written by weightablate: {exc}") from None
        if not isinstance(meta, dict) or sorted(meta) != sorted(metas):
            raise ValueError(f"{str(path)!r}: its metadata lacks or adds fields (expected {', '.join(metas)})")
        n = meta["n_units"]
        bad = [k for k in arrays_[:6] if arrays[k].shape != (n,)]
        if bad or arrays["show_values"].ndim != 2 or arrays["show_values"].shape[1] != arrays["show_units"].size:
            raise ValueError(f"{str(path)!r}: arrays {', '.join(bad) or 'show_values'} do not match its "
                             f"{n} units")
        return cls(**meta, **arrays)


def activation_stats(model: nn.Module, layer, data, *, batch_size: int | None = None,
                     max_values: int = MAX_VALUES, n_show: int = N_SHOW) -> ActivationStats:
    """Per-unit pre-activation statistics of ``layer`` (an ``nn.Linear`` or ``nn.Conv2d``, by dotted
    name or module) over ``data`` (a DataLoader, an iterable of batches or ``(X, y)``): one forward
    pass, the model in eval mode, its modes restored. ``n_show`` units, spread over the range of
    pass fractions, keep up to 2000 values each for the figure."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, target = _resolve_layer(model, layer)
    if not isinstance(target, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"layer {name!r} is a {type(target).__name__}; activation statistics need an nn.Linear "
                        "or nn.Conv2d")
    if not isinstance(max_values, int) or max_values < 1:
        raise ValueError(f"max_values must be a positive int, got {max_values!r}")
    device = _check_model(model, None)
    acc = _Streaming(max_values)
    seen = {}

    def hook(module, args, output):
        if "z" in seen:
            raise ValueError(f"layer {name!r} runs more than once per forward pass")
        seen["z"] = output.detach()

    training = {m: m.training for m in model.modules()}
    model.eval()
    gm, node, at, act = _activation_input(model, name)
    handle = target.register_forward_hook(hook) if node is None else None
    n_samples = 0
    try:
        for x, _ in batches(data, batch_size, device, target.weight.dtype):
            seen.clear()
            with torch.no_grad():
                if node is None:
                    model(x)
                else:
                    _Grab(gm, node, seen).run(x)
            if "z" not in seen:
                raise ValueError(f"layer {name!r} did not run in the model's forward pass")
            z = seen.pop("z")
            if isinstance(target, nn.Conv2d):
                z = z.unsqueeze(0) if z.dim() == 3 else z
                z = z.movedim(1, -1).reshape(-1, z.shape[1])  # (samples x positions, channels)
            else:
                z = z.reshape(-1, z.shape[-1])
            n_samples += x.shape[0]
            acc.add(z)
    finally:
        if handle is not None:
            handle.remove()
        for m, was_training in training.items():
            m.training = was_training
    st = acc.finish(name, type(target).__name__, n_samples, n_show)
    st.at, st.activation = at, act
    return st


# Element-wise activations whose input is the "pre-activation"; modules, functions and methods.
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Tanh,
                nn.Sigmoid, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Threshold)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.selu, F.celu, torch.tanh,
                  torch.sigmoid, F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.relu_,
                  torch.relu_}
_ACT_METHODS = {"relu", "relu_", "tanh", "sigmoid"}
# Per-channel maps between a layer and its activation: the activation still sees one value per unit.
_PASS_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_ADDS = {operator.add, operator.iadd, torch.add}


def _activation_input(model: nn.Module, name: str):
    """(graph module, the node whose value the activation after ``name`` sees or None, where in words,
    the activation's name or "")."""
    own = f"the output of {name}"
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: measure the layer's own output
        return None, None, own + " (the model cannot be traced, so the activation after it is unknown)", ""
    hits = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    if len(hits) != 1:
        return None, None, own, ""
    node, path = hits[0], [name]
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        is_act = isinstance(module, _ACT_MODULES) or (user.op == "call_function" and user.target in _ACT_FUNCTIONS) \
            or (user.op == "call_method" and user.target in _ACT_METHODS)
        if is_act and user.args and user.args[0] is node:
            act = type(module).__name__ if module is not None else str(getattr(user.target, "__name__", user.target))
            where = user.target if user.op == "call_module" else act
            chain = " -> ".join(path + [str(where)])
            return gm, node, f"the input of {where} ({act}): {chain}", act
        if isinstance(module, _PASS_MODULES):
            path.append(str(user.target))
        elif user.op == "call_function" and user.target in _ADDS:
            path.append("+ residual")
        else:
            break
        node = user
    follow = "the logits" if node.op != "output" and all(u.op == "output" for u in node.users) else \
        "no element-wise activation follows"
    return None, None, own + (f" ({follow})" if len(path) == 1 else f" after {' -> '.join(path[1:])} ({follow})"), ""


class _Grab(fx.Interpreter):
    """Run the traced model and keep one node's value (cloned: an in-place activation overwrites it)."""

    def __init__(self, gm, node, seen):
        super().__init__(gm)
        self.node, self.seen = node, seen

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.node:
            self.seen["z"] = out.detach().clone()
        return out


class _Streaming:
    def __init__(self, max_values: int):
        self.max_values = max_values
        self.n = 0
        self.stride = 1
        self.kept, self.kept_idx = [], []
        self.shift = self.s1 = self.s2 = self.pos = self.lo = self.hi = None

    def add(self, z: torch.Tensor):
        zd = z.double()
        if self.shift is None:
            self.shift = zd.mean(0)  # sums of (z - shift): the variance without cancellation
            u = z.shape[1]
            self.s1 = torch.zeros(u, dtype=torch.float64, device=z.device)
            self.s2 = torch.zeros_like(self.s1)
            self.pos = torch.zeros(u, dtype=torch.int64, device=z.device)
            self.lo, self.hi = zd.min(0).values, zd.max(0).values
        c = zd - self.shift
        self.s1 += c.sum(0)
        self.s2 += (c * c).sum(0)
        self.pos += (z > 0).sum(0)
        self.lo = torch.minimum(self.lo, zd.min(0).values)
        self.hi = torch.maximum(self.hi, zd.max(0).values)
        idx = torch.arange(self.n, self.n + z.shape[0])
        keep = idx % self.stride == 0
        self.kept.append(z[keep.to(z.device)].cpu())
        self.kept_idx.append(idx[keep])
        self.n += z.shape[0]
        units = z.shape[1]
        while sum(k.shape[0] for k in self.kept) * units > self.max_values and self.stride < self.n:
            self.stride *= 2
            keep = [i % self.stride == 0 for i in self.kept_idx]
            self.kept = [k[m] for k, m in zip(self.kept, keep)]
            self.kept_idx = [i[m] for i, m in zip(self.kept_idx, keep)]

    def finish(self, name, kind, n_samples, n_show) -> ActivationStats:
        n = self.n
        mean_c = self.s1 / n
        var = (self.s2 / n - mean_c * mean_c).clamp_min(0)
        values = torch.cat(self.kept).numpy()
        median = np.empty(values.shape[1])
        for s in range(0, values.shape[1], 256):  # float64 column blocks: exact midpoint of even counts
            median[s:s + 256] = np.median(values[:, s:s + 256].astype(np.float64), axis=0)
        pf = (self.pos.double() / n).cpu().numpy()
        u = pf.size
        k = min(n_show, u)
        order = np.argsort(pf, kind="stable")
        show = order[np.unique(np.linspace(0, u - 1, k).round().astype(np.int64))] if k else order[:0]
        rows = np.unique(np.linspace(0, values.shape[0] - 1, min(SHOW_ROWS, values.shape[0])).round().astype(int))
        return ActivationStats(
            layer=name, kind=kind, n_units=u, n_samples=n_samples, n_values=n,
            pass_fraction=pf, mean=(self.shift + mean_c).cpu().numpy(), std=var.sqrt().cpu().numpy(),
            min=self.lo.cpu().numpy(), max=self.hi.cpu().numpy(), median=median, median_rows=int(values.shape[0]),
            show_units=show.astype(np.int64), show_values=np.ascontiguousarray(values[rows][:, show]))

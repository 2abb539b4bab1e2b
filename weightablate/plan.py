"""Inspect what runs after the target layer and reduce it to a closed-form head (docs/DESIGN.md).

Three kinds, all exact:
  logits       the target's output is the logits: v = e_i
  piecewise    element-wise affine maps and at most one leaky-ReLU-family activation, then a
               final Linear: d by the exact two-piece form (compiled kernel), v = V[:, i] * post_gain_i
  elementwise  any other chain of element-wise modules: d = s(u') - s(u) evaluated in float64
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dataflow import describe
from .graph import capture_values, trace

# Modules that are the identity in eval mode.
IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
# Element-wise activations without a per-unit parameter, evaluated in float64 on the generic path.
ELEMENTWISE = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.LogSigmoid, nn.Softsign,
               nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold)
RELU_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu_}
ELEMENTWISE_FUNCS = {F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.relu6, F.elu, F.leaky_relu, F.mish, F.softplus,
                     torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.hardtanh, torch.clamp, torch.clip, torch.exp,
                     torch.abs, torch.square, F.selu, F.celu, F.logsigmoid, F.softsign, F.tanhshrink}
ELEMENTWISE_METHOD_NAMES = {"sigmoid", "tanh", "clamp", "clip", "abs", "exp", "square"}
IDENTITY_METHODS = {"contiguous", "clone", "detach"}


def logit_directions(final: nn.Linear) -> torch.Tensor:
    """(I, C) float64: column i of the final Linear's weight, the logit direction of its input i."""
    return final.weight.detach().t().contiguous().double()  # transpose first: 3x faster than after


@dataclass
class Head:
    kind: str  # "logits" | "piecewise" | "elementwise"
    description: str
    n_units: int
    final: nn.Linear | None = None
    final_name: str | None = None
    # piecewise: d = leaky(u') - leaky(u), u = gain z + shift; v = V[:, i] * post_gain[i]
    gain: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    post_gain: torch.Tensor | None = None
    # elementwise: ("affine", gain, shift) | ("leaky", slope) | ("module", float64 copy)
    steps: list = field(default_factory=list)

    def rows(self) -> torch.Tensor | None:
        """(I, C) float64: the logit direction of each unit; None for the logits layer."""
        if self.final is None:
            return None
        v = logit_directions(self.final)
        return v * self.post_gain[:, None] if self.post_gain is not None else v

    def deltas(self, backend, ops, a_t, z_t, rows, cols, w) -> torch.Tensor:
        """(K, N) float64 change of each ablated weight's unit at the head's input."""
        if self.kind != "elementwise":
            return ops.pair_deltas(backend, a_t, z_t, rows, cols, w, self.gain, self.shift, self.slope)
        u = z_t[rows].double()
        up = u - w.double()[:, None] * a_t[cols].double()
        for step in self.steps:
            if step[0] == "affine":
                g, s = step[1][rows][:, None], step[2][rows][:, None]
                u, up = g * u + s, g * up + s
            elif step[0] == "leaky":
                sl = step[1][rows][:, None]
                u, up = torch.where(u > 0, u, sl * u), torch.where(up > 0, up, sl * up)
            else:
                u, up = step[1](u), step[1](up)
        return up - u


def _affine(module: nn.Module, n: int, name: str, device):
    """BatchNorm1d in eval as y = gain * x + shift (float64)."""
    if not module.track_running_stats or module.running_mean is None:
        raise ValueError(f"module {name!r} ({type(module).__name__}) uses batch statistics in eval mode: "
                         "it is not element-wise, so no closed form applies")
    inv = torch.rsqrt(module.running_var.double() + module.eps)
    gain = module.weight.detach().double() * inv if module.affine else inv
    shift = (module.bias.detach().double() if module.affine else 0.0) - module.running_mean.double() * gain
    return gain.to(device), shift.to(device)


def _module_step(m: nn.Module, name: str, n: int, device):
    """The closed-form step of an element-wise module, None for the identity, "break" otherwise."""
    if isinstance(m, IDENTITY):
        return None
    if isinstance(m, nn.ReLU):
        return ("leaky", torch.zeros(n, dtype=torch.float64, device=device))
    if isinstance(m, nn.LeakyReLU):
        return ("leaky", torch.full((n,), float(m.negative_slope), dtype=torch.float64, device=device))
    if isinstance(m, nn.PReLU):
        return ("leaky", m.weight.detach().double().expand(n).contiguous().to(device))
    if isinstance(m, nn.BatchNorm1d):
        return ("affine", *_affine(m, n, name, device))
    if isinstance(m, ELEMENTWISE):
        m64 = copy.deepcopy(m).double()
        if hasattr(m64, "inplace"):
            m64.inplace = False
        return ("module", m64)
    return "break"


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _node_step(n: fx.Node, mods: dict, units: int, device):
    """The closed-form step of one graph node after the target (its only changed input is args[0]),
    None for the identity, "break" when it is not a known element-wise map."""
    rest, kw = n.args[1:], {k: v for k, v in n.kwargs.items() if k != "inplace"}
    ones = torch.ones(units, dtype=torch.float64, device=device)
    if n.op == "call_module":
        if rest or kw:
            return "break"
        return _module_step(mods[n.target], n.target, units, device)
    f = n.target
    scale = {operator.mul: 1, operator.imul: 1, torch.mul: 1, "mul": 1, "mul_": 1,
             operator.truediv: -1, operator.itruediv: -1, torch.div: -1, "div": -1, "div_": -1}
    shift = {operator.add: 1, operator.iadd: 1, torch.add: 1, "add": 1, "add_": 1,
             operator.sub: -1, operator.isub: -1, torch.sub: -1, "sub": -1, "sub_": -1}
    if f in scale and len(rest) == 1 and _number(rest[0]) and not kw and rest[0] != 0:
        c = float(rest[0]) if scale[f] == 1 else 1.0 / float(rest[0])
        return ("affine", ones * c, ones * 0)
    if f in shift and len(rest) == 1 and _number(rest[0]) and not kw:
        return ("affine", ones.clone(), ones * (float(rest[0]) * shift[f]))
    if f in RELU_FUNCS or f in ("relu", "relu_"):
        return ("leaky", ones * 0) if not rest else "break"
    if f in (F.leaky_relu, F.leaky_relu_):
        slope = rest[0] if rest else kw.get("negative_slope", 0.01)
        return ("leaky", ones * float(slope)) if _number(slope) and len(rest) <= 2 else "break"
    if f in IDENTITY_METHODS and not rest and not kw:
        return None
    consts = all(not isinstance(a, fx.Node) for a in list(rest) + list(kw.values()))
    rest = [a for a in rest if not isinstance(a, bool)]  # a positional inplace flag
    if consts and n.op == "call_function" and f in ELEMENTWISE_FUNCS:
        return ("module", lambda u: f(u, *rest, **kw))
    if consts and n.op == "call_method" and f.rstrip("_") in ELEMENTWISE_METHOD_NAMES:
        name = f.rstrip("_")
        return ("module", lambda u: getattr(u, name)(*rest, **kw))
    return "break"


def plan_head(graph, values: dict, name: str, device) -> Head:
    """Walk the traced graph from the target to the logits and reduce it to a closed-form head, or
    raise ValueError naming the node that breaks the pattern: the target's output must reach the
    logits through a chain of element-wise maps (each reading only the previous one) ending in a
    final torch.nn.Linear that returns the logits."""
    mods = dict(graph.module.named_modules())
    x = values[graph.target.args[0]]
    if x.dim() != 2:
        raise ValueError(f"layer {name!r}: input of shape (N, {', '.join(map(str, x.shape[1:]))}); the closed form "
                         "needs (N, features)")
    units = values[graph.target].shape[1]
    current, steps, names, final = graph.target, [], [], None
    for n in graph.dependent[1:]:
        if final is not None:
            raise ValueError(f"{describe(n)} runs after the final Linear {final.target!r}; the closed form needs "
                             "the final Linear to produce the logits")
        if n.args[:1] != (current,) or [a for a in n.all_input_nodes if a in graph.needed and a in set(
                graph.dependent)] != [current]:
            raise ValueError(f"{describe(n)} is not an element-wise map of the previous value alone (a branch, "
                             "or a second use of a value after the target): no closed form")
        m = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Linear):
            if n.args[1:] or n.kwargs:
                raise ValueError(f"{describe(n)}: the final Linear takes extra arguments")
            final = n
        else:
            step = _node_step(n, mods, units, device)
            if step == "break":
                raise ValueError(f"{describe(n)} after layer {name!r} is not a known element-wise map: no closed "
                                 "form (the funnel or replay follow it)")
            if step is not None:
                steps.append(step)
                names.append(type(m).__name__ if m is not None else str(getattr(n.target, "__name__", n.target)))
        current = n
    if current is not graph.logits:
        raise ValueError(f"the model returns {graph.logits.name!r}, not the output of the chain after {name!r}")
    chain = " -> ".join(names) if names else "(nothing)"
    ones = torch.ones(units, dtype=torch.float64, device=device)
    if final is None:
        if steps:
            raise ValueError(f"layer {name!r} produces the logits only through {chain}: element-wise maps on the "
                             "logits have no closed form (the funnel or replay follow them)")
        return Head("logits", f"{name} produces the logits", units, gain=ones.clone(), shift=ones * 0,
                    slope=ones.clone())
    final_module = mods[final.target]
    if final_module.in_features != units:
        raise ValueError(f"final Linear {final.target!r} takes {final_module.in_features} features, layer {name!r} "
                         f"gives {units}")
    desc = f"{name} -> {chain} -> {final.target}"
    kinds = [s[0] for s in steps]
    if "module" in kinds or kinds.count("leaky") > 1:
        return Head("elementwise", desc, units, final_module, final.target, steps=steps)
    # piecewise: compose the affine maps before and after the single activation
    gain, shift, slope, post = ones.clone(), ones * 0, ones.clone(), ones.clone()
    seen_act = False
    for s in steps:
        if s[0] == "leaky":
            slope, seen_act = s[1], True
        elif not seen_act:
            gain, shift = s[1] * gain, s[1] * shift + s[2]
        else:
            post = s[1] * post  # the shift after the activation does not move d
    return Head("piecewise", desc, units, final_module, final.target, gain=gain, shift=shift, slope=slope,
                post_gain=post)


def closed_form_head(model: nn.Module, name: str, target: nn.Module, x: torch.Tensor, param: str = "weight") -> Head:
    """Trace ``model``, check its dataflow and plan the closed-form head on the inputs ``x``."""
    graph = trace(model, name, target, param, x)
    return plan_head(graph, capture_values(graph, x), name, target.weight.device)

"""Inspect what runs after the target layer and reduce it to a closed-form head (docs/DESIGN.md).

Three kinds, all exact:
  logits       the target's output is the logits: v = e_i
  piecewise    element-wise affine maps and at most one leaky-ReLU-family activation, then a
               final Linear: d by the exact two-piece form (compiled kernel), v = V[:, i] * post_gain_i
  elementwise  any other chain of element-wise modules: d = s(u') - s(u) evaluated in float64
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import Call

# Modules that are the identity in eval mode.
IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
# Element-wise activations without a per-unit parameter, evaluated in float64 on the generic path.
ELEMENTWISE = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.LogSigmoid, nn.Softsign,
               nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold)


def _same(a, b) -> bool:
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


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


def _step(call: Call, n: int, device):
    m, name = call.module, call.name
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
        import copy

        return ("module", copy.deepcopy(m).double())
    return "break"


def plan_head(calls: list[Call], target_name: str, n_units: int, n_classes: int, device) -> Head:
    """Walk the leaf-module calls after the target and classify the head, or raise naming the
    module that breaks the closed-form pattern."""
    idx = next(k for k, c in enumerate(calls) if c.name == target_name)
    current = calls[idx].output
    steps, names = [], []
    final, final_name = None, None
    for call in calls[idx + 1 :]:
        if call.name == "<model output>":
            if not _same(call.input, current):
                last = final_name or (names[-1] if names else target_name)
                raise ValueError(f"the model's output is not the output of {last!r}: forward changes it after "
                                 "the last module (a functional op?), so no closed form applies")
            break
        if final is not None:
            raise ValueError(f"module {call.name!r} ({type(call.module).__name__}) runs after the final Linear "
                             f"{final_name!r}; the closed form needs the final Linear to produce the logits")
        if not _same(call.input, current):
            raise ValueError(f"module {call.name!r} ({type(call.module).__name__}) runs after layer {target_name!r} "
                             "but does not take the previous module's output (a branch or a functional op in "
                             "forward): no closed-form head (the funnel or replay method handles it)")
        if isinstance(call.module, nn.Linear):
            final, final_name = call.module, call.name
        else:
            step = _step(call, n_units, device)
            if step == "break":
                raise ValueError(f"module {call.name!r} ({type(call.module).__name__}) after layer {target_name!r} "
                                 "is not element-wise: no closed-form head (the funnel or replay method handles it)")
            if step is not None:
                steps.append(step)
                names.append(f"{type(call.module).__name__}")
        current = call.output
    chain = " -> ".join(names) if names else "(nothing)"
    ones = torch.ones(n_units, dtype=torch.float64, device=device)
    if final is None:
        if steps:
            raise ValueError(f"layer {target_name!r} produces the logits only through {chain}: "
                             "element-wise maps on the logits are not supported")
        return Head("logits", f"{target_name} produces the logits", n_units,
                    gain=ones.clone(), shift=ones * 0, slope=ones.clone())
    if final.in_features != n_units:
        raise ValueError(f"final Linear {final_name!r} takes {final.in_features} features, layer {target_name!r} "
                         f"gives {n_units}")
    desc = f"{target_name} -> {chain} -> {final_name}"
    kinds = [s[0] for s in steps]
    if "module" in kinds or kinds.count("leaky") > 1:
        return Head("elementwise", desc, n_units, final, final_name, steps=steps)
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
    return Head("piecewise", desc, n_units, final, final_name, gain=gain, shift=shift, slope=slope, post_gain=post)

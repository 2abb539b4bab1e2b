"""Pick the fastest exact method that fits the model: closed form -> channel funnel -> replay.

Each method is exact; they differ in how much of the model they re-run per ablation. The method
says in its description why a faster one did not apply."""
from __future__ import annotations

import torch
from torch import nn

from .capture import capture
from .closed_form import ClosedForm
from .funnel import Funnel, funnel_plan
from .graph import capture_values, trace
from .plan import plan_head
from .replay import Replay

PLAN_SAMPLES = 2  # samples of the first batch used to look at the model


def choose_method(model: nn.Module, name: str, target: nn.Module, param: str, flat: torch.Tensor,
                  first_x: torch.Tensor, backend: str, mode: str, want_flips: bool, by_class: bool):
    """The method object for sweep(); ``first_x`` is the first batch's inputs (a few samples are run)."""
    x = first_x[:PLAN_SAMPLES]
    reasons = []
    if isinstance(target, nn.Linear):
        try:
            cap = capture(model, target, name, x, trace=True)
            plan_head(cap.calls, name, target.out_features, cap.logits.shape[1], target.weight.device)
            return ClosedForm(model, name, target, flat, backend, mode, want_flips, by_class, param)
        except ValueError as exc:
            if "more than once" in str(exc) or "did not run" in str(exc):
                raise
            reasons.append(f"closed form: {exc}")
    else:
        reasons.append(f"closed form: needs an nn.Linear target, not {type(target).__name__}")
    graph = trace(model, name)
    values = capture_values(graph, x)
    a = values[graph.target.args[0]] if graph.target.args else None
    if isinstance(target, nn.Linear) and (not isinstance(a, torch.Tensor) or a.dim() != 2):
        shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"layer {name!r}: input of shape {shape}; only (N, features) inputs to a Linear target "
                         "are supported")
    final, why = funnel_plan(graph, values)
    if final is not None:
        return Funnel(graph, final, target, param, flat, backend, mode, want_flips, by_class, _why(reasons))
    reasons.append(f"funnel: {why}")
    return Replay(graph, target, param, flat, want_flips, by_class, _why(reasons))


def _why(reasons) -> str:
    return f" (not {'; not '.join(reasons)})" if reasons else ""

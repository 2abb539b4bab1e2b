"""Pick the fastest exact method that the model's traced dataflow proves: closed form -> channel
funnel -> replay.

Each method is exact; they differ in how much of the model they re-run per ablation. All three
are chosen from one torch.fx graph of the model, checked first (weightablate.dataflow: the
target's parameters used nowhere else, in-place ops followed); the method says in its
description why a faster one did not apply."""
from __future__ import annotations

import torch
from torch import nn

from .closed_form import ClosedForm
from .funnel import Funnel, funnel_plan
from .graph import capture_values, trace
from .plan import plan_head
from .replay import Replay
from .token_head import TokenClosedForm, plan_token_head

PLAN_SAMPLES = 2  # samples of the first batch used to look at the model


METHODS = ("auto", "closed_form", "funnel", "replay")


def choose_method(model: nn.Module, name: str, target: nn.Module, param: str, flat: torch.Tensor,
                  first_x: torch.Tensor, backend: str, mode: str, want_flips: bool, by_class: bool,
                  method: str = "auto", graph=None):
    """The method object for sweep(); ``first_x`` is the first batch's inputs (a few samples are run).
    ``method`` other than "auto" forces one method, and raises ValueError saying why when it does not apply.
    ``graph``: the model traced and checked before (by an earlier call on the same model), else traced here."""
    x = first_x[:PLAN_SAMPLES]
    graph = trace(model, name, target, param, x) if graph is None else graph
    values = capture_values(graph, x)
    reasons = []
    a = values[graph.target.args[0]] if graph.target.args else None
    logits = values[graph.logits]
    why = None
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        why = f"the logits {tuple(logits.shape)} are per token"
    elif isinstance(target, nn.Linear) and isinstance(a, torch.Tensor) and a.dim() > 2:
        why = f"the layer's input {tuple(a.shape)} has tokens"
    if why is not None:  # tokens: the LayerNorm closed form where it applies, else replay
        if method == "funnel":
            raise ValueError(f"method='funnel' does not apply to layer {name!r}: {why} (replay applies)")
        if method in ("auto", "closed_form"):
            try:
                head = plan_token_head(graph, values, name)
            except ValueError as exc:
                if method == "closed_form":
                    raise ValueError(f"method='closed_form' does not apply to layer {name!r}: {why} and {exc} "
                                     "(replay applies)") from None
                reasons.append(f"the LayerNorm closed form: {exc}")
            else:
                scorer = TokenClosedForm(graph, target, head, param, flat, want_flips, by_class, f" ({why})", mode,
                                         backend)
                scorer.graph = graph
                return scorer
        return Replay(graph, target, param, flat, want_flips, by_class,
                      f" ({why}: not the closed forms for (N, C) rows, not the funnel" +
                      "".join(f"; not {r}" for r in reasons) + ")")
    if method in ("auto", "closed_form"):
        if isinstance(target, nn.Linear):
            try:
                head = plan_head(graph, values, name, target.weight.device)
                scorer = ClosedForm(model, name, target, head, flat, backend, mode, want_flips, by_class, param)
                scorer.graph = graph
                return scorer
            except ValueError as exc:
                if method == "closed_form":
                    raise ValueError(f"method='closed_form' does not apply to layer {name!r}: {exc}") from None
                reasons.append(f"closed form: {exc}")
        elif method == "closed_form":
            raise ValueError(f"layer {name!r} is a {type(target).__name__}: method='closed_form' needs an nn.Linear "
                             "target (only torch.nn.Linear layers have a closed form)")
        else:
            reasons.append(f"closed form: needs an nn.Linear target, not {type(target).__name__}")
    if isinstance(target, nn.Linear) and (not isinstance(a, torch.Tensor) or a.dim() != 2):
        shape = f"(N, {', '.join(map(str, a.shape[1:]))})" if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"layer {name!r}: input of shape {shape}; only (N, features) inputs to a Linear target "
                         "are supported")
    final, why = funnel_plan(graph, values) if method in ("auto", "funnel") else (None, "method='replay'")
    if method == "funnel" and final is None:
        raise ValueError(f"method='funnel' does not apply to layer {name!r}: {why}")
    if final is not None:
        return Funnel(graph, final, target, param, flat, backend, mode, want_flips, by_class, _why(reasons))
    reasons.append(f"funnel: {why}")
    return Replay(graph, target, param, flat, want_flips, by_class, _why(reasons))


def _why(reasons) -> str:
    return f" (not {'; not '.join(reasons)})" if reasons else ""

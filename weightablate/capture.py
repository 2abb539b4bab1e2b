"""Run the model on one batch and keep what the closed form needs: the target layer's input and
output, and the logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Captured:
    a: torch.Tensor  # (N, J) target input
    z: torch.Tensor  # (N, I) target output, bias included
    logits: torch.Tensor  # (N, C)


def check_logits(out, tokens: bool = False) -> torch.Tensor:
    """The model's output must be one logits tensor (N, C), or (N, T, V) per token where ``tokens``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: forward must return a logits tensor (N, C), got {type(out).__name__}")
    if out.dim() != 2 and not (tokens and out.dim() == 3):
        expected = "(N, C) or per token (N, T, V)" if tokens else "(N, C)"
        raise ValueError(f"model: expected logits of shape {expected}, got {tuple(out.shape)}")
    return out


def capture(model: nn.Module, target: nn.Module, target_name: str, inputs: torch.Tensor) -> Captured:
    """One forward pass under no_grad with a hook on the target; the model's output must be the
    logits tensor. (Whether the target runs once and how its output reaches the logits was
    proven on the traced graph before: weightablate.graph.)"""
    seen: dict[str, torch.Tensor] = {}

    def on_target(module, args, kwargs, output):
        if "a" in seen:
            raise ValueError(f"layer {target_name!r} runs more than once per forward pass: zeroing one weight "
                             "then changes every call, which no exact method here follows")
        a = args[0] if args else kwargs.get("input")
        # clone: an in-place op after the target would otherwise overwrite z
        seen["a"], seen["z"] = a.detach().clone(), output.detach().clone()

    handle = target.register_forward_hook(on_target, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(inputs)
    finally:
        handle.remove()
    check_logits(out)
    if "a" not in seen:
        raise ValueError(f"layer {target_name!r} did not run in the model's forward pass")
    return Captured(a=seen["a"], z=seen["z"], logits=out.detach())

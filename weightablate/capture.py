"""Run the model on one batch and keep what the ablation needs: the target layer's input and
output, the logits, and (on the first batch) the order in which modules consumed tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Call:
    name: str
    module: nn.Module
    input: object  # first positional input (a tensor, normally)
    output: object


@dataclass
class Captured:
    a: torch.Tensor  # (N, J) target input
    z: torch.Tensor  # (N, I) target output, bias included
    logits: torch.Tensor  # (N, C)
    calls: list[Call] = field(default_factory=list)  # leaf-module calls, in order (traced batches only)


def check_logits(out) -> torch.Tensor:
    """The model's output must be one logits tensor (N, C)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: forward must return a logits tensor (N, C), got {type(out).__name__}")
    if out.dim() != 2:
        raise ValueError(f"model: expected logits of shape (N, C), got {tuple(out.shape)}")
    return out


def _leaves(model: nn.Module):
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            yield name, module


def capture(model: nn.Module, target: nn.Module, target_name: str, inputs: torch.Tensor, trace: bool) -> Captured:
    """One forward pass under no_grad with hooks; the model's output must be the logits tensor."""
    seen: dict[str, torch.Tensor] = {}
    calls: list[Call] = []

    def on_target(module, args, output):
        if "a" in seen:
            raise ValueError(f"layer {target_name!r} runs more than once per forward pass (shared weights): "
                             "zeroing one weight is then not a rank-one change")
        # clone: an in-place activation after the target would otherwise overwrite z
        seen["a"], seen["z"] = args[0].detach().clone(), output.detach().clone()

    handles = [target.register_forward_hook(on_target)]
    if trace:
        for name, module in _leaves(model):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: calls.append(Call(name, m, args[0] if args else None, out))))
    try:
        with torch.no_grad():
            out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    check_logits(out)
    if "a" not in seen:
        raise ValueError(f"layer {target_name!r} did not run in the model's forward pass")
    a, z = seen["a"], seen["z"]
    if a.dim() != 2:
        raise ValueError(f"layer {target_name!r}: input of shape {tuple(a.shape)}; only (N, features) inputs "
                         "to a Linear target are supported")
    if trace:
        calls.append(Call("<model output>", model, out, None))
    return Captured(a=a, z=z, logits=out.detach(), calls=calls)

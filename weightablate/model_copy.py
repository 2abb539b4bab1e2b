"""Copies of the user's model in another dtype (the user's model is never converted)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def copy_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``model`` in ``dtype``. Tensors held as plain attributes with a gradient
    history (torch.nn.utils.prune's ``weight`` after a grad-enabled forward, which its pre-hook
    recomputes on every forward) cannot be deep-copied: the copy gets them detached."""
    saved = []
    for m in model.modules():
        for key, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                saved.append((m, key, value))
                m.__dict__[key] = value.detach()
    try:
        clone = copy.deepcopy(model)
    finally:
        for m, key, value in saved:
            m.__dict__[key] = value
    return clone.to(dtype)

"""The ``weights`` argument -> flat indices into ``layer.weight``."""
from __future__ import annotations

import torch


def select_weights(weights, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """(K,) int64 flat indices, distinct and in range, on the CPU.

    None: every weight. int K: K distinct weights drawn uniformly with ``seed`` (sorted).
    A 1-D integer tensor/sequence: flat indices, in the given order. A pair (rows, cols).
    """
    numel = shape[0] * shape[1]
    if weights is None:
        return torch.arange(numel)
    if isinstance(weights, bool):
        raise TypeError("weights must be None, an int, a 1-D LongTensor of flat indices or a pair (rows, cols)")
    if isinstance(weights, int):
        if not 1 <= weights <= numel:
            raise ValueError(f"weights={weights}: must be between 1 and the layer's {numel} weights")
        g = torch.Generator().manual_seed(int(seed))
        return torch.randperm(numel, generator=g)[:weights].sort().values
    if isinstance(weights, tuple) and len(weights) == 2:
        rows, cols = (_as_index(t, name) for t, name in zip(weights, ("weights[0] (rows)", "weights[1] (cols)")))
        if rows.shape != cols.shape:
            raise ValueError(f"weights: rows and cols differ in length ({rows.numel()} vs {cols.numel()})")
        for t, n, name in ((rows, shape[0], "rows"), (cols, shape[1], "cols")):
            if t.numel() and (t.min() < 0 or t.max() >= n):
                raise ValueError(f"weights: {name} out of range [0, {n})")
        flat = rows * shape[1] + cols
    else:
        flat = _as_index(weights, "weights")
        if flat.numel() and (flat.min() < 0 or flat.max() >= numel):
            raise ValueError(f"weights: flat indices out of range [0, {numel})")
    if flat.numel() == 0:
        raise ValueError("weights: empty selection")
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("weights: duplicated indices")
    return flat


def _as_index(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be integer indices: {exc}") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer indices, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64)

"""The ``weights`` argument -> flat indices into ``layer.weight``."""
from __future__ import annotations

import torch


def select_weights(weights, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """(K,) int64 flat indices, distinct and in range, on the CPU.

    None: every weight. int K: K distinct weights drawn uniformly with ``seed`` (sorted; see _sample).
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
        return _sample(numel, weights, int(seed))
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
    if _has_duplicates(flat, numel):
        raise ValueError("weights: duplicated indices")
    return flat


def _sample(numel: int, k: int, seed: int) -> torch.Tensor:
    """k distinct indices of range(numel), uniform, sorted, deterministic in ``seed``.

    Few of many (AlexNet's 4096 of 16.7M): draw with replacement and keep the first k distinct
    values in draw order (a uniform k-subset), O(k log k) instead of permuting all of numel.
    """
    g = torch.Generator().manual_seed(seed)
    if 4 * k > numel:  # dense: rejection would redraw too often
        return torch.randperm(numel, generator=g)[:k].sort().values
    draws = torch.randint(numel, (k + k // 8 + 16,), generator=g)
    while True:
        values, inverse = torch.unique(draws, return_inverse=True)
        if values.numel() >= k:
            break
        draws = torch.cat([draws, torch.randint(numel, (2 * (k - values.numel()) + 16,), generator=g)])
    first = torch.full((values.numel(),), draws.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), "amin")
    return values[first.argsort()[:k]].sort().values


def _has_duplicates(flat: torch.Tensor, numel: int) -> bool:
    """Sort and compare neighbours for a few indices; a mask over the layer for many (no O(K log K))."""
    if 64 * flat.numel() < numel:
        s = flat.sort().values
        return bool((s[1:] == s[:-1]).any())
    seen = torch.zeros(numel, dtype=torch.bool)
    seen[flat] = True
    return int(seen.sum()) != flat.numel()


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

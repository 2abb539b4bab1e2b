"""Batches of (inputs, labels) from a DataLoader, any iterable of pairs, or an (X, y) tuple."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

DEFAULT_BATCH = 1024


def _split(x, y, batch_size):
    if batch_size is None or x.shape[0] <= batch_size:
        yield x, y
        return
    for s in range(0, x.shape[0], batch_size):
        yield x[s : s + batch_size], y[s : s + batch_size]


def _labels(y):
    """Labels given as a Python list or a NumPy array of ints: the same as a tensor."""
    if isinstance(y, (list, tuple)) or type(y).__module__ == "numpy":
        try:
            return torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            return y
    return y


def _raw_batches(data, batch_size):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and isinstance(_labels(data[1]), torch.Tensor):
        x, y = data[0], _labels(data[1])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: X has {x.shape[0]} samples but y has {y.shape[0]}")
        yield from _split(x, y, batch_size or DEFAULT_BATCH)
        return
    if not isinstance(data, Iterable) or isinstance(data, torch.Tensor):
        raise TypeError("data must be a DataLoader, an iterable of (inputs, labels) batches or a tuple (X, y), "
                        f"got {type(data).__name__}")
    items = iter(data)
    k = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as exc:  # the loader's own error: keep it, say where it happened
            exc.add_note(f"weightablate: raised by the data while reading batch {k} ({k} batches were read before); "
                         "the model's weights are unchanged")
            raise
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"data: batch {k} is not an (inputs, labels) pair but {type(item).__name__}")
        x, y = item[0], _labels(item[1])
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"data: batch {k} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
        yield from _split(x, y, batch_size)
        k += 1


def batches(data, batch_size: int | None, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Checked batches on ``device``: labels int64 (N,) (or (N, T) per token: weightablate.tokens),
    floating inputs of the model's ``dtype``, finite. Raises ValueError/TypeError naming ``data`` and the batch."""
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    total = 0
    for k, (x, y) in enumerate(_raw_batches(data, batch_size)):
        if y.dim() not in (1, 2) or y.shape[0] != x.shape[0]:
            raise ValueError(f"data: batch {k} has labels of shape {tuple(y.shape)} for {x.shape[0]} inputs")
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"data: batch {k} labels must be integer class indices, got {y.dtype}")
        if x.is_floating_point():
            if x.dtype != dtype:
                raise TypeError(f"data: batch {k} inputs are {x.dtype} but the model's weights are {dtype}")
            if not torch.isfinite(x).all():
                raise ValueError(f"data: batch {k} inputs contain NaN or inf")
        if x.shape[0] == 0:
            continue
        total += x.shape[0]
        yield x.to(device), y.to(device=device, dtype=torch.int64)
    if total == 0:
        raise ValueError("data: no samples")


def check_labels(y: torch.Tensor, n_classes: int) -> None:
    """Labels must index the model's logits."""
    if y.numel() and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"data: labels must lie in [0, {n_classes}), got {int(y.min())}..{int(y.max())}")


def count_batches(data, batch_size: int | None) -> int | None:
    """How many batches ``batches`` will yield (for progress and ETA), or None when unknown: an (X, y)
    tuple is split by ``batch_size``; a sized loader counts when ablate does not split it further."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        n = data[0].shape[0]
        return max(1, -(-n // (batch_size or DEFAULT_BATCH))) if n else None
    if batch_size is None and hasattr(data, "__len__") and not isinstance(data, (tuple, list)):
        try:
            return len(data)
        except TypeError:
            return None
    return None

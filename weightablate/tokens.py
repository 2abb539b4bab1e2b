"""Token-level losses: a language model's logits (N, T, V) with labels (N, T).

Every token whose label is not IGNORE_INDEX counts as one prediction: delta_loss is the summed
token cross-entropy change, delta_kl and flips are summed/counted over those tokens, and
``n_samples`` counts them. Tokens labelled IGNORE_INDEX (padding, the prompt) count for nothing.
A classifier's logits (N, C) with labels (N,) are one prediction per sample, as before."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default


def is_tokens(logits: torch.Tensor) -> bool:
    return logits.dim() == 3


def token_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Flat indices (into N*T) of the tokens that count, or None for (N, C) logits."""
    if not is_tokens(logits):
        if labels.dim() != 1:
            raise ValueError(f"data: labels of shape {tuple(labels.shape)} for logits {tuple(logits.shape)}: a "
                             "classifier's logits (N, C) need labels (N,)")
        return None
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"data: labels of shape {tuple(labels.shape)} for logits {tuple(logits.shape)}: per-token "
                         "logits (N, T, V) need labels (N, T) (IGNORE_INDEX -100 where a token does not count)")
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]


def flat_tokens(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) as one prediction per row: (N, C) and (N,) as they are; (N, T, V) and (N, T)
    as (M, V) and (M,) over the M tokens that count."""
    pos = token_positions(logits, labels)
    if pos is None:
        return logits, labels
    return logits.reshape(-1, logits.shape[-1])[pos], labels.reshape(-1)[pos]


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels of the predictions that count: (N,) as it is, (N, T) as (M,) without IGNORE_INDEX."""
    if labels.dim() == 1:
        return labels
    flat = labels.reshape(-1)
    return flat[flat != IGNORE_INDEX]

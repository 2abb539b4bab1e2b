"""Splitting one ablation across the ranks of torch.distributed (torchrun, one or many machines).

Each rank sweeps the whole dataset for its share of the weights, then every rank receives every
share (all_gather), so all ranks return the full result. Shares are whole rows (units) of the
layer: what a method decides per unit (e.g. the moment path of a unit shared by several chosen
weights) is then the same as in a single process, and every weight's sums are added in the same
order, so the result equals a one-process run (bit-identical in practice, float64 rounding at most).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one rank that writes files."""
    return world()[0] == 0


def partition(flat: torch.Tensor, row_size: int, parts: int) -> list[torch.Tensor]:
    """Positions into ``flat`` (int64, in their original order) for each of ``parts`` ranks.

    Weights of the same row (flat // row_size) go to the same rank; rows are dealt out in order
    of first appearance so that each rank gets about K / parts weights."""
    rows = flat.cpu() // row_size
    uniq, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    # rank of each distinct row: cut the cumulative count of weights into `parts` equal spans
    ends = torch.cumsum(counts, 0)
    owner = torch.clamp((ends - 1) * parts // max(1, flat.numel()), max=parts - 1)
    rank_of = owner[inverse]
    return [torch.nonzero(rank_of == r).reshape(-1) for r in range(parts)]


def _device_for_collectives(like: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(parts: list[torch.Tensor], mine: dict, K: int) -> dict:
    """Assemble every rank's (k_r, ...) tensors of ``mine`` into full (K, ...) tensors, in the
    original weight order, on every rank. ``parts``: partition() output; None values stay None."""
    rank, size = world()
    longest = max(int(p.numel()) for p in parts)
    out = {}
    for key in sorted(mine):  # the same order on every rank
        t = mine[key]
        if t is None:
            out[key] = None
            continue
        dev = _device_for_collectives(t.device)
        wire = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo has no bool
        padded = torch.zeros((longest,) + tuple(wire.shape[1:]), dtype=wire.dtype, device=dev)
        padded[:wire.shape[0]] = wire.to(dev)
        chunks = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(chunks, padded)
        full = torch.empty((K,) + tuple(wire.shape[1:]), dtype=wire.dtype)
        for r, pos in enumerate(parts):
            full[pos] = chunks[r][:pos.numel()].cpu()
        out[key] = full.to(torch.bool) if t.dtype == torch.bool else full
    return out

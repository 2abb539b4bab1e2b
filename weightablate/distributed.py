"""Splitting one ablation across the ranks of torch.distributed (torchrun, one or many machines).

Each rank sweeps the whole dataset for its share of the weights, then every rank receives every
share (all_gather), so all ranks return the full result. Shares are whole rows (units) of the
layer: what a method decides per unit (e.g. the moment path of a unit shared by several chosen
weights) is then the same as in a single process, and every weight's sums are added in the same
order; the result equals a one-process run to float64 rounding (a matrix product over fewer
units may round differently in the last bit; counts and exact zeros are identical).
"""
from __future__ import annotations

import contextlib
import os

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


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1) unless one
    is already initialised: nccl for CUDA, gloo for the CPU. Returns True when it initialised
    the group (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to fill a cache), the other ranks after it."""
    rank, size = world()
    if size > 1 and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if size > 1 and rank == 0:
            dist.barrier()


@contextlib.contextmanager
def fail_together():
    """Run one rank's share so that a failure reaches every rank: after the block each rank says
    "ok" or its error (all_gather_object); the failed rank re-raises its own exception and the
    others raise one naming it, instead of a transport error or a wait in the next collective
    until the group's timeout."""
    rank, size = world()
    if size == 1:
        yield
        return
    try:
        yield
    except Exception as exc:
        _agree(size, f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    _agree(size, None)


def _agree(size: int, error: str | None) -> None:
    errors = [None] * size
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed and error is None:
        raise RuntimeError("ablate: another rank failed, so this one stops too: " + "; ".join(failed))


def partition(flat: torch.Tensor, row_size: int, parts: int) -> list[torch.Tensor]:
    """Positions into ``flat`` (int64, in their original order) for each of ``parts`` ranks.

    Weights of the same row (flat // row_size) go to the same rank; the rows, in increasing
    order, are cut into ``parts`` runs of about K / parts weights each."""
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

"""The memory budget of one ablate call (max_memory)."""
from __future__ import annotations

DEFAULT_MAX_MEMORY = 1 << 30  # bytes of scratch per chunk of weights: 1 GiB


def check_max_memory(max_memory) -> int:
    """Bytes, as a positive int (None = the default)."""
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    if not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory < 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


def chunk_size(bytes_per_weight: int, max_memory: int) -> int:
    """How many weights to score at once so their scratch fits in max_memory (at least one)."""
    return max(1, max_memory // max(1, bytes_per_weight))

"""The memory budget of one ablate call (max_memory)."""
from __future__ import annotations

import re

DEFAULT_MAX_MEMORY = 1 << 30  # bytes of scratch per chunk of weights: 1 GiB
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1.5G', '1000000' -> bytes (GiB/MiB/KiB powers of 1024, GB/MB/KB of 1000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"max_memory: expected a size like 2GiB, 512MB or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def check_max_memory(max_memory) -> int:
    """Bytes, as a positive int (None = the default; strings like "2GiB" are parsed)."""
    if max_memory is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    if not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory < 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


def chunk_size(bytes_per_weight: int, max_memory: int) -> int:
    """How many weights to score at once so their scratch fits in max_memory (at least one)."""
    return max(1, max_memory // max(1, bytes_per_weight))

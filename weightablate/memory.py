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


# bytes per weight that a sweep still allocates once its first batch is captured: the running sums
# (2 float64, 3 int64, a bool), and the result's rows, cols and weight values; by_class adds C float64
RESULT_BYTES_PER_WEIGHT = 72


def available_memory(device) -> int | None:
    """Bytes the process can still allocate on ``device`` (Linux MemAvailable; a GPU's free memory);
    None when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_result_fits(n_weights: int, n_classes: int, by_class: bool, device) -> None:
    """A MemoryError naming ``weights`` (and ``by_class``) before a sweep starts whose result and
    running sums would not fit: better than running out of memory after the first batch's work."""
    need = n_weights * (RESULT_BYTES_PER_WEIGHT + (8 * n_classes if by_class else 0))
    have = available_memory(device)
    if have is None or need <= have:
        return
    what = f"{n_weights:,} weights" + (f" x {n_classes:,} classes (by_class=True)" if by_class else "")
    raise MemoryError(f"weights: the result for {what} needs about {need / 1e9:.1f} GB, more than the "
                      f"{have / 1e9:.1f} GB available; score fewer weights per call (e.g. a range of rows)"
                      + (" or pass by_class=False" if by_class else ""))


def chunk_size(bytes_per_weight: int, max_memory: int) -> int:
    """How many weights to score at once so their scratch fits in max_memory (at least one)."""
    return max(1, max_memory // max(1, bytes_per_weight))


# CPU: chunks of replayed changes beyond this many bytes of scratch get no faster (the per-weight
# work is a whole tail's forward already) but stop fitting the allocator's reusable blocks: each
# node's output then is a fresh mmap whose pages fault in on every chunk (benchmarks/bench_memory.py:
# a 1 GiB budget was 2x slower than 64 MiB). A bigger max_memory is capped here, so never slower.
CPU_REPLAY_BYTES = 64 << 20

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks (up to 32 MiB each) for reuse instead of handing them
    back to the system and faulting their pages in again on the next chunk (glibc only; process-wide,
    so the command line calls it, the library does not). True when it took effect."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(_M_TOP_PAD, 64 << 20))

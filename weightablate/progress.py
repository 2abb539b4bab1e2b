"""Progress bars that show on a terminal and stay silent elsewhere unless asked for."""
from __future__ import annotations

import sys


def bar(total, desc: str, progress):
    """A tqdm bar on stderr, or a no-op. progress: None = only when stdout and stderr are both
    terminals (never in a pipe, a log file or a test); True/False force it."""
    show = (sys.stdout.isatty() and sys.stderr.isatty()) if progress is None else bool(progress)
    if not show:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch" if "batch" in desc else "it", leave=False, file=sys.stderr)


class _Silent:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

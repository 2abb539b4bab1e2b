"""Progress bars that show on a terminal and stay silent elsewhere unless asked for."""
from __future__ import annotations

import os
import sys
import time


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


INTERVAL_ENV = "WEIGHTABLATE_PROGRESS_SECONDS"  # seconds between status lines off a terminal (default 30)
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """'45 s', '12 min 5 s', '3 h 20 min', '2 d 4 h'."""
    s = int(round(seconds))
    if s < 60:
        return f"{max(seconds, 0):.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class SweepProgress:
    """Where a sweep is: batches, and within a batch the weights scored so far, with an ETA.

    progress None: a tqdm bar when stdout and stderr are terminals, else a status line on stderr
    every WEIGHTABLATE_PROGRESS_SECONDS (30 s; the first after that long, so short jobs stay quiet);
    True: the bar; False: nothing at all (status notes included). The rate, hence the ETA, counts
    only the work done by this process (batches skipped on a resume are not)."""

    def __init__(self, total_batches, n_weights: int, progress, desc: str = "ablation (batches)"):
        tty = sys.stdout.isatty() and sys.stderr.isatty()
        self.mode = ("bar" if tty else "lines") if progress is None else ("bar" if progress else None)
        self.total, self.K, self.desc = total_batches, max(1, n_weights), desc
        self.start = self.last_line = time.monotonic()
        self.interval = _interval()
        self.base = 0.0  # batches done before this process started (a resume)
        self.pos = 0.0  # batches done, fractional within the current one
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_batches, desc=desc, unit="batch", leave=False, file=sys.stderr,
                             bar_format="{l_bar}{bar}| {n:.2f}/{total_fmt} [{elapsed}<{remaining}]"
                             if total_batches else None)

    def note(self, msg: str) -> None:
        """A status line (e.g. "resuming from ..."), unless progress is off."""
        if self.mode is None:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def resumed(self, batches: float) -> None:
        self.base = self.pos = float(batches)
        self.start = self.last_line = time.monotonic()
        if self._bar is not None:
            self._bar.update(batches)
            self._bar.start_t = self._bar.last_print_t = self._bar._time()  # the rate counts new work only

    def at(self, batch: int, weights_done: int) -> None:
        """``weights_done`` of the ``n_weights`` weights of batch ``batch`` (0-based) are scored."""
        pos = batch + min(weights_done, self.K) / self.K
        if self._bar is not None:
            self._bar.update(pos - self.pos)
        self.pos = pos
        if self.mode == "lines" and time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            print(self.line(batch, weights_done), file=sys.stderr, flush=True)

    def eta(self) -> float | None:
        """Seconds left at the rate of this process so far (None without a known total)."""
        done = self.pos - self.base
        if not self.total or done <= 0:
            return None
        return (time.monotonic() - self.start) / done * max(0.0, self.total - self.pos)

    def line(self, batch: int, weights_done: int) -> str:
        of = f"/{self.total}" if self.total else ""
        text = f"{self.desc}: batch {batch + 1}{of}, {weights_done}/{self.K} of its weights scored"
        if self.total:
            text += f"; {100 * self.pos / self.total:.1f}% done"
        text += f", {duration(time.monotonic() - self.start)} elapsed"
        eta = self.eta()
        return text + (f", about {duration(eta)} left" if eta is not None else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

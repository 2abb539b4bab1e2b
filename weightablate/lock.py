"""One process at a time on a checkpoint: an exclusive lock file that says who holds it.

The lock is fcntl.flock on a file (``DIR/sweep.ckpt.lock`` for a checkpoint). The kernel drops it
when its process dies (even by kill -9), so a lock left by a process that is gone is free to take,
and its file still names that process: the new holder says it took it over. Within one process a
new lock on the same file replaces an older one (left by a call that failed before releasing it).
The file is never deleted (deleting a flock'd file lets two processes lock two different files of
one name); its content is cleared on release."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the checkpoint works unlocked there
    fcntl = None


class LockError(ValueError):
    """The lock is held by another live process."""


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}


def describe(holder: dict | None) -> str:
    """'pid 123 on host h (since 2026-01-01 10:00:00 UTC)', or a placeholder for an unreadable file."""
    if not holder:
        return "another process (it has not written its details yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


def _read(fh) -> dict | None:
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


_HELD: dict = {}  # resolved path -> the FileLock of this process holding it


class FileLock:
    """An exclusive, non-blocking lock on ``path``; ``what`` names the locked thing in messages."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what
        self.took_over: dict | None = None  # the holder of a lock left by a process that is gone
        self._fh = None

    def acquire(self) -> "FileLock":
        """Take the lock, or raise LockError saying who holds it."""
        if fcntl is None or self._fh is not None:
            return self
        key = str(self.path.resolve())
        if key in _HELD:  # an earlier call of this process that failed before releasing it (a notebook)
            _HELD[key].release()
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fh)
            fh.close()
            raise LockError(f"{self.what} is in use by {describe(holder)}: wait until it finishes, or use another "
                            f"directory (lock file {str(self.path)!r})") from None
        self.took_over = _read(fh)  # a process that held it and died without releasing it
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder()))
        fh.flush()
        self._fh = fh
        _HELD[key] = self
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        if _HELD.get(str(self.path.resolve())) is self:
            del _HELD[str(self.path.resolve())]
        try:
            fh.seek(0)
            fh.truncate()  # a clean release leaves nothing to "take over"
        finally:
            fh.close()  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

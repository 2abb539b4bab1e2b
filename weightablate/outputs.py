"""Output locations of the command line, checked before any work is done.

A run that computes for an hour and then finds its --out unwritable loses the hour: every command
checks (and creates) its output directories first, with a probe file, and says in one line what is
wrong."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output location that is not a writable directory (the CLI reports it with exit 2)."""


def _file_above(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a directory, if any."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_writable_dir(path: Path, option: str) -> Path:
    """Create ``path`` if needed and write and remove a probe file in it; OutputError naming ``option``
    (e.g. "--out") when it is a file, lies under a file, or cannot be written (read-only, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        hint = "; a model's state dict goes to --checkpoint" if option == "--checkpoint-dir" else ""
        raise OutputError(f"{option} {str(path)!r} is a file, not a directory: give a directory{hint}")
    above = _file_above(path)
    if above is not None:
        raise OutputError(f"{option} {str(path)!r} cannot be created: {str(above)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".weightablate-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{option} {str(path)!r} is not a writable directory: {exc.strerror or exc}") from None
    return path


def check_outputs(args) -> None:
    """Check the output options a command was given (--out, --checkpoint-dir) before it works."""
    for option, attr in (("--out", "out"), ("--checkpoint-dir", "checkpoint_dir")):
        if getattr(args, attr, None) is not None:
            check_writable_dir(getattr(args, attr), option)

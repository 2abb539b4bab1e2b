"""Resumable sweeps: the running totals after each completed batch, written atomically.

A checkpoint is one file per rank in ``checkpoint_dir``. It holds the float64/int64 partial sums of
every weight after the first ``batches_done`` batches, the base loss/accuracy partial sums, and
fingerprints of what produced them (model state, layer, weight set, options, and a running hash
of the data read so far). Resuming re-reads the completed batches only to check their hash, then
continues from the next batch with the saved sums: the additions happen in exactly the order of an
uninterrupted run, so the result is bit-identical.

File layout: ``MAGIC``, the hex sha256 of the payload, a newline, then the payload (torch.save).
Writes go to a temporary file in the same directory, fsync, rename over the old file, fsync the
directory: a kill -9 at any moment leaves either the previous checkpoint or the new one, never a
mix. A checksum mismatch or a truncated file is refused, never silently used. A lock file
(NAME.ckpt.lock) keeps a second process off the same checkpoint while the first runs.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
import warnings
import weakref
from pathlib import Path

import torch

from .lock import FileLock, LockError, describe

MAGIC = b"WEIGHTABLATE-CKPT-1\n"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read, or does not belong to this run."""


def tensor_digest(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into hash ``h``."""
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        t = t.contiguous().cpu()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                 else t.numpy().tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        tensor_digest(h, t)
    return h.hexdigest()


def weights_fingerprint(flat: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    tensor_digest(h, flat.to(torch.int64))
    return h.hexdigest()


class DataHash:
    """A running hash of the batches read so far (inputs and labels as the model sees them)."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> str:
        tensor_digest(self._h, x)
        tensor_digest(self._h, y)
        return self._h.hexdigest()


class Checkpoint:
    """The checkpoint file of one sweep (one rank) in ``directory``.

    ``fingerprints``: dict of name -> str (model, layer, weights, options, ...); a saved checkpoint
    whose fingerprints differ is refused with a message naming what differs. ``every``: seconds
    between two saves (0 = after every batch); the last batch is always saved."""

    def __init__(self, directory, fingerprints: dict, *, every: float = 60.0, name: str = "sweep"):
        if not isinstance(every, (int, float)) or isinstance(every, bool) or every < 0:
            raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {every!r}")
        self.dir = Path(directory)
        self.path = self.dir / f"{name}.ckpt"
        self.fingerprints = {k: str(v) for k, v in fingerprints.items()}
        self.every = float(every)
        self._last = time.monotonic()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".{name}.probe-{os.getpid()}"
            _write_synced(probe, [b"x"])
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(f"checkpoint_dir {str(self.dir)!r} is not a writable directory: {exc}") from exc
        # one process at a time: a second one would overwrite the sums, and remove the first's temporary file
        self.lock = FileLock(self.dir / f"{name}.ckpt.lock", f"checkpoint_dir {str(self.dir)!r}")
        try:
            self.lock.acquire()
        except LockError as exc:
            raise CheckpointError(str(exc)) from None
        weakref.finalize(self, self.lock.release)
        if self.lock.took_over:
            warnings.warn(f"checkpoint_dir {str(self.dir)!r}: took over the lock of {describe(self.lock.took_over)}, "
                          "which is no longer running", UserWarning, stacklevel=3)
        for stale in self.dir.glob(f".{name}.ckpt.tmp-*"):  # left by a run killed while saving (we hold the lock)
            try:
                stale.unlink()
            except OSError:
                pass

    def close(self) -> None:
        """Release the lock (also done when the Checkpoint is garbage collected or the process ends)."""
        self.lock.release()

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> dict | None:
        """The saved state, or None when there is none yet. Raises CheckpointError when the file is
        corrupted or truncated, or was made by a different model/layer/weights/options."""
        if not self.path.exists():
            return None
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {str(self.path)!r}: cannot read: {exc}") from exc
        head = len(MAGIC) + 65
        if not raw.startswith(MAGIC) or len(raw) < head or raw[head - 1:head] != b"\n":
            raise CheckpointError(f"checkpoint {str(self.path)!r} is not a weightablate checkpoint or is truncated; "
                                  "delete it (or use another checkpoint_dir) to start over")
        digest, payload = raw[len(MAGIC):head - 1].decode("ascii", "replace"), raw[head:]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(f"checkpoint {str(self.path)!r} is corrupted or truncated (checksum mismatch); "
                                  "delete it (or use another checkpoint_dir) to start over")
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # a checksum-valid file that torch cannot read: a format change
            raise CheckpointError(f"checkpoint {str(self.path)!r}: cannot be read: {exc}") from exc
        if state.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {str(self.path)!r}: format {state.get('format')!r}, expected {FORMAT}")
        saved = state.get("fingerprints", {})
        differ = [k for k in self.fingerprints if saved.get(k) != self.fingerprints[k]]
        if differ:
            what = ", ".join(f"{k} (saved {saved.get(k)!r}, now {self.fingerprints[k]!r})" for k in differ)
            raise CheckpointError(f"checkpoint {str(self.path)!r} was made by a different run: {what} differ. "
                                  "Resume with the same model, layer, data, weights and options, or use another "
                                  "checkpoint_dir")
        return state

    # -- writing -------------------------------------------------------------------------------

    def due(self, last_batch: bool) -> bool:
        return last_batch or time.monotonic() - self._last >= self.every

    def save(self, state: dict) -> None:
        """Atomically replace the checkpoint with ``state`` (plus the fingerprints)."""
        buf = io.BytesIO()
        torch.save({**state, "format": FORMAT, "fingerprints": self.fingerprints}, buf)
        payload = buf.getvalue()
        tmp = self.dir / f".{self.path.name}.tmp-{os.getpid()}"
        try:
            _write_synced(tmp, [MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n", payload])
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise CheckpointError(f"checkpoint {str(self.path)!r}: cannot write ({exc}); the previous checkpoint, "
                                  "if any, is kept") from exc
        self._last = time.monotonic()


def _write_synced(path: Path, parts) -> None:
    """Write ``parts`` to a new file and fsync it (a full disk raises OSError here)."""
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

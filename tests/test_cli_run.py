"""The `weightablate` command as a user meets it: reproducible runs, output locations checked before
any work, the checkpoint lock, Ctrl-C and resume, progress and the estimate. Most tests run the real
command (python -m weightablate) in a subprocess."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import weightablate
from weightablate.cli import main

ROOT = Path(__file__).resolve().parents[1]


def command(*argv, cwd, env=None, timeout=300, **kw):
    """Run `weightablate ARGV` (this checkout's) and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "weightablate", *map(str, argv)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def one_line_error(proc, needle: str) -> str:
    """The command failed as a user error: exit 2, one error line naming ``needle``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee", "cat"):
        (root / cls).mkdir()
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    return root


# --- reproducibility ------------------------------------------------------------------------------

def test_seed_fixes_the_model_and_the_weights_are_saved(tmp_path, image_folder):
    import torchvision

    base = ["run", "--model", "resnet18", "--data", image_folder, "--image-size", "32", "--weights", "10",
            "--no-report", "--quiet"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = command(*base, "--seed", seed, "--out", tmp_path / name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[name] = weightablate.load(tmp_path / name / "results.npz")
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.base_loss == b.base_loss and torch.equal(a.delta_loss, b.delta_loss)
    assert torch.equal(a.weight, b.weight)
    assert a.base_loss != c.base_loss  # the seed does reach the model

    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["model_weights"].startswith(str(tmp_path / "a" / "model.pt"))
    assert "model.pt" in (tmp_path / "a" / "summary.txt").read_text()
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "a" / "model.pt", weights_only=True))
    assert torch.equal(model.fc.weight.detach().reshape(-1)[a.indices], a.weight)

    # "rerun the same command to resume": a second run on the same checkpoint dir is accepted
    ck = ["--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "d"]
    first = command(*base, *ck, cwd=tmp_path)
    again = command(*base, *ck, cwd=tmp_path)
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert torch.equal(weightablate.load(tmp_path / "d" / "results.npz").delta_loss, a.delta_loss)


# --- output locations -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["run", "--out", "afile"], "--out 'afile'"),
    (["run", "--out", "afile/sub"], "--out 'afile/sub'"),
    (["run", "--out", "fresh", "--checkpoint-dir", "afile/ck"], "--checkpoint-dir 'afile/ck'"),
    (["prune", "--out", "afile/sub"], "--out 'afile/sub'"),
    (["report", "results.npz", "--out", "afile"], "--out 'afile'"),
    (["stats", "--out", "afile/sub"], "--out 'afile/sub'"),
])
def test_unusable_output_is_refused_before_any_work(tmp_path, argv, needle):
    (tmp_path / "afile").write_text("a file, not a directory")
    (tmp_path / "results.npz").write_bytes(b"")
    proc = command(*argv, cwd=tmp_path, timeout=120)
    one_line_error(proc, needle)
    assert "is a file" in proc.stderr or "existing file" in proc.stderr
    assert "ablating" not in proc.stderr and "pruning" not in proc.stderr  # no work was started
    assert not (tmp_path / "fresh" / "results.npz").exists()


def test_read_only_output_is_refused(tmp_path, monkeypatch, capsys):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert main(["run", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "Read-only file system" in err

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

@pytest.mark.slow  # three resnet18 commands (~30 s on 2 busy cores)
def test_seed_fixes_the_model_and_the_weights_are_saved(tmp_path, image_folder):
    import torchvision

    base = ["run", "--model", "resnet18", "--data", image_folder, "--image-size", "32", "--weights", "10",
            "--no-report", "--quiet"]
    assert command(*base, "--out", tmp_path / "a", cwd=tmp_path).returncode == 0
    # the same command again, with a checkpoint dir, twice: "rerun the same command to resume" is accepted
    ck = ["--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "b"]
    for _ in range(2):
        proc = command(*base, *ck, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert main([*map(str, base), "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    a, b, c = (weightablate.load(tmp_path / d / "results.npz") for d in "abc")
    assert a.base_loss == b.base_loss and torch.equal(a.delta_loss, b.delta_loss)
    assert torch.equal(a.weight, b.weight)
    assert a.base_loss != c.base_loss  # the seed does reach the model

    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["model_weights"].startswith(str(tmp_path / "a" / "model.pt"))
    assert "model.pt" in (tmp_path / "a" / "summary.txt").read_text()
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "a" / "model.pt", weights_only=True))
    assert torch.equal(model.fc.weight.detach().reshape(-1)[a.indices], a.weight)


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


# --- the checkpoint lock --------------------------------------------------------------------------

HOLD = r'''
import sys, time
from pathlib import Path
from weightablate.lock import FileLock
lock = FileLock(Path(sys.argv[1]), "test").acquire()
Path(sys.argv[2]).write_bytes(b"half-written")  # like a checkpoint being saved
print("locked", flush=True)
time.sleep(600)
'''


def hold_lock(lock_file: Path, tmp_file: Path):
    """A process that holds ``lock_file`` (and has a temporary file) until killed."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file), str(tmp_file)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_checkpoint_lock_refuses_a_second_process_then_takes_over_a_dead_ones(tmp_path):
    from weightablate.checkpoint import Checkpoint, CheckpointError

    tmp_file = tmp_path / ".sweep.ckpt.tmp-999999"
    holder = hold_lock(tmp_path / "sweep.ckpt.lock", tmp_file)
    try:
        with pytest.raises(CheckpointError, match=f"in use by pid {holder.pid} on host"):
            Checkpoint(tmp_path, {"model": "m"})
        assert tmp_file.read_bytes() == b"half-written"  # the other process's temporary file is left alone
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=f"took over the lock of pid {holder.pid} .* no longer running"):
        ck = Checkpoint(tmp_path, {"model": "m"})
    assert not tmp_file.exists()  # a dead process's temporary file is cleaned up
    ck.save({"batches": 1})
    assert ck.load()["batches"] == 1
    ck.close()
    with warnings_as_errors():  # released cleanly: the next one takes it silently
        Checkpoint(tmp_path, {"model": "m"}).close()


def warnings_as_errors():
    import warnings

    cm = warnings.catch_warnings()
    cm.__enter__()
    warnings.simplefilter("error")
    return _Exit(cm)


class _Exit:
    def __init__(self, cm):
        self.cm = cm

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_lock_within_one_process_replaces_a_leftover(tmp_path):
    from weightablate.lock import FileLock

    first = FileLock(tmp_path / "x.lock", "x").acquire()
    second = FileLock(tmp_path / "x.lock", "x").acquire()  # e.g. a notebook call after one that failed
    assert second.held and not first.held
    second.release()
    assert (tmp_path / "x.lock").read_text() == ""


def test_run_refuses_a_checkpoint_dir_in_use(tmp_path):
    holder = hold_lock(tmp_path / "ck" / "test" / "sweep.ckpt.lock", tmp_path / "ck" / "test" / ".tmp")
    try:
        proc = command("run", "--weights", "20", "--no-report", "--checkpoint-dir", tmp_path / "ck",
                       "--out", tmp_path / "out", cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    finally:
        holder.kill()
        holder.wait()
    line = one_line_error(proc, f"in use by pid {holder.pid}")
    assert "--checkpoint-dir" not in line or "ck" in line


# --- Ctrl-C, resume and progress ------------------------------------------------------------------

def test_interrupt_mid_batch_saves_and_resumes_bit_identical(tmp_path, monkeypatch):
    from weightablate.closed_form import ClosedForm
    from weightablate.sweep import Interrupted

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    X, y = torch.randn(200, 10), torch.randint(0, 4, (200,))
    # chunks of 7 weights; no self-check (its probe would count as score calls)
    args = dict(weights=100, batch_size=50, max_memory=4 * 32 * 50 * 7, by_class=True, verify=False)
    reference = weightablate.ablate(model, "0", (X, y), **args)
    real, calls = ClosedForm.score, []

    def interrupted_at(n):
        def score(self, batch, sl):
            calls.append(sl)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(self, batch, sl)
        return score

    for n in (3, 13 + 15 + 11):  # in batch 1 (two chunks summed), then in batch 3 after the resume
        monkeypatch.setattr(ClosedForm, "score", interrupted_at(n))
        calls.clear()
        with pytest.raises(Interrupted) as info:
            weightablate.ablate(model, "0", (X, y), checkpoint_dir=tmp_path, **args)
        assert info.value.checkpoint_path == tmp_path / "sweep.ckpt"
    assert (info.value.batches, info.value.weights) == (2, 70)  # 15 chunks a batch: 10 of batch 3 were summed
    assert "interrupted after batch 2/4 and 70 of the 100 weights of batch 3" in str(info.value)
    monkeypatch.setattr(ClosedForm, "score", real)
    resumed = weightablate.ablate(model, "0", (X, y), checkpoint_dir=tmp_path, **args)
    for f in ("delta_loss", "delta_kl", "flips", "new_errors", "new_correct", "exact_zero", "class_loss"):
        assert torch.equal(getattr(resumed, f), getattr(reference, f)), f
    assert (resumed.n_samples, resumed.base_loss, resumed.base_accuracy) == \
        (reference.n_samples, reference.base_loss, reference.base_accuracy)

    with pytest.raises(Interrupted, match="nothing was saved"):  # no checkpoint_dir
        monkeypatch.setattr(ClosedForm, "score", interrupted_at(len(calls) + 2))
        weightablate.ablate(model, "0", (X, y), **args)


def test_progress_moves_within_a_batch_with_an_eta(monkeypatch, capsys):
    from weightablate.progress import SweepProgress

    monkeypatch.setenv("WEIGHTABLATE_PROGRESS_SECONDS", "0")
    with SweepProgress(4, 100, None) as prog:  # not a terminal: status lines
        assert prog.mode == "lines"
        prog.note("resuming from batch 1/4")
        prog.resumed(1)
        time.sleep(0.01)
        prog.at(1, 50)
        prog.at(2, 0)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "resuming from batch 1/4"
    assert lines[1].startswith("ablation (batches): batch 2/4, 50/100 of its weights scored; 37.5% done")
    assert "left" in lines[1] and "left" in lines[2]
    monkeypatch.setenv("WEIGHTABLATE_PROGRESS_SECONDS", "3600")
    with SweepProgress(4, 100, None) as prog:
        prog.at(0, 50)
    with SweepProgress(4, 100, False) as prog:
        prog.note("quiet")
        prog.at(0, 50)
    assert capsys.readouterr().err == ""  # within the interval, and with progress off: nothing


@pytest.mark.slow  # two digits commands, one interrupted (~30 s on 2 busy cores)
def test_ctrl_c_on_the_command_then_rerun_resumes(tmp_path, monkeypatch):
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = ["run", "--weights", "300", "--no-report", "--batch-size", "60", "--max-memory", "64KiB",
            "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "3600"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIGHTABLATE_PROGRESS_SECONDS": "0", **cache}
    proc = subprocess.Popen([sys.executable, "-m", "weightablate", *map(str, argv), "--out", str(tmp_path / "a")],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # status lines while a batch is scored (not a terminal, every 0 s here)
        seen.append(line)
        if line.startswith("ablation (batches): batch 3/9"):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest
    assert any("of its weights scored" in s and "left" in s for s in seen)
    assert "Traceback" not in rest
    message = rest.strip().splitlines()[-1]
    assert message.startswith("weightablate run: interrupted after batch ")
    assert message.endswith(f"checkpoint saved in {tmp_path / 'ck' / 'test'}: rerun the same command to resume")
    again = command(*argv, "--out", tmp_path / "a", cwd=tmp_path, env=cache)
    assert again.returncode == 0, again.stderr
    position = message.split("interrupted after ")[1].split(", checkpoint")[0]
    assert f"resuming from {position}" in again.stderr
    monkeypatch.setenv("XDG_CACHE_HOME", cache["XDG_CACHE_HOME"])
    assert main(["run", "--weights", "300", "--no-report", "--quiet", "--batch-size", "60", "--max-memory", "64KiB",
                 "--out", str(tmp_path / "b")]) == 0  # uninterrupted
    for f in ("results.npz", "results_train.npz"):
        a, b = weightablate.load(tmp_path / "a" / f), weightablate.load(tmp_path / "b" / f)
        assert torch.equal(a.delta_loss, b.delta_loss) and torch.equal(a.flips, b.flips)
        assert a.base_loss == b.base_loss


# --- the estimate ---------------------------------------------------------------------------------

def test_estimate_names_the_method_and_the_size(image_folder):
    import torchvision

    from weightablate.estimate import estimate

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 3, (6,))
    for layer, k, method in (("fc", None, "logits"), ("layer4.1.conv2", 40, "funnel"), ("layer4.1.conv1", 3, "replay")):
        est = estimate(model, layer, (x, y), 600, k, max_memory="64MiB", by_class=True)
        res = weightablate.ablate(model, layer, (x, y), weights=k, max_memory="64MiB")
        assert est.method == res.method == method
        assert est.n_weights == len(res) and est.pairs == len(res) * 600
        assert 1 <= est.probe_weights <= est.chunk <= len(res) and est.probe_samples == 6
        assert est.seconds > 0 and est.scratch_bytes == 64 << 20
        assert est.sums_bytes == len(res) * (41 + 3 * 8)  # sums and the by-class split
        text = est.text()
        assert f"method {method}" in text and f"x 600 samples" in text and "in all" in text


def test_estimate_option_stops_after_the_estimate(tmp_path, image_folder):
    proc = command("run", "--model", "resnet18", "--data", image_folder, "--image-size", "32", "--estimate",
                   "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("estimate: method logits; 1,536 weights x 12 samples")
    assert "pairs/s" in proc.stdout and "in all" in proc.stdout and "memory" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing was written


# --- max_memory -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tail, kind", [
    ([torch.nn.BatchNorm2d(8), torch.nn.ReLU()], "funnel"),
    ([torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)], "replay"),
])
def test_cpu_chunks_stop_growing_at_the_cap(tail, kind):
    from weightablate.dispatch import choose_method
    from weightablate.memory import CPU_REPLAY_BYTES

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), *tail, torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    method = choose_method(model, "0", model[0], "weight", torch.arange(216), x, "cpu", "auto", True, False)
    assert method.kind == kind
    method.prepare(x, y)
    budgets = (1 << 16, 1 << 20, CPU_REPLAY_BYTES // 2, CPU_REPLAY_BYTES, 1 << 30, 1 << 40)
    sizes = [method.chunk_size(4, b) for b in budgets]
    assert sizes == sorted(sizes) and sizes[0] < sizes[3]  # more budget, bigger chunks, up to the cap
    assert sizes[3] == sizes[4] == sizes[5]  # past it the same chunks: a bigger budget is never slower


def test_keep_freed_memory_takes_effect_on_linux():
    from weightablate.memory import keep_freed_memory

    assert keep_freed_memory() == sys.platform.startswith("linux")

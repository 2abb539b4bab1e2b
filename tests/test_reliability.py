"""Scale and reliability: checkpoints (kill -9, corruption, full disk, fingerprints), streaming,
loaders that fail, NaN inputs, half-precision models, progress and max_memory."""
import errno
import gc
import os
import signal
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch
from torch import nn

import weightablate as wa
from weightablate import checkpoint as ck
from oracle import oracle

# A job run in a subprocess (kill -9) and in-process (reference): deterministic model and data.
JOB = r'''
import sys, time, torch
from torch import nn
import weightablate as wa

def build():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 7))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    X = torch.randn(600, 24, generator=g)
    y = torch.randint(0, 7, (600,), generator=g)
    return model, X, y

def loader(X, y, delay=0.0):
    for s in range(0, X.shape[0], 15):  # 40 batches
        time.sleep(delay)
        yield X[s:s + 30], y[s:s + 30]

def run(ckpt=None, delay=0.0):
    model, X, y = build()
    return wa.ablate(model, "0", loader(X, y, delay), weights=300, seed=1, by_class=True,
                     checkpoint_dir=ckpt, checkpoint_every=0)

if __name__ == "__main__":
    run(sys.argv[1], float(sys.argv[2])).save(sys.argv[3])
'''

FIELDS = ("indices", "delta_loss", "delta_kl", "flips", "new_errors", "new_correct", "exact_zero", "class_loss")


def same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None and y is None) or torch.equal(x, y), f
    assert (a.n_samples, a.base_loss, a.base_accuracy) == (b.n_samples, b.base_loss, b.base_accuracy)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = tmp_path_factory.mktemp("job") / "job.py"
    path.write_text(JOB)
    ns = {}
    exec(compile(JOB, str(path), "exec"), ns)
    return path, ns


def saved_batches(path):
    raw = path.read_bytes()
    state = torch.load(__import__("io").BytesIO(raw[len(ck.MAGIC) + 65:]), weights_only=True)
    return state["batches"]


@pytest.mark.slow  # two subprocesses killed with SIGKILL (~15 s on 2 busy cores)
def test_kill_9_then_resume_is_bit_identical(job, tmp_path):
    path, ns = job
    reference = ns["run"]()
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(wa.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    killed_at = []
    for pause in (0.0, 0.13):  # two kills at different moments (one may land inside a save)
        proc = subprocess.Popen([sys.executable, str(path), str(ckpt), "0.03", str(out)], env=env)
        deadline = time.monotonic() + 60
        previous = killed_at[-1] if killed_at else 0
        while not (ckpt / "sweep.ckpt").exists() or saved_batches(ckpt / "sweep.ckpt") <= previous:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(pause)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at.append(saved_batches(ckpt / "sweep.ckpt"))
    assert 0 < killed_at[0] < killed_at[1] < 40  # it did stop midway, and the second run went on from there
    resumed = ns["run"](ckpt)  # the same call, no delay: resumes from the checkpoint
    same(resumed, reference)
    assert not out.exists()
    assert not [p for p in os.listdir(ckpt) if p.startswith(".")]  # no temporary files left behind


def test_loader_error_mid_epoch_then_resume(job, tmp_path, monkeypatch):
    _, ns = job
    model, X, y = ns["build"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    def failing():
        for k, batch in enumerate(ns["loader"](X, y)):
            if k == 17:
                raise OSError("disk read failed")
            yield batch

    with pytest.raises(OSError, match="disk read failed") as info:
        wa.ablate(model, "0", failing(), weights=300, seed=1, by_class=True, checkpoint_dir=tmp_path,
                  checkpoint_every=0)
    assert any("while reading batch 17" in n or "reading batch 17" in n for n in info.value.__notes__)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training
    assert saved_batches(tmp_path / "sweep.ckpt") == 17
    from weightablate.closed_form import ClosedForm

    prepared = []
    real = ClosedForm.prepare
    monkeypatch.setattr(ClosedForm, "prepare", lambda self, x, y: prepared.append(1) or real(self, x, y))
    resumed = ns["run"](tmp_path)
    # the completed batches are only re-read, not recomputed (+1: the self-check's 8 samples)
    assert len(prepared) == 40 - 17 + 1
    monkeypatch.undo()
    same(resumed, ns["run"]())


def test_completed_checkpoint_is_reused(job, tmp_path):
    _, ns = job
    first = ns["run"](tmp_path)
    again = ns["run"](tmp_path)  # nothing left to do: the saved sums, bit for bit
    same(again, first)
    assert again.method == first.method and again.head == first.head


def small(tmp_path, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    X, y = torch.randn(200, 10), torch.randint(0, 4, (200,))
    args = dict(weights=50, batch_size=40, checkpoint_dir=tmp_path, checkpoint_every=0)
    args.update(kw)
    return model, X, y, args


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupted_checkpoint_is_refused(tmp_path, damage):
    model, X, y, args = small(tmp_path)
    wa.ablate(model, "0", (X, y), **args)
    f = tmp_path / "sweep.ckpt"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "garbage":
        raw = bytearray(b"hello")
    else:
        raw = bytearray()
    f.write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointError, match="corrupted|truncated") as info:
        wa.ablate(model, "0", (X, y), **args)
    assert "sweep.ckpt" in str(info.value)
    assert f.read_bytes() == bytes(raw)  # left for the user to inspect, never overwritten


def test_unwritable_checkpoint_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model, X, y, args = small(blocker / "ckpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointError, match="not a writable directory"):
        wa.ablate(model, "0", (X, y), **args)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_full_disk_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, X, y, args = small(tmp_path)
    reference = wa.ablate(model, "0", (X, y), weights=50, batch_size=40)
    calls = []
    real = ck._write_synced

    def disk_fills(path, parts):
        calls.append(path)
        if len(calls) == 4:  # the probe, two good saves, then the disk is full half-way through
            with open(path, "wb") as fh:
                fh.write(parts[0])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, parts)

    monkeypatch.setattr(ck, "_write_synced", disk_fills)
    with pytest.raises(ck.CheckpointError, match="No space left on device"):
        wa.ablate(model, "0", (X, y), **args)
    assert sorted(os.listdir(tmp_path)) == ["sweep.ckpt"]  # the half-written temporary file is gone
    assert saved_batches(tmp_path / "sweep.ckpt") == 2
    monkeypatch.setattr(ck, "_write_synced", real)
    same(wa.ablate(model, "0", (X, y), **args), reference)


@pytest.mark.parametrize("change", ["model", "layer", "weights", "options", "data", "fewer batches"])
def test_checkpoint_of_another_run_is_refused(tmp_path, change):
    model, X, y, args = small(tmp_path)
    layer = "0"
    wa.ablate(model, layer, (X[:120], y[:120]), **args)  # 3 batches saved
    if change == "model":
        with torch.no_grad():
            model[2].bias[0] += 1e-3
    elif change == "layer":
        layer = "2"
    elif change == "weights":
        args["weights"] = 51
    elif change == "options":
        args["mode"] = "exact"
    elif change == "data":
        X = X.clone()
        X[5, 0] += 1e-6
    expected = {"fewer batches": "data has only 2", "data": "data differs"}.get(change, f"{change} .*differ")
    data = (X[:80], y[:80]) if change == "fewer batches" else (X, y)
    with pytest.raises(ck.CheckpointError, match=expected):
        wa.ablate(model, layer, data, **args)


def test_nan_input_is_refused_naming_the_batch(tmp_path):
    model, X, y, args = small(tmp_path)
    X = X.clone()
    X[130, 3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch 3 inputs contain NaN"):
        wa.ablate(model, "0", (X, y), **args)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_stream_holds_one_batch_at_a_time():
    """Memory does not grow with the dataset: earlier batches are freed while later ones are read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    alive = []

    def stream():
        for k in range(12):
            gc.collect()
            assert sum(r() is not None for r in alive) <= 2, f"batch {k}: earlier batches are still held"
            x = torch.randn(32, 10)
            alive.append(weakref.ref(x))
            yield x, torch.randint(0, 4, (32,))

    r = wa.ablate(model, "0", stream(), weights=20)
    assert r.n_samples == 12 * 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_as_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5)).to(dtype)
    X, y = torch.randn(150, 12).to(dtype), torch.randint(0, 5, (150,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.arange(0, 240, 7)
    with pytest.warns(UserWarning, match="float32 copy"):
        r = wa.ablate(model, "0", (X, y), weights=idx)
    assert all(p.dtype == dtype for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ref = oracle(model, "0", X, y, idx)  # the half model's exact values, evaluated in float64
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"]).all()
    assert torch.equal(r.flips, ref["flips"])
    assert r.weight.dtype == torch.float32
    assert "float32" in r.extra["computed_in"]
    assert torch.equal(r.weight, model[0].weight.detach().reshape(-1)[idx].float())
    with pytest.raises(TypeError, match="inputs are torch.float32"), pytest.warns(UserWarning):
        wa.ablate(model, "0", (X.float(), y))


def test_progress_bar_only_when_asked(capsys):
    model, X, y, args = small(None, checkpoint_dir=None)
    wa.ablate(model, "0", (X, y), **args)  # not a terminal: silent
    assert capsys.readouterr().err == ""
    wa.ablate(model, "0", (X, y), progress=True, **args)
    assert "ablation (batches)" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wa.ablate(model, "0", (X, y), progress=False, **args)
    assert capsys.readouterr().err == ""


def test_max_memory_sizes_and_independence():
    from weightablate.memory import check_max_memory

    assert check_max_memory("2GiB") == 2 << 30
    assert check_max_memory("512MB") == 512 * 10**6
    assert check_max_memory("1.5k") == 1500
    assert check_max_memory(None) == 1 << 30
    for bad in ("lots", "2 parsecs", "-1GiB", "0", 0, True):
        with pytest.raises(ValueError, match="max_memory"):
            check_max_memory(bad)
    model, X, y, args = small(None, checkpoint_dir=None)
    same(wa.ablate(model, "0", (X, y), max_memory="1KiB", **args), wa.ablate(model, "0", (X, y), **args))


def test_checkpoint_every_is_checked(tmp_path):
    model, X, y, args = small(tmp_path, checkpoint_every=-1)
    with pytest.raises(ValueError, match="checkpoint_every"):
        wa.ablate(model, "0", (X, y), **args)


def test_cli_checkpoint_dir_max_memory_and_quiet(tmp_path, monkeypatch, capsys):
    from weightablate import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--max-memory", "a lot"])
    assert info.value.code == 2 and "max_memory" in capsys.readouterr().err
    args = ["run", "--quiet", "--no-report", "--weights", "200", "--max-memory", "64KiB",
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "0"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no bars, no status lines
    assert sorted(os.listdir(tmp_path / "ck")) == ["test", "train"]
    assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0  # resumes both completed checkpoints
    plain = ["run", "--quiet", "--no-report", "--weights", "200", "--out", str(tmp_path / "c")]
    assert cli.main(plain) == 0
    for f in ("results.npz", "results_train.npz"):
        a, b, c = (wa.load(tmp_path / d / f) for d in "abc")
        same(a, b)
        same(a, c)
    other = [a if a != "200" else "150" for a in args]  # another weight set: the checkpoint is refused, exit 1
    assert cli.main(other + ["--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "different run" in err and "weights" in err

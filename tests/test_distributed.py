"""ablate under torchrun: 2 gloo processes on this machine return the one-process result."""
import os
import subprocess
import sys

import pytest
import torch

import weightablate as wa
from weightablate.distributed import partition

SCRIPT = r'''
import sys, torch
import torch.distributed as dist
from torch import nn
import weightablate as wa

def build():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    X = torch.randn(300, 16, generator=g)
    y = torch.randint(0, 6, (300,), generator=g)
    return model, X, y

CASES = {  # name: (layer, ablate keyword arguments)
    "all": ("0", dict(by_class=True)),
    "subset": ("0", dict(weights=300, seed=3)),
    "exact": ("0", dict(weights=torch.tensor([5, 6, 7, 100, 101, 639]), mode="exact")),
    "logits": ("2", dict()),
    "one weight": ("2", dict(weights=torch.tensor([17]))),
}

def run(name, **extra):
    model, X, y = build()
    layer, kw = CASES[name]
    return wa.ablate(model, layer, (X, y), batch_size=64, **kw, **extra)

if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in CASES:
        run(name).save(f"{out}/{name}-rank{rank}.npz")
    ckpt = f"{out}/ckpt"
    first = run("subset", checkpoint_dir=ckpt, checkpoint_every=0)
    again = run("subset", checkpoint_dir=ckpt)  # resumes the completed checkpoint of this rank
    assert torch.equal(first.delta_loss, again.delta_loss)
    first.save(f"{out}/checkpointed-rank{rank}.npz")
    dist.destroy_process_group()
'''


def env():
    root = os.path.dirname(os.path.dirname(wa.__file__))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def torchrun(args, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], env=env(), capture_output=True, text=True, timeout=300, **kw)


def assert_equal_results(a, b):
    """Counts and exact zeros identical; float64 sums equal to float64 rounding."""
    for f in ("indices", "rows", "cols", "weight", "flips", "new_errors", "new_correct", "exact_zero"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("delta_loss", "delta_kl", "class_loss"):
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            assert x is None and y is None, f
            continue
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15 * float(y.abs().max()), msg=f)
    assert (a.n_samples, a.base_loss, a.base_accuracy, a.method) == (b.n_samples, b.base_loss, b.base_accuracy,
                                                                    b.method)


def test_partition_keeps_rows_together_and_balances():
    flat = torch.randperm(640)[:300]
    parts = partition(flat, 16, 3)
    pos = torch.cat(parts)
    assert torch.equal(pos.sort().values, torch.arange(300))
    rows = [set((flat[p] // 16).tolist()) for p in parts]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2]) and not (rows[0] & rows[2])
    assert all(abs(p.numel() - 100) <= 16 for p in parts)
    assert all(torch.equal(p, p.sort().values) for p in parts)  # original order within a share
    assert [p.numel() for p in partition(torch.tensor([5]), 16, 2)] == [1, 0]


@pytest.mark.slow  # one torchrun launch of two processes (~10 s)
def test_two_gloo_processes_equal_one_process(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = torchrun([str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ns = {}
    exec(compile(SCRIPT, str(script), "exec"), ns)
    for name in ns["CASES"]:
        single = ns["run"](name)
        for rank in (0, 1):  # every rank returns the full result
            assert_equal_results(wa.load(tmp_path / f"{name}-rank{rank}.npz"), single)
    for rank in (0, 1):
        assert_equal_results(wa.load(tmp_path / f"checkpointed-rank{rank}.npz"), ns["run"]("subset"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["sweep-rank0-of-2.ckpt", "sweep-rank0-of-2.ckpt.lock",
                                                     "sweep-rank1-of-2.ckpt", "sweep-rank1-of-2.ckpt.lock"]


FAILING = r'''
import torch
import torch.distributed as dist
from torch import nn
import weightablate as wa

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 4))
X, y = torch.randn(200, 8), torch.randint(0, 4, (200,))
if dist.get_rank() == 1:
    X[150, 3] = float("nan")  # only rank 1's data is bad: it fails in its second batch
try:
    wa.ablate(model, "0", (X, y), batch_size=100)
except Exception as exc:
    print(f"rank {dist.get_rank()} raised {type(exc).__name__}: {exc}", flush=True)
    raise
'''


def test_one_rank_failing_stops_every_rank(tmp_path):
    """Every rank names the failed rank's error. Without the agreement the healthy rank got only a
    transport error ("Connection closed by peer") once the failed process exited, and waited in
    all_gather until the group's timeout while it lived on (a notebook, a loop over layers)."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    proc = torchrun([str(script)])  # a hang would end in the 300 s timeout
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 raised ValueError: data: batch 1 inputs contain NaN" in out, out[-3000:]
    assert "rank 0 raised RuntimeError: ablate: another rank failed" in out and "rank 1: ValueError" in out, out[-3000:]


@pytest.mark.slow  # torchrun of the CLI (~15 s)
def test_cli_under_torchrun_rank0_writes(tmp_path):
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["--no-report", "--weights", "300", "--quiet"]
    single = subprocess.run([sys.executable, "-m", "weightablate", "run", *args, "--out", str(tmp_path / "one")],
                            env={**env(), **cache}, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "weightablate", "run", *args, "--out", str(tmp_path / "two"),
                           "--checkpoint-dir", str(tmp_path / "ck")],
                          env={**env(), **cache}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("train vs test") == 1  # rank 0 alone prints the summary
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    for f in ("results.npz", "results_train.npz"):
        assert_equal_results(wa.load(tmp_path / "two" / f), wa.load(tmp_path / "one" / f))
    assert sorted(p for p in os.listdir(tmp_path / "ck" / "test") if not p.endswith(".lock")) == \
        ["sweep-rank0-of-2.ckpt", "sweep-rank1-of-2.ckpt"]

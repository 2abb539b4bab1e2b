"""The CUDA kernel source (csrc/cuda/ablate_kernels.cuh), run on the CPU under the host emulator
of tests/cuda_emulator: the same checks as test_cuda.py, so CI executes the GPU code's indexing,
grid-stride loops, block reductions and bounds checks without a GPU. What it cannot show (real
concurrency, the GPU's libm, speed) is left to test_cuda.py on a GPU (benchmarks/gpu_check.sh)."""
import os
import subprocess
import sys

import pytest
import torch
from oracle import oracle
from test_any_layer import CASES as ANY_LAYER
from test_any_layer import close, get_model, reference
from test_correctness import digits, make, trained
from test_ops import assert_same_scores, pair_inputs, score_inputs

import weightablate as wa
from weightablate import closed_form, ops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPS = torch.ops.weightablate
ASAN_ENV = "WEIGHTABLATE_EMULATOR_ASAN"


@pytest.fixture(scope="module")
def emu():
    """Build (once; cached in build/cuda_emulator) and load the emulated ops."""
    from torch.utils import cpp_extension

    lib = torch.library.Library("weightablate_emulated", "DEF")
    for op in ("pair_deltas", "score_deltas", "fused_scores"):  # the real ops' schemas, so both stay in step
        lib.define(str(getattr(OPS, op).default._schema).split("::", 1)[1])
    flags = ["-O2"]
    build = os.path.join(ROOT, "build", "cuda_emulator")
    if ASAN_ENV in os.environ:  # test_no_out_of_bounds_access runs this module again, instrumented
        with open("/proc/self/maps") as maps:
            assert "libasan" in maps.read(), "the instrumented run needs LD_PRELOAD=libasan.so"
        flags = ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"]
        build += "_asan"
    os.makedirs(build, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:  # the venv's ninja, also when the venv is not activated
        mp.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        cpp_extension.load("weightablate_emulated", [os.path.join(HERE, "cuda_emulator", "ablate_emulated.cpp")],
                           extra_cflags=flags, extra_ldflags=flags[1:2], build_directory=build,
                           is_python_module=False, verbose=False)
    yield torch.ops.weightablate_emulated
    del lib


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 5, 33, 20), (16, 64, 257, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_deltas_emulated_matches_cpu(emu, shape, dtype):
    args = pair_inputs(*shape, dtype=dtype)
    torch.testing.assert_close(emu.pair_deltas(*args), OPS.pair_deltas(*args), rtol=1e-14, atol=0)


@pytest.mark.parametrize("N,C,U,K", [(1, 1, 1, 1), (1, 3, 2, 5), (37, 10, 9, 23), (300, 101, 17, 9)])
@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("D", [0, 6])
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 50.0])
@pytest.mark.parametrize("flips", [True, False])
def test_score_deltas_emulated_matches_cpu(emu, N, C, U, K, head, D, scale, flips):
    args = score_inputs(N, C, U, K, D, scale=scale, head=head)
    assert_same_scores(emu.score_deltas(*args, flips, True), OPS.score_deltas(*args, flips, True))


def test_empty_inputs(emu):
    d, *rest = score_inputs(5, 4, 3, 2, 6)
    out = emu.score_deltas(d[:0], rest[0][:0], *rest[1:], True, True)
    assert [t.shape[0] for t in out] == [0] * 7
    args = pair_inputs(3, 4, 0, 2)
    assert emu.pair_deltas(*args).shape == (2, 0)


@pytest.mark.parametrize("which", ["rows", "cols"])
def test_pair_deltas_out_of_range_index_stops_the_kernel(emu, which):
    a_t, z_t, rows, cols, *rest = pair_inputs(4, 5, 10, 6)
    if which == "rows":
        rows = rows.clone()
        rows[3] = 4
    else:
        cols = cols.clone()
        cols[0] = -1
    with pytest.raises(RuntimeError, match="assertion"):
        emu.pair_deltas(a_t, z_t, rows, cols, *rest)


@pytest.mark.parametrize("which", ["unit", "labels", "slot"])
def test_score_deltas_out_of_range_index_stops_the_kernel(emu, which):
    d, unit, V, probs, logits, labels, moments, slot = score_inputs(20, 7, 5, 4, 6)
    if which == "unit":
        unit = unit.clone()
        unit[1] = 5
    elif which == "labels":
        labels = labels.clone()
        labels[7] = 7
    else:
        slot = slot.clone()
        slot[unit[0]] = moments.shape[1]
    with pytest.raises(RuntimeError, match="assertion"):
        emu.score_deltas(d, unit, V, probs, logits, labels, moments, slot, True)


@pytest.fixture
def cpu_runs_emulated(emu, monkeypatch):
    """backend="cpu" in the library runs the emulated CUDA kernels instead of the CPU ones; yields
    the number of emulated calls so far (a list, so a test can check they happened)."""
    monkeypatch.setattr(closed_form, "MOMENT_MIN_CLASSES", 0)  # the moment path too, on 10 classes
    pair, score, calls = ops.pair_deltas, ops.score_deltas, []

    def route(real, emulated):
        def call(backend, *args):
            if backend != "cpu":
                return real(backend, *args)
            calls.append(emulated)
            return emulated(*args)
        return call

    monkeypatch.setattr(ops, "pair_deltas", route(pair, emu.pair_deltas))
    monkeypatch.setattr(ops, "score_deltas", route(score, emu.score_deltas))
    monkeypatch.setattr(ops, "fused_scores", route(ops.fused_scores, emu.fused_scores))
    yield calls


@pytest.mark.parametrize("head", ["logits", "relu", "leaky", "batchnorm", "gelu"])
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_emulated_matches_float64_oracle(cpu_runs_emulated, head, mode):
    torch.manual_seed(2)
    X, y = digits(300)
    model, layer = make(head)
    trained(model, X, y, steps=50)
    idx = torch.randperm(model.get_submodule(layer).weight.numel())[:60]
    ref = oracle(model, layer, X, y, idx)
    r = wa.ablate(model, layer, (X, y), weights=idx, backend="cpu", mode=mode, precision="float64", progress=False)
    assert cpu_runs_emulated, "the emulated kernels did not run"
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all()
    assert torch.equal(r.flips, ref["flips"]) and torch.equal(r.exact_zero, ref["exact_zero"])


def test_no_out_of_bounds_access():
    """The tests above again, in a subprocess with the kernels built under AddressSanitizer: a read
    or write outside any tensor the kernels were given fails it."""
    if ASAN_ENV in os.environ:
        pytest.skip("this is the instrumented run itself")
    gcc = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
           for lib in ("libasan.so", "libstdc++.so.6")]  # libstdc++ too, or ASan cannot intercept throw
    if not os.path.isabs(gcc[0]):
        pytest.skip("gcc has no AddressSanitizer runtime here")
    env = dict(os.environ, LD_PRELOAD=" ".join(gcc), ASAN_OPTIONS="detect_leaks=0", **{ASAN_ENV: "1"})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", __file__,
                          "-k", "not oracle and not out_of_bounds"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and " passed" in out, out[-4000:]


@pytest.mark.parametrize("case", [c for c in ANY_LAYER if c[4] in ("funnel", "piecewise")],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_emulated_any_layer_matches_float64_oracle(cpu_runs_emulated, case):
    """The conv funnel and the BatchNorm head through the emulated kernels, as test_any_layer."""
    name, layer, param, _, method = case
    model, (X, y) = get_model(name)
    idx, ref = reference(case)
    r = wa.ablate(model, layer, (X, y), idx, param=param, precision="float64", backend="cpu", progress=False)
    assert cpu_runs_emulated, "the emulated kernels did not run"
    assert r.method == method, r.head
    ok, rel = close(r, ref, 1e-5)
    assert ok, rel.max()
    assert torch.equal(r.flips, ref["flips"]) and torch.equal(r.exact_zero, ref["exact_zero"])


# ------------------------------------------------------------------------- the fused kernel

FUSED_CASES = [  # I, J, N, C, K, scale, head
    (1, 1, 1, 2, None, 1.0, True),
    (7, 5, 33, 10, None, 0.02, True),
    (4, 40, 70, 101, None, 0.05, True),  # whole rows: the CPU kernel's row path
    (4, 40, 70, 101, None, 1.5, True),  # large d: the exact loop
    (16, 24, 60, 30, 150, 0.3, True),  # a sparse selection
    (3, 33, 20, 1000, None, 0.02, True),
    (10, 20, 50, 10, None, 0.3, False),  # logits layer
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("by_class", [False, True])
def test_fused_scores_emulated_matches_cpu(emu, case, dtype, by_class):
    from test_fused import assert_same_scores as same_fused
    from test_fused import fused_inputs, with_moments

    I, J, N, C, K, scale, head = case
    args = fused_inputs(I, J, N, C, K, dtype=dtype, scale=scale, head=head, seed=J + C)
    extra = with_moments(args)
    got, ref = emu.fused_scores(*args, *extra, True, by_class), OPS.fused_scores(*args, *extra, True, by_class)
    same_fused(got[:7], ref[:7])
    assert torch.equal(got[7], ref[7]) and torch.equal(got[8], ref[8])  # the same pairs on the exact loop
    if head:  # units without moments: every active pair on the exact loop
        none = emu.fused_scores(*args, None, None, None, True, by_class)
        assert torch.equal(none[7], none[8])
        same_fused(none[:7], ref[:7])


def test_fused_scores_emulated_out_of_range_stops_the_kernel(emu):
    from test_fused import fused_inputs, with_moments

    args = fused_inputs(3, 4, 10, 5, scale=0.1)
    extra = with_moments(args)
    args[11] = args[11].clone()
    args[11][2] = 5  # a label out of range
    with pytest.raises(RuntimeError, match="assertion"):
        emu.fused_scores(*args, *extra, True, False)


def test_emulated_fused_whole_rows_match_float64_oracle(cpu_runs_emulated):
    """ablate on whole rows takes fused_scores: here the emulated CUDA kernel."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 30)).eval()
    X, y = torch.randn(60, 12) * 2, torch.randint(0, 30, (60,))
    r = wa.ablate(model, "2", (X, y), backend="cpu", precision="float64", progress=False)
    assert r.extra["fused"] and cpu_runs_emulated, "the emulated fused kernel did not run"
    pick = torch.linspace(0, len(r) - 1, 50).long()
    ref = oracle(model, "2", X, y, r.indices[pick])
    err = (r.delta_loss[pick] - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all()
    assert torch.equal(r.flips[pick], ref["flips"]) and torch.equal(r.exact_zero[pick], ref["exact_zero"])

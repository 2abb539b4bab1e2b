"""The fused whole-layer op (fused_scores): cpu kernel vs its PyTorch reference vs the two-stage
ops (pair_deltas + score_deltas), and ablate's fused path vs the float64 oracle."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle
from torch import nn

import weightablate as wa
from weightablate import _fused_reference, _reference, closed_form
from weightablate.fused import top_moments

OPS = torch.ops.weightablate


def assert_same_scores(got, ref):
    """Fused vs another implementation: float64 sums to rounding (added in another order: a sum
    that cancels keeps an absolute error of a few ulps of its largest terms), counts exactly."""
    for j in (0, 6):
        atol = 1e-13 * float(ref[j].abs().max()) if ref[j].numel() else 0.0
        torch.testing.assert_close(got[j], ref[j], rtol=1e-10, atol=atol + 1e-300)
    # KL ~ d^2 var / 2 inherits d * (rounding of E_p v): ~1e-16 / (|d| var) relative, 1e-10 at d = 1e-6
    torch.testing.assert_close(got[1], ref[1], rtol=1e-8, atol=1e-300)
    for g, r in zip(got[2:6], ref[2:6]):
        assert torch.equal(g, r)


def fused_inputs(I, J, N, C, K=None, dtype=torch.float32, scale=1.0, seed=0, head=True, shuffle=False):
    """Whole rows (K=None) or K random weights sorted by row; d crosses the kink (z and a of both signs)."""
    g = torch.Generator().manual_seed(seed)
    a_t = (torch.relu(torch.randn(J, N, generator=g)) * torch.randn(J, 1, generator=g).sign()).to(dtype)
    z_t = torch.randn(I, N, generator=g).to(dtype)
    flat = torch.arange(I * J) if K is None else torch.randperm(I * J, generator=g)[:K].sort().values
    if shuffle:
        flat = flat[torch.randperm(flat.numel(), generator=g)]
    rows, cols = flat // J, flat % J
    w = (torch.randn(flat.numel(), generator=g) * scale).to(dtype)
    if head:
        gain = torch.rand(I, generator=g, dtype=torch.float64) + 0.5
        shift = torch.randn(I, generator=g, dtype=torch.float64) * 0.1
        slope = torch.rand(I, generator=g, dtype=torch.float64) * 0.2
        slope[: I // 2] = 0.0  # ReLU units: d = 0 on the flat side
    else:  # the target is the logits layer: I = C, d = -w a
        gain, shift, slope = (torch.ones(I, dtype=torch.float64), torch.zeros(I, dtype=torch.float64),
                              torch.ones(I, dtype=torch.float64))
    logits = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    if N > 2:
        logits[0] *= 30  # a confident sample: q = 1 - p_top ~ 1e-40
        logits[1, :] = 0.0  # ties: argmax takes the first
    probs = torch.softmax(logits, 1)
    labels = torch.randint(0, C, (N,), generator=g)
    V = torch.randn(I, C, generator=g, dtype=torch.float64) * 0.3 + 2.0 if head else None  # offset: raw moments cancel
    return [a_t, z_t, rows, cols, w, gain, shift, slope, V, probs, logits, labels]


def with_moments(args, order=6, slots="all"):
    V, probs, logits, labels = args[8:12]
    if V is None or slots is None:
        return [None, None, None]
    I = V.shape[0]
    slot = torch.arange(I) if slots == "all" else torch.where(torch.arange(I) % 2 == 0, torch.arange(I) // 2, -1)
    mom, gap = top_moments(V, slot, probs, logits, labels, order)
    return [mom, gap, slot]


def two_stage(args, flips=True, by_class=True):
    d = _reference.pair_deltas(*args[:8])
    return _reference.score_deltas(d, args[2], args[8], *args[9:12], None, None, flips, by_class)


CASES = [  # I, J, N, C, K, scale, head
    (1, 1, 1, 2, None, 1.0, True),
    (3, 5, 1, 3, None, 0.1, True),
    (7, 5, 33, 10, None, 0.02, True),
    (16, 24, 300, 101, None, 1e-3, True),
    (16, 24, 300, 101, None, 0.1, True),
    (16, 24, 300, 101, 200, 3.0, True),  # large d: most pairs take the exact loop
    (6, 9, 517, 2, None, 0.3, True),  # two tiles and a remainder, C = 2
    (4, 3, 40, 1000, None, 0.05, True),
    (10, 20, 100, 10, None, 0.3, False),  # logits layer
    (5, 7, 60, 1, None, 1.0, True),  # one class: nothing changes
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference_and_two_stage(case, dtype):
    I, J, N, C, K, scale, head = case
    args = fused_inputs(I, J, N, C, K, dtype=dtype, scale=scale, head=head)
    extra = with_moments(args)
    got = OPS.fused_scores(*args, *extra, True, True)
    ref = _fused_reference.fused_scores(*args, *extra, True, True)
    assert_same_scores(got[:7], ref[:7])
    assert torch.equal(got[7], ref[7]) and torch.equal(got[8], ref[8])  # the same pairs took the exact loop
    assert_same_scores(got[:7], two_stage(args))
    assert torch.equal(got[8], (_reference.pair_deltas(*args[:8]) != 0).sum(1))
    torch.testing.assert_close(got[6].sum(1), got[0], rtol=1e-10, atol=1e-300)
    assert (got[1] >= 0).all()


def test_moment_path_runs_and_large_d_falls_back():
    small = fused_inputs(16, 24, 300, 101, scale=1e-3)
    got = OPS.fused_scores(*small, *with_moments(small), True, False)
    assert got[8].sum() > 1000 and got[7].sum() <= 0.01 * got[8].sum()  # nearly every pair certified
    large = fused_inputs(16, 24, 300, 101, scale=3.0)
    got = OPS.fused_scores(*large, *with_moments(large), True, False)
    assert got[7].sum() >= 0.5 * got[8].sum()
    assert_same_scores(got[:7], two_stage(large, by_class=False))


def test_units_without_moments_and_unsorted_rows():
    """slot -1 units take the exact loop for every pair; runs may be short and repeat a unit."""
    args = fused_inputs(8, 6, 80, 20, scale=0.05, shuffle=True)
    extra = with_moments(args, slots="even")
    got = OPS.fused_scores(*args, *extra, True, True)
    odd = args[2] % 2 == 1
    assert torch.equal(got[7][odd], got[8][odd])
    assert_same_scores(got[:7], _fused_reference.fused_scores(*args, *extra, True, True)[:7])
    assert_same_scores(got[:7], two_stage(args))
    none = OPS.fused_scores(*args, None, None, None, True, True)
    assert torch.equal(none[7], none[8])
    assert_same_scores(none[:7], got[:7])


@pytest.mark.parametrize("order", [2, 4, 8])
def test_moment_orders(order):
    args = fused_inputs(6, 10, 70, 30, scale=0.01)
    got = OPS.fused_scores(*args, *with_moments(args, order), True, False)
    assert_same_scores(got[:7], two_stage(args, by_class=False))


def test_top_moments_match_their_definition():
    args = fused_inputs(5, 2, 50, 13)
    V, probs, logits, labels = args[8:12]
    mom, gap = top_moments(V, torch.arange(5), probs, logits, labels, 4)
    w = V[:, None, :] - V[:, logits.argmax(1)].unsqueeze(2)  # (I, N, C): v_c - v_top
    for k in range(4):
        torch.testing.assert_close(mom[k], (probs[None] * w ** (k + 1)).sum(2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gap, V @ probs.t() - V[:, labels], rtol=1e-12, atol=1e-12)


def test_flags_and_empty():
    args = fused_inputs(4, 5, 30, 7, scale=0.5)
    extra = with_moments(args)
    no = OPS.fused_scores(*args, *extra, False, False)
    assert (no[2] == 0).all() and no[6].shape == (20, 0)
    empty = list(args)
    empty[2:5] = [args[2][:0], args[3][:0], args[4][:0]]
    out = OPS.fused_scores(*empty, *extra, True, True)
    assert all(t.shape[0] == 0 for t in out)


def test_bad_arguments_name_the_argument():
    args = fused_inputs(4, 5, 30, 7)
    extra = with_moments(args)
    bad = list(args)
    bad[2] = args[2] + 4
    with pytest.raises(RuntimeError, match="rows out of range"):
        OPS.fused_scores(*bad, *extra, True, False)
    with pytest.raises(RuntimeError, match="mean_gap"):
        OPS.fused_scores(*args, extra[0], None, extra[2], True, False)


def test_opcheck():
    args = fused_inputs(3, 4, 20, 5, scale=0.1)
    torch.library.opcheck(OPS.fused_scores, (*args, *with_moments(args), True, True))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(I=st.integers(1, 6), J=st.integers(1, 8), N=st.integers(1, 40), C=st.integers(2, 12),
       frac=st.floats(0.1, 1.0), scale=st.sampled_from([1e-4, 1e-2, 0.3, 5.0]), head=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_fused_vs_two_stage(I, J, N, C, frac, scale, head, seed):
    if not head:
        I = C
    K = max(1, int(frac * I * J))
    args = fused_inputs(I, J, N, C, K, scale=scale, head=head, seed=seed)
    got = OPS.fused_scores(*args, *with_moments(args), True, True)
    assert_same_scores(got[:7], two_stage(args))


# ------------------------------------------------------------------------- the kernel's row path
# Runs of >= 32 consecutive inputs of a unit with moments (csrc/cpu/fused_cpu.cpp: kRowMin) take the
# row path (lanes across the run's weights, kGroup samples per pass, thresholds on d); shorter or
# scattered runs and units without moments the tile path. Both against the reference and two stages.

ROW_CASES = [  # I, J, N, C, K, scale
    (3, 32, 9, 2, None, 0.1),  # the shortest row run, C = 2, tail samples one at a time
    (5, 40, 61, 10, None, 0.05),
    (4, 48, 130, 1000, None, 0.02),  # C = 1000: flips resolved among the near classes
    (6, 64, 77, 101, None, 1e-3),
    (6, 64, 77, 101, None, 1.5),  # large d: the certificate fails, exact loop
    (4, 33, 50, 30, 100, 0.3),  # sparse selection: tile path
]


@pytest.mark.parametrize("case", ROW_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_path_matches_reference_and_two_stage(case, dtype):
    I, J, N, C, K, scale = case
    args = fused_inputs(I, J, N, C, K, dtype=dtype, scale=scale, seed=J + C)
    extra = with_moments(args)
    got = OPS.fused_scores(*args, *extra, True, False)
    ref = _fused_reference.fused_scores(*args, *extra, True, False)
    assert_same_scores(got[:7], ref[:7])
    assert torch.equal(got[7], ref[7]) and torch.equal(got[8], ref[8])
    assert_same_scores(got[:7], two_stage(args, by_class=False))
    # by_class keeps the tile path: the same sums
    bc = OPS.fused_scores(*args, *extra, True, True)
    assert_same_scores((*bc[:6], bc[6].sum(1)), (*got[:6], got[0]))


def test_row_path_units_off_kink_and_fallback():
    """ReLU units off for most samples (skipped), units on the kink (u ~ 0, small weights cross it),
    leaky units (never skipped), and pairs whose d is large enough to force the exact loop."""
    I, J, N, C = 8, 40, 120, 50
    args = fused_inputs(I, J, N, C, scale=0.3, seed=5)
    z_t = args[1]
    z_t[:2] = -3.0 - z_t[:2].abs()  # off for every sample: skipped unless a weight turns it on
    z_t[2] = z_t[2] * 1e-3  # on the kink: d crosses it for many pairs
    args[4][: J * 2] *= 40.0  # rows 0-1: large weights turn the unit on: exact loop, flips
    extra = with_moments(args)
    got = OPS.fused_scores(*args, *extra, True, False)
    ref = _fused_reference.fused_scores(*args, *extra, True, False)
    assert_same_scores(got[:7], ref[:7])
    assert torch.equal(got[7], ref[7]) and torch.equal(got[8], ref[8])
    assert got[7][: 2 * J].sum() > 0 and got[2].sum() > 0  # the fallback and flips were exercised
    assert_same_scores(got[:7], two_stage(args, by_class=False))


def test_row_path_nan_input_is_not_skipped():
    """A NaN input: no sample may be skipped on a bound that the NaN made meaningless."""
    args = fused_inputs(2, 32, 20, 5, scale=0.1, seed=1)
    args[1][:] = -5.0  # both units off
    args[0][3, 4] = float("nan")
    extra = with_moments(args)
    got = OPS.fused_scores(*args, *extra, True, False)
    ref = _fused_reference.fused_scores(*args, *extra, True, False)
    assert torch.equal(got[8], ref[8])
    torch.testing.assert_close(got[0], ref[0], equal_nan=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(I=st.integers(1, 4), J=st.integers(32, 70), N=st.integers(1, 30), C=st.integers(2, 40),
       full=st.booleans(), scale=st.sampled_from([1e-4, 1e-2, 0.3, 5.0]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_row_path_vs_two_stage(I, J, N, C, full, scale, seed, dtype):
    K = None if full else max(1, I * J // 2)
    args = fused_inputs(I, J, N, C, K, scale=scale, seed=seed, dtype=dtype)
    extra = with_moments(args)
    got = OPS.fused_scores(*args, *extra, True, False)
    ref = two_stage(args, by_class=False)
    # delta_loss: besides the sums' rounding, each pair's d (E_p v - v_y) differs by the rounding of
    # E_p v - v_y, ~eps max|v| (the two stages take it as a difference of two O(|v|) numbers), and by
    # the series' certified truncation (<= 1e-10 of the pair's KL): a weight whose delta_loss cancels
    # to ~1e-3 of these terms keeps them as its error
    d_abs = _reference.pair_deltas(*args[:8]).abs().sum(1)
    bound = 1e-10 * ref[0].abs() + 1e-13 * ref[0].abs().max() + 8e-16 * float(args[8].abs().max()) * d_abs
    assert ((got[0] - ref[0]).abs() <= bound + 1e-10 * ref[1] + 1e-300).all()
    torch.testing.assert_close(got[1], ref[1], rtol=1e-8, atol=1e-300)
    for g, r in zip(got[2:6], ref[2:6]):
        assert torch.equal(g, r)
    assert torch.equal(got[7], _fused_reference.fused_scores(*args, *extra, True, False)[7])


# ------------------------------------------------------------------------- ablate's fused path


def mlp(n_in, hidden, C, head="relu", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    act = {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(0.1)}[head]
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), act,
                         nn.Linear(hidden, C)).to(dtype).eval()


@pytest.mark.parametrize("C", [2, 10, 1000])
@pytest.mark.parametrize("layer", ["2", "4"])
def test_whole_rows_match_oracle(C, layer):
    """weights=None takes the fused path; float64 captures agree with the float64 naive loop."""
    model = mlp(12, 16, C, seed=C)
    X, y = torch.randn(64, 12) * 2, torch.randint(0, C, (64,))
    r = wa.ablate(model, layer, (X, y), precision="float64", batch_size=40, progress=False)
    assert r.extra["fused"] and r.extra["active_pairs"] > 0
    pick = torch.linspace(0, len(r) - 1, min(len(r), 160)).long()  # the oracle costs a forward per weight
    ref = oracle(model, layer, X, y, r.indices[pick])
    err = (r.delta_loss[pick] - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all(), err.max()
    assert torch.allclose(r.delta_kl[pick], ref["delta_kl"], rtol=1e-6, atol=1e-12)
    assert torch.equal(r.flips[pick], ref["flips"])
    assert torch.equal(r.exact_zero[pick], ref["exact_zero"])


@pytest.mark.parametrize("C,dtype,precision", [pytest.param(1000, torch.float32, "float64", marks=pytest.mark.slow),
                                               (2, torch.float64, "model"),
                                               (50, torch.float32, "model")])
def test_row_path_whole_rows_match_oracle(C, dtype, precision):
    """Hidden width 40: whole rows take the kernel's row path (runs of >= 32 inputs)."""
    model = mlp(12, 40, C, seed=C + 1, dtype=dtype)
    X, y = (torch.randn(70, 12) * 2).to(dtype), torch.randint(0, C, (70,))
    r = wa.ablate(model, "2", (X, y), precision=precision, batch_size=50, progress=False)
    assert r.extra["fused"] and r.extra["active_pairs"] > 0
    pick = torch.linspace(0, len(r) - 1, 60).long()  # the oracle costs a forward per weight
    ref = oracle(model, "2", X, y, r.indices[pick])
    err = (r.delta_loss[pick] - ref["delta_loss"]).abs()
    if dtype == torch.float64 or precision == "float64":
        assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all(), err.max()
        assert torch.allclose(r.delta_kl[pick], ref["delta_kl"], rtol=1e-6, atol=1e-12)
    else:  # the float32 model's own forward (docs/DESIGN.md: the float32 bound)
        assert (err <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"] + 1e-6).all(), err.max()
    assert torch.equal(r.flips[pick], ref["flips"])
    assert torch.equal(r.exact_zero[pick], ref["exact_zero"])


def two_stage_ablate(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(closed_form, "FUSED_MIN_RUN", 1 << 62)
        r = wa.ablate(*args, **kw)
    assert "fused" not in r.extra
    return r


@pytest.mark.parametrize("head", ["relu", "leaky"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [24, 40])  # 40: the row path
def test_fused_matches_two_stage_ablate(monkeypatch, head, dtype, hidden):
    model = mlp(10, hidden, 30, head=head, dtype=dtype)
    X, y = torch.randn(90, 10, dtype=dtype), torch.randint(0, 30, (90,))
    kw = dict(batch_size=50, progress=False, by_class=True)
    r = wa.ablate(model, "2", (X, y), **kw)
    assert r.extra["fused"]
    assert_same(r, two_stage_ablate(monkeypatch, model, "2", (X, y), **kw))
    exact = wa.ablate(model, "2", (X, y), mode="exact", **kw)  # mode="exact" keeps the O(C) loop
    assert "fused" not in exact.extra
    assert_same(r, exact)


def assert_same(a, b):
    torch.testing.assert_close(a.delta_loss, b.delta_loss, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(a.delta_kl, b.delta_kl, rtol=1e-8, atol=1e-16)
    torch.testing.assert_close(a.class_loss, b.class_loss, rtol=1e-9, atol=1e-14)
    for f in ("flips", "new_errors", "new_correct", "exact_zero"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_large_weights_fall_back_and_match_oracle():
    """Weights scaled up so d is large: the series cannot certify them, the exact loop scores them."""
    model = mlp(8, 12, 50, seed=3)
    with torch.no_grad():
        model[2].weight.mul_(40.0)
    X, y = torch.randn(50, 8), torch.randint(0, 50, (50,))
    r = wa.ablate(model, "2", (X, y), precision="float64", progress=False)
    assert r.extra["exact_fraction"] > 0.2
    pick = torch.arange(0, len(r), 2)
    ref = oracle(model, "2", X, y, r.indices[pick])
    err = (r.delta_loss[pick] - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all(), err.max()
    assert torch.equal(r.flips[pick], ref["flips"])


def test_sparse_selection_and_elementwise_keep_two_stage():
    model = mlp(8, 12, 5)
    X, y = torch.randn(30, 8), torch.randint(0, 5, (30,))
    assert "fused" not in wa.ablate(model, "2", (X, y), weights=10, progress=False).extra
    gelu = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 5))
    assert "fused" not in wa.ablate(gelu, "0", (X, y), progress=False).extra
    assert "fused" not in wa.ablate(model, "2", (X, y), param="bias", progress=False).extra


def test_result_that_would_not_fit_is_refused_before_the_sweep(monkeypatch):
    from weightablate import memory

    model = mlp(8, 12, 5)
    X, y = torch.randn(20, 8), torch.randint(0, 5, (20,))
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    with pytest.raises(MemoryError, match=r"weights: the result for 144 weights x 5 classes \(by_class=True\)"):
        wa.ablate(model, "2", (X, y), by_class=True, progress=False)
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # unknown: no check
    assert len(wa.ablate(model, "2", (X, y), progress=False)) == 144

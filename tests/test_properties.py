"""Hypothesis property tests of weightablate.ablate against an independent float64 oracle.

The oracle lives in this file on purpose (it does not use the library's naive backend): for each
selected weight it deep-copies the model to float64, zeroes that weight, evaluates every sample,
and takes the per-sample cross-entropy difference in float64.

Shapes are small (in 1..12 features, hidden 1..16, classes 1..7, samples 1..20) so each example is
milliseconds; C = 1, N = 1 and K = 1 are pinned with @example.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import weightablate as wa
from weightablate import closed_form

EPS64 = torch.finfo(torch.float64).eps
@pytest.fixture(autouse=True, scope="module")
def _moment_path_at_small_c():
    """These problems have at most 7 classes: keep the moment path (used from 16 classes) under test."""
    old = closed_form.MOMENT_MIN_CLASSES
    closed_form.MOMENT_MIN_CLASSES = 1
    yield
    closed_form.MOMENT_MIN_CLASSES = old


HEADS = ("logits", "relu", "leaky", "dropout_relu", "batchnorm_relu")
SETTINGS = settings(max_examples=int(os.environ.get("WA_PROPERTY_EXAMPLES", 25)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                    derandomize=False)


# ------------------------------------------------------------------------------------- the oracle


def oracle(model, layer, X, y, flat):
    """Per selected weight, all float64: summed CE change, sum of |per-sample CE change|, summed KL,
    flips, whether every logit stayed bitwise equal, and a bound on the oracle's own rounding
    error (it subtracts two losses of size ~|logits|, so it is only accurate to ~eps * |logits|
    per sample)."""
    ref = copy.deepcopy(model).double().eval()
    Xd = X.double()
    with torch.no_grad():
        base = ref(Xd)
    ce0 = F.cross_entropy(base, y, reduction="none")
    logp0 = F.log_softmax(base, 1)
    pred0 = base.argmax(1)
    out = {k: [] for k in ("delta_loss", "sum_abs", "delta_kl", "flips", "exact_zero", "err")}
    for idx in flat.tolist():
        m = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            m.get_submodule(layer).weight.view(-1)[idx] = 0.0
            logits = m(Xd)
        ce = F.cross_entropy(logits, y, reduction="none")
        diff = ce - ce0  # per sample, float64
        logp = F.log_softmax(logits, 1)
        out["delta_loss"].append(diff.sum().item())
        out["sum_abs"].append(diff.abs().sum().item())
        out["delta_kl"].append((logp0.exp() * (logp0 - logp)).sum().item())
        out["flips"].append(int((logits.argmax(1) != pred0).sum()))
        out["exact_zero"].append(bool(torch.equal(logits, base)))
        scale = base.abs().amax(1) + logits.abs().amax(1) + ce0 + ce + 1.0
        out["err"].append(64 * EPS64 * scale.sum().item())
    f64 = {"delta_loss", "sum_abs", "delta_kl", "err"}
    return {k: torch.tensor(v, dtype=torch.float64 if k in f64 else None) for k, v in out.items()}


U32 = 2.0**-24  # float32 unit roundoff


def float32_budget(model, head, layer, X, flat):
    """Per selected weight: a rigorous first-order bound on how far an exact computation from the
    float32 model's *own* forward pass (what precision="model" captures) can be from the float64
    oracle, summed over samples. Zero where the float32 captures are exact.

    A float32 forward only knows each activation to ``gamma_n * sum|terms|`` (absolute, n terms):
    the target's input (a hidden activation, for the logits target), the unit's pre-activation
    near the ReLU kink (then d = -u is itself a rounded activation), and the logits (they move
    the softmax). Per sample: |dCE/dd| * err(d) + sum_c |p'_c - p_c| * err(l_c), with
    |dCE/dd| <= range(v) and sum_c |p' - p| <= min(2, 2 |d| range(v)).
    """
    m = copy.deepcopy(model).double().eval()
    x = X.double()
    first, last = m[0], m[len(m) - 1]
    W1, b1, V, b2 = first.weight.detach(), first.bias.detach(), last.weight.detach(), last.bias.detach()
    n_in, hidden, n_cls = W1.shape[1], W1.shape[0], V.shape[0]
    g = lambda n: n * U32 / (1 - n * U32)  # noqa: E731
    z = x @ W1.T + b1
    dz = g(n_in + 1) * (x.abs() @ W1.abs().T + b1.abs())
    gain, shift, slope = torch.ones(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64), 0.0
    for mod in list(m)[1:-1]:
        if isinstance(mod, nn.BatchNorm1d):
            gain = mod.weight.detach() / torch.sqrt(mod.running_var + mod.eps)
            shift = mod.bias.detach() - mod.running_mean * gain
        elif isinstance(mod, nn.LeakyReLU):
            slope = mod.negative_slope
    u = gain * z + shift
    du = gain.abs() * dz + 4 * U32 * ((gain * z).abs() + shift.abs())
    act = lambda t: torch.where(t > 0, t, slope * t)  # noqa: E731
    h = act(u)
    dh = torch.where(u < -du, slope * du, du)  # exactly 0 when ReLU kills it in both precisions
    dl = g(hidden + 1) * (h.abs() @ V.abs().T + b2.abs()) + dh @ V.abs().T  # (N, C)
    dl_max = dl.amax(1)
    out = []
    for idx in flat.tolist():
        if head == "logits":
            i, j = divmod(idx, hidden)
            w = V[i, j].item()
            d = -w * h[:, j]
            err_d = abs(w) * dh[:, j]
            rng = 1.0 if n_cls > 1 else 0.0
        else:
            i, j = divmod(idx, n_in)
            w = W1[i, j].item()
            up = u[:, i] - gain[i] * w * x[:, j]
            d = act(up) - act(u[:, i])
            near = ((u[:, i] > 0) != (up > 0)) | (u[:, i].abs() <= du[:, i]) | (up.abs() <= du[:, i])
            err_d = torch.where(near, 2 * du[:, i], torch.zeros_like(d))
            v = V[:, i]
            rng = (v.max() - v.min()).item()
        per_sample = rng * err_d + torch.clamp(2 * d.abs() * rng, max=2.0) * dl_max
        out.append(per_sample.sum().item())
    return torch.tensor(out, dtype=torch.float64)


def _self_check_oracle():
    """The oracle against a hand computation on a 1-unit logits layer."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
        lin.bias.zero_()
    X, y = torch.tensor([[1.0, 1.0]]), torch.tensor([0])
    o = oracle(nn.Sequential(lin), "0", X, y, torch.tensor([1]))
    l0, l1 = torch.tensor([3.0, -0.5], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    want = F.cross_entropy(l1[None], y) - F.cross_entropy(l0[None], y)
    assert math.isclose(o["delta_loss"].item(), want.item(), rel_tol=1e-14)
    assert o["flips"].tolist() == [0] and o["exact_zero"].tolist() == [False]


def test_oracle_itself():
    _self_check_oracle()


# ------------------------------------------------------------------------------- random problems


@st.composite
def problems(draw):
    n_in = draw(st.integers(1, 12))
    hidden = draw(st.integers(1, 16))
    n_cls = draw(st.integers(1, 7))
    n = draw(st.integers(1, 20))
    head = draw(st.sampled_from(HEADS))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))
    zero_col = draw(st.booleans())  # an input feature of the target that is zero on every sample
    dead_unit = draw(st.booleans())  # a hidden unit that the ReLU kills on every sample
    rows, cols = (n_cls, hidden) if head == "logits" else (hidden, n_in)
    k = draw(st.integers(1, min(rows * cols, 24)))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3, unique=True))) if n > 1 else []
    return dict(n_in=n_in, hidden=hidden, n_cls=n_cls, n=n, head=head, seed=seed, scale=scale,
                zero_col=zero_col, dead_unit=dead_unit, k=k, cuts=cuts)


def build(p):
    """(model, layer, X, y, flat, batches) of a problem, deterministic in p["seed"]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["seed"])
        n_in, hidden, n_cls = p["n_in"], p["hidden"], p["n_cls"]
        first = nn.Linear(n_in, hidden)
        last = nn.Linear(hidden, n_cls)
        if p["head"] in ("logits", "relu"):
            mid = [nn.ReLU()]
        elif p["head"] == "leaky":
            mid = [nn.LeakyReLU(float(torch.empty(()).uniform_(0.01, 0.3)))]
        elif p["head"] == "dropout_relu":
            mid = [nn.Dropout(0.4), nn.ReLU()]
        else:
            bn = nn.BatchNorm1d(hidden)
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.3, 2.0)
                bn.weight.uniform_(0.3, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
            mid = [bn, nn.ReLU()]
        with torch.no_grad():
            first.weight.mul_(2.0)
            last.weight.mul_(p["scale"])
            if p["dead_unit"]:
                first.bias[0] = -100.0
        model = nn.Sequential(first, *mid, last).train()  # ablate must evaluate it in eval mode
        X = torch.randn(p["n"], n_in)
        if p["zero_col"]:
            X[:, 0] = 0.0
        y = torch.randint(0, n_cls, (p["n"],))
        layer = str(len(mid) + 1) if p["head"] == "logits" else "0"
        numel = model.get_submodule(layer).weight.numel()
        flat = torch.randperm(numel)[: p["k"]]  # any order, not sorted
    edges = [0, *p["cuts"], p["n"]]
    batches = [(X[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    return model, layer, X, y, flat, batches


# Pinned corners: one class, one sample, one weight, each head.
CORNERS = [
    dict(n_in=3, hidden=4, n_cls=1, n=5, head="relu", seed=1, scale=1.0, zero_col=False, dead_unit=False, k=6,
         cuts=[2]),
    dict(n_in=3, hidden=4, n_cls=3, n=1, head="leaky", seed=2, scale=3.0, zero_col=True, dead_unit=True, k=12,
         cuts=[]),
    dict(n_in=5, hidden=6, n_cls=4, n=9, head="batchnorm_relu", seed=3, scale=1.0, zero_col=False, dead_unit=True,
         k=1, cuts=[4]),
    dict(n_in=1, hidden=1, n_cls=1, n=1, head="logits", seed=4, scale=1.0, zero_col=False, dead_unit=False, k=1,
         cuts=[]),
    dict(n_in=4, hidden=5, n_cls=2, n=7, head="logits", seed=5, scale=3.0, zero_col=False, dead_unit=True, k=10,
         cuts=[1, 3]),
    dict(n_in=6, hidden=8, n_cls=7, n=12, head="dropout_relu", seed=6, scale=3.0, zero_col=True, dead_unit=True,
         k=24, cuts=[5]),
]


def with_corners(**extra):
    """@example for every pinned corner (``extra``: the test's other arguments)."""

    def deco(fn):
        for c in CORNERS:
            fn = example(p=c, **extra)(fn)
        return fn

    return deco


def assert_close(got, want, rtol, atol, what):
    got, want, atol = got.double(), want.double(), torch.as_tensor(atol, dtype=torch.float64)
    err = (got - want).abs()
    tol = rtol * want.abs() + atol
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} off; worst at {int((err - tol).argmax())}: "
                           f"got {got[bad].tolist()[:4]} want {want[bad].tolist()[:4]} tol {tol[bad].tolist()[:4]}")


# ------------------------------------------------------------------------------------- properties


@SETTINGS
@given(p=problems())
@with_corners()
@example(p=dict(n_in=2, hidden=1, n_cls=2, n=1, head="leaky", seed=1, scale=3.0, zero_col=False, dead_unit=True, k=1,
                cuts=[]))  # found by hypothesis: a confident sample, delta_kl = -1.5e-43 < 0
def test_float64_precision_matches_oracle(p):
    """(a) precision="float64": every backend and mode agrees with the float64 oracle."""
    model, layer, X, y, flat, batches = build(p)
    o = oracle(model, layer, X, y, flat)
    for backend in ("cpu", "torch"):
        for mode in ("auto", "exact"):
            r = wa.ablate(model, layer, batches, flat, precision="float64", backend=backend, mode=mode)
            what = f"{backend}/{mode}/{p['head']}"
            assert torch.equal(r.indices, flat)
            assert r.n_samples == p["n"]
            assert r.delta_loss.dtype == torch.float64 and r.delta_kl.dtype == torch.float64
            assert_close(r.delta_loss, o["delta_loss"], 1e-9, 1e-12 * o["sum_abs"] + o["err"], what + " delta_loss")
            assert_close(r.delta_kl, o["delta_kl"], 1e-6, torch.clamp(o["err"], min=1e-13), what + " delta_kl")
            assert (r.delta_kl >= 0).all(), what
            assert r.flips.tolist() == o["flips"].tolist(), what + " flips"
            assert (r.new_errors + r.new_correct <= r.flips).all(), what
            assert r.exact_zero.tolist() == o["exact_zero"].tolist(), what + " exact_zero"
            # exactly zero where nothing changed
            assert (r.delta_loss[r.exact_zero] == 0).all() and (r.delta_kl[r.exact_zero] == 0).all()
            assert (r.flips[r.exact_zero] == 0).all()
    with torch.no_grad():
        base = copy.deepcopy(model).double().eval()(X.double())
    assert math.isclose(r.base_loss, F.cross_entropy(base, y).item(), rel_tol=1e-12, abs_tol=1e-15)
    assert r.base_accuracy == (base.argmax(1) == y).double().mean().item()


@SETTINGS
@given(p=problems())
@with_corners()
def test_model_precision_matches_oracle(p):
    """(b) default precision on the float32 model, against the float64 oracle of the same weights:
    within 1e-5 |oracle| + 1e-6 sum_n |dCE_n|, plus what the float32 forward itself cannot know
    (float32_budget: zero when the captured activations are exact, e.g. the inputs of a first layer
    away from the ReLU kink)."""
    model, layer, X, y, flat, batches = build(p)
    o = oracle(model, layer, X, y, flat)
    budget = float32_budget(model, p["head"], layer, X, flat)
    for backend in ("cpu", "torch"):
        r = wa.ablate(model, layer, batches, flat, backend=backend)
        assert r.precision == "model"
        assert_close(r.delta_loss, o["delta_loss"], 1e-5, 1e-6 * o["sum_abs"] + budget + o["err"],
                     f"{backend}/{p['head']} delta_loss")
        # a weight whose ablation changes no logit in float64 also changes none in float32
        assert (r.delta_loss[o["exact_zero"] & r.exact_zero] == 0).all()


@SETTINGS
@given(p=problems(), bs=st.sampled_from([1, 2, 3]))
@with_corners(bs=2)
def test_batching_does_not_matter(p, bs):
    """(c) batch_size=1, bs, 3, None and the drawn batch splits agree (float64 precision: only the
    forward pass's float64 rounding may differ between batchings)."""
    model, layer, X, y, flat, batches = build(p)
    o = oracle(model, layer, X, y, flat)
    ref = wa.ablate(model, layer, (X, y), flat, precision="float64", backend="cpu", batch_size=None)
    for data, size in (((X, y), 1), ((X, y), bs), ((X, y), 3), (batches, None), (batches, 2)):
        r = wa.ablate(model, layer, data, flat, precision="float64", backend="cpu", batch_size=size)
        what = f"batch_size={size} splits={p['cuts'] if data is batches else 'tuple'}"
        assert r.n_samples == p["n"], what
        assert_close(r.delta_loss, ref.delta_loss, 1e-12, 1e-15 + 1e-13 * o["sum_abs"], what + " delta_loss")
        assert_close(r.delta_kl, ref.delta_kl, 1e-12, 1e-15 + 1e-13 * o["delta_kl"].abs(), what + " delta_kl")
        assert torch.equal(r.flips, ref.flips), what
        assert torch.equal(r.exact_zero, ref.exact_zero), what


@SETTINGS
@given(p=problems())
@with_corners()
def test_batching_does_not_matter_in_float32(p):
    """With precision="model" the float32 forward rounds differently for different batch shapes;
    the results still agree within the accuracy promised for float32."""
    model, layer, X, y, flat, batches = build(p)
    o = oracle(model, layer, X, y, flat)
    budget = float32_budget(model, p["head"], layer, X, flat)
    a = wa.ablate(model, layer, (X, y), flat, backend="cpu", batch_size=1)
    b = wa.ablate(model, layer, batches, flat, backend="cpu")
    # each is within the float32 tolerance of the oracle, so they are within twice of each other
    assert_close(a.delta_loss, b.delta_loss, 2e-5, 2e-6 * o["sum_abs"] + 2 * budget + 2 * o["err"],
                 "float32 batching")


@SETTINGS
@given(p=problems(), perm_seed=st.integers(0, 2**16), precision=st.sampled_from(["model", "float64"]),
       mode=st.sampled_from(["auto", "exact"]))
@with_corners(perm_seed=7, precision="model", mode="auto")
def test_weight_order_does_not_matter(p, perm_seed, precision, mode):
    """(c) a permutation of the indices gives the permuted result: bitwise for the cpu kernel."""
    model, layer, X, y, flat, batches = build(p)
    perm = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(perm_seed))
    for backend in ("cpu", "torch"):
        a = wa.ablate(model, layer, batches, flat, backend=backend, precision=precision, mode=mode)
        b = wa.ablate(model, layer, batches, flat[perm], backend=backend, precision=precision, mode=mode)
        assert torch.equal(b.indices, a.indices[perm])
        assert torch.equal(b.weight, a.weight[perm])
        for name in ("flips", "new_errors", "new_correct", "exact_zero"):
            assert torch.equal(getattr(b, name), getattr(a, name)[perm]), (backend, name)
        for name in ("delta_loss", "delta_kl"):
            got, want = getattr(b, name), getattr(a, name)[perm]
            if backend == "cpu":
                assert torch.equal(got, want), (backend, name, (got - want).abs().max().item())
            else:
                assert_close(got, want, 1e-13, 1e-16, f"{backend} {name}")


@SETTINGS
@given(p=problems(), sub_seed=st.integers(0, 2**16), precision=st.sampled_from(["model", "float64"]))
@with_corners(sub_seed=3, precision="float64")
def test_weight_subset_does_not_matter_exact(p, sub_seed, precision):
    """(c) with mode="exact" the result for a subset of the weights is the corresponding entries
    of the full result, bitwise for the cpu kernel (and each weight alone too)."""
    model, layer, X, y, flat, batches = build(p)
    g = torch.Generator().manual_seed(sub_seed)
    keep = torch.randperm(flat.numel(), generator=g)[: int(torch.randint(1, flat.numel() + 1, (), generator=g))]
    full = wa.ablate(model, layer, batches, flat, backend="cpu", precision=precision, mode="exact")
    sub = wa.ablate(model, layer, batches, flat[keep], backend="cpu", precision=precision, mode="exact")
    one = wa.ablate(model, layer, batches, flat[keep[:1]], backend="cpu", precision=precision, mode="exact")
    for name in ("delta_loss", "delta_kl", "flips", "new_errors", "new_correct", "exact_zero", "weight", "rows",
                 "cols"):
        f = getattr(full, name)
        assert torch.equal(getattr(sub, name), f[keep]), name
        assert torch.equal(getattr(one, name), f[keep[:1]]), name


@SETTINGS
@given(p=problems(), sub_seed=st.integers(0, 2**16))
@with_corners(sub_seed=3)
@example(p=dict(n_in=6, hidden=14, n_cls=2, n=2, head="relu", seed=2, scale=0.5, zero_col=False, dead_unit=False,
                 k=22, cuts=[]), sub_seed=79)  # found by hypothesis: delta_kl of the O(C) loop off by 8e-9
def test_weight_subset_does_not_matter_auto(p, sub_seed):
    """(c) with mode="auto" a unit takes the moment path only when several chosen weights share it,
    so a subset may change which path scores a weight; both are certified to ~1e-10 of the KL, and
    flips/exact_zero do not depend on the path at all."""
    model, layer, X, y, flat, batches = build(p)
    g = torch.Generator().manual_seed(sub_seed)
    keep = torch.randperm(flat.numel(), generator=g)[: int(torch.randint(1, flat.numel() + 1, (), generator=g))]
    full = wa.ablate(model, layer, batches, flat, backend="cpu", precision="float64")
    sub = wa.ablate(model, layer, batches, flat[keep], backend="cpu", precision="float64")
    for name in ("flips", "new_errors", "new_correct", "exact_zero"):
        assert torch.equal(getattr(sub, name), getattr(full, name)[keep]), name
    o = oracle(model, layer, X, y, flat[keep])
    assert_close(sub.delta_loss, full.delta_loss[keep], 1e-9, 1e-12 * o["sum_abs"] + 1e-300, "subset delta_loss")
    assert_close(sub.delta_kl, full.delta_kl[keep], 1e-9, 1e-300, "subset delta_kl")


@SETTINGS
@given(p=problems())
@with_corners()
def test_int_selection_is_a_seeded_sorted_sample(p):
    model, layer, X, y, flat, batches = build(p)
    numel = model.get_submodule(layer).weight.numel()
    k = min(p["k"], numel)
    a = wa.ablate(model, layer, batches, k, seed=p["seed"] % 1000, backend="cpu", metrics="loss")
    b = wa.ablate(model, layer, batches, k, seed=p["seed"] % 1000, backend="cpu", metrics="loss")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.delta_loss, b.delta_loss)
    assert a.indices.numel() == k and torch.unique(a.indices).numel() == k
    assert (a.indices[1:] > a.indices[:-1]).all()
    assert ((0 <= a.indices) & (a.indices < numel)).all()
    full = wa.ablate(model, layer, batches, None, backend="cpu", metrics="loss", mode="exact")
    assert torch.equal(full.indices, torch.arange(numel))


# --------------------------------------------------------- delta_kl relative to itself (mpmath)


def _mp_kl(logits, shift):
    """sum_n KL(softmax(l_n) || softmax(l_n + shift_n)) with 60 significant digits."""
    import mpmath

    mpmath.mp.dps = 60
    total = mpmath.mpf(0)
    for l, s in zip(logits.tolist(), shift.tolist()):
        a = [mpmath.mpf(v) for v in l]
        b = [mpmath.mpf(v) + mpmath.mpf(t) for v, t in zip(l, s)]
        la, lb = mpmath.log(sum(mpmath.exp(v) for v in a)), mpmath.log(sum(mpmath.exp(v) for v in b))
        total += sum(mpmath.exp(x - la) * ((x - la) - (z - lb)) for x, z in zip(a, b))
    return float(total)


@pytest.mark.parametrize("gap", [10.0, 20.0, 30.0, 40.0])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_delta_kl_accurate_on_confident_predictions(gap, backend, mode):
    """delta_kl must be accurate relative to itself (docs/DESIGN.md: no cancellation), also when the
    model is confident and the KL of a small perturbation is tiny: KL ~ d^2 Var_p(v) / 2."""
    n_cls, n = 3, 4
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, n_cls)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.003], [0.5, -0.002]], dtype=torch.float64))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[gap / 2, 0.1], [-gap / 2, 0.2], [0.3, -gap / 3]], dtype=torch.float64))
        model[2].bias.zero_()
    X = torch.tensor([[1.0, 1.0], [1.5, 2.0], [0.75, 0.5], [2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2])
    flat = torch.tensor([1, 3])  # the small weights: both units stay positive, d = -w * a exactly
    r = wa.ablate(model, "0", (X, y), flat, backend=backend, mode=mode)
    with torch.no_grad():
        logits = model(X)
    V = model[2].weight.detach()
    for k, idx in enumerate(flat.tolist()):
        i, j = divmod(idx, 2)
        d = -model[0].weight[i, j].item() * X[:, j]  # (N,): exact products of the inputs
        truth = _mp_kl(logits, d[:, None] * V[:, i][None, :])
        got = r.delta_kl[k].item()
        assert got == pytest.approx(truth, rel=1e-6, abs=0), (gap, idx, got, truth)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("precision", ["model", "float64"])
def test_delta_kl_is_never_negative(backend, precision):
    """A KL divergence is >= 0; a very confident sample (loss ~ 100) and a small change must not
    make the O(C) loop return a negative one."""
    model = nn.Sequential(nn.Linear(2, 1), nn.LeakyReLU(0.2), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.73, -0.62]]))
        model[0].bias.fill_(-100.0)
        model[2].weight.copy_(torch.tensor([[1.4], [-2.8]]))
        model[2].bias.zero_()
    X, y = torch.tensor([[-0.45, -0.17]]), torch.tensor([0])
    r = wa.ablate(model, "0", (X, y), torch.tensor([1]), backend=backend, precision=precision, mode="exact")
    assert r.delta_kl.item() >= 0, r.delta_kl.item()
    with torch.no_grad():
        logits = model.double()(X.double())
    d = 0.2 * 0.62 * -0.17  # leaky side: d = slope * (-w a), w = -0.62, a = -0.17
    truth = _mp_kl(logits, torch.tensor([[d * 1.4, d * -2.8]], dtype=torch.float64))
    assert r.delta_kl.item() == pytest.approx(truth, rel=1e-3, abs=0)

"""weightablate against the float64 oracle (zero, evaluate, restore) on every closed-form head."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS
from oracle import oracle
from torch import nn

import weightablate as wa
from weightablate import closed_form


def digits(n=300):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-3)
    return X[:n].contiguous(), torch.tensor(y[:n])


class Custom(nn.Module):
    """Modules called in order from forward, not an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(64, 32), nn.ReLU()
        self.fc2, self.act2, self.drop = nn.Linear(32, 24), nn.ReLU(inplace=True), nn.Dropout(0.2)
        self.fc3 = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc3(self.drop(self.act2(self.fc2(self.act1(self.fc1(x))))))


def make(head: str) -> tuple[nn.Module, str]:
    body = [nn.Linear(64, 32), nn.ReLU()]
    tails = {
        "logits": [nn.Linear(32, 10)],
        "relu": [nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)],
        "leaky": [nn.Linear(32, 24), nn.LeakyReLU(0.05), nn.Linear(24, 10)],
        "dropout": [nn.Linear(32, 24), nn.Dropout(0.5), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(24, 10)],
        "batchnorm": [nn.Linear(32, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10)],
        "gelu": [nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 10)],
    }
    if head == "custom":
        return Custom(), "fc2"
    return nn.Sequential(*body, *tails[head]), "2"


def trained(model, X, y, steps=150):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


HEADS = ["logits", "relu", "leaky", "dropout", "batchnorm", "gelu", "custom"]
METHOD = {"logits": "logits", "gelu": "elementwise"}


@pytest.fixture(scope="module", params=[(h, t) for h in HEADS for t in ("random", "trained")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    head, kind = request.param
    torch.manual_seed(1)
    X, y = digits()
    model, layer = make(head)
    if kind == "trained":
        trained(model, X, y)
    idx = torch.randperm(model.get_submodule(layer).weight.numel())[:60]
    return model, layer, X, y, idx, oracle(model, layer, X, y, idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_float64_capture_matches_oracle(case, backend, mode):
    model, layer, X, y, idx, ref = case
    r = wa.ablate(model, layer, (X, y), weights=idx, backend=backend, mode=mode, precision="float64")
    assert r.method == METHOD.get(case[0] if isinstance(case[0], str) else "", r.method)
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all(), err.max()
    # the oracle's own KL (sum p (log p - log p')) cancels: its error is ~1e-16 |log p| per class
    assert torch.allclose(r.delta_kl, ref["delta_kl"], rtol=1e-6, atol=1e-12)
    assert torch.equal(r.flips, ref["flips"])
    assert torch.equal(r.exact_zero, ref["exact_zero"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_float32_model_within_stated_bound(case, backend, mode):
    """Default precision: the float32 activations' own rounding is the limit (the docstring's
    bound): |err| <= 1e-5 |delta| + 1e-4 sum_n |dCE_n|, and the typical error is float32-sized."""
    model, layer, X, y, idx, ref = case
    r = wa.ablate(model, layer, (X, y), weights=idx, backend=backend, mode=mode)
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"]).all()
    nz = ref["delta_loss"] != 0
    assert (err / ref["delta_loss"].abs())[nz].median() <= 1e-5
    assert torch.equal(r.exact_zero, ref["exact_zero"])
    assert not r.exact_zero[nz].any()
    assert torch.equal(r.flips, ref["flips"])


def test_cancellation_free_where_float32_naive_fails():
    """The point of the forms of docs/DESIGN.md: on a trained model the float32 naive loop reports zeros
    (or errors > 1e-3) for weights whose float64 delta is not zero; weightablate does not."""
    torch.manual_seed(0)
    X, y = digits(600)
    model, layer = make("relu")
    trained(model, X, y, steps=400)
    idx = torch.randperm(model.get_submodule(layer).weight.numel())[:200]
    ref = oracle(model, layer, X, y, idx)
    naive32 = wa.ablate(model, layer, (X, y), weights=idx, backend="naive")
    ours = wa.ablate(model, layer, (X, y), weights=idx)
    truth = ref["delta_loss"]
    nz = truth != 0
    rel = lambda r: (r.delta_loss - truth).abs() / truth.abs()  # noqa: E731
    bad32 = nz & ((naive32.delta_loss == 0) | (rel(naive32) > 1e-3))
    assert bad32.sum() >= 5, "the float32 naive loop should fail on a trained model"
    assert not (ours.delta_loss[bad32] == 0).any()
    assert (rel(ours)[bad32] <= 1e-3).all(), rel(ours)[bad32].max()
    assert rel(ours)[bad32].median() <= 1e-5
    exact = wa.ablate(model, layer, (X, y), weights=idx, precision="float64")
    err = (exact.delta_loss - truth).abs()
    assert (err <= 1e-9 * truth.abs() + ref["round"]).all()


def test_moment_path_agrees_with_exact_loop(monkeypatch):
    """Every weight of a layer: units share many weights, so the moment path runs."""
    torch.manual_seed(3)
    X, y = digits(200)
    model, layer = make("relu")
    calls = []
    real = closed_form._moments
    monkeypatch.setattr(closed_form, "_moments", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(closed_form, "MOMENT_MIN_CLASSES", 1)  # digits has 10 classes
    for backend in BACKENDS:
        auto = wa.ablate(model, layer, (X, y), backend=backend, precision="float64")
        exact = wa.ablate(model, layer, (X, y), backend=backend, mode="exact", precision="float64")
        assert torch.allclose(auto.delta_loss, exact.delta_loss, rtol=1e-9, atol=1e-15)
        assert torch.allclose(auto.delta_kl, exact.delta_kl, rtol=1e-8, atol=1e-15)
        assert torch.equal(auto.flips, exact.flips)
    assert calls, "the moment path did not run"


def test_few_classes_skip_the_moment_path(monkeypatch):
    """Below MOMENT_MIN_CLASSES mode="auto" scores every pair by the O(C) loop: no moments."""
    torch.manual_seed(3)
    X, y = digits(60)
    model, layer = make("relu")
    calls = []
    real = closed_form._moments
    monkeypatch.setattr(closed_form, "_moments", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(closed_form, "FUSED_MIN_RUN", 1 << 62)  # the two-stage path (tests/test_fused.py: fused)
    auto = wa.ablate(model, layer, (X, y), backend="cpu")
    assert not calls, "10 classes took the moment path"
    exact = wa.ablate(model, layer, (X, y), backend="cpu", mode="exact")
    assert torch.equal(auto.delta_loss, exact.delta_loss)
    monkeypatch.setattr(closed_form, "MOMENT_MIN_CLASSES", 10)
    wa.ablate(model, layer, (X, y), backend="cpu")
    assert calls, "the gate, not something else, kept the moments out"


def test_exact_zeros_are_reported():
    """A unit that ReLU kills on every input, and an input feature that is always zero."""
    torch.manual_seed(4)
    X, y = digits(100)
    X[:, 5] = 0.0
    model, layer = make("relu")
    with torch.no_grad():
        model[2].bias[7] = -1e4  # unit 7 is dead on every sample, ablated or not
    r = wa.ablate(model, layer, (X, y))
    w = model[2].weight
    zero = r.exact_zero.view(w.shape)
    assert zero[7].all() and (r.delta_loss.view(w.shape)[7] == 0).all()
    ref = oracle(model, layer, X, y, r.indices)
    assert torch.equal(r.exact_zero, ref["exact_zero"])


def test_backends_agree_on_all_weights():
    torch.manual_seed(5)
    X, y = digits(256)
    model, layer = make("leaky")
    trained(model, X, y, steps=50)
    res = [wa.ablate(model, layer, (X, y), backend=b) for b in BACKENDS]
    for r in res[1:]:
        assert torch.allclose(r.delta_loss, res[0].delta_loss, rtol=1e-10, atol=1e-15)
        assert torch.allclose(r.delta_kl, res[0].delta_kl, rtol=1e-10, atol=1e-15)
        for k in ("flips", "new_errors", "new_correct", "exact_zero"):
            assert torch.equal(getattr(r, k), getattr(res[0], k)), k


def test_new_errors_and_new_correct_partition_flips():
    torch.manual_seed(6)
    X, y = digits(300)
    model, layer = make("logits")
    r = wa.ablate(model, layer, (X, y))
    assert r.flips.sum() > 0
    assert (r.new_errors + r.new_correct <= r.flips).all()
    ref = wa.ablate(model, layer, (X, y), backend="naive", precision="float64", weights=r.indices[:40])
    for k in ("flips", "new_errors", "new_correct"):
        assert torch.equal(getattr(r, k)[:40], getattr(ref, k)), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_class_split(backend):
    """class_loss splits delta_loss by label in the same pass; rows sum to delta_loss."""
    torch.manual_seed(7)
    X, y = digits(300)
    model, layer = make("relu")
    trained(model, X, y, steps=50)
    r = wa.ablate(model, layer, (X, y), weights=50, backend=backend, by_class=True, precision="float64")
    ref = wa.ablate(model, layer, (X, y), weights=50, backend="naive", by_class=True, precision="float64")
    assert r.class_loss.shape == (50, 10) and r.class_loss.dtype == torch.float64
    torch.testing.assert_close(r.class_loss.sum(1), r.delta_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r.class_loss, ref.class_loss, rtol=1e-8, atol=1e-12)
    assert wa.ablate(model, layer, (X, y), weights=5, backend=backend).class_loss is None

"""Extremely confident models: logits scaled by 1e3 and 1e4, so that most classes' base
probabilities underflow to 0 in float64, and ablations that move such a class by a comparable
amount, up to making it the new argmax. Every scoring path (closed form, funnel, replay; cpu
kernel, PyTorch reference, the CUDA kernels under the host emulator; mode auto with the moment
path on, and exact) against the float64 naive loop."""
import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle
from test_correctness import digits
from test_cuda_emulated import cpu_runs_emulated, emu  # noqa: F401  (fixtures)
from torch import nn

import weightablate as wa
from weightablate import closed_form

UNDERFLOW = -745.2  # log of the smallest float64 subnormal: p = exp(log p) is 0 below it


class Funnel(nn.Module):
    """conv - ReLU - conv (the target) - BatchNorm - ReLU - global average pool - Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.c2(F.relu(self.c1(x.view(-1, 1, 8, 8))))))
        return self.fc(h.mean((2, 3)))


def constant_unit(first, second):
    """Unit 0 of ``second`` is 1 on every sample, through a constant input (``first``'s row 3, after a
    ReLU); zeroing second.weight[0, 3] turns it off."""
    with torch.no_grad():
        first.weight[3], first.bias[3] = 0.0, 1.0
        second.weight[0], second.bias[0] = 0.0, 0.0
        second.weight[0, 3] = 1.0


def mlp():
    """The head suppresses class 0 and boosts class 5 by the constant unit (x the scale): zeroing
    2.weight[0, 3] or 4.weight[5, 0] makes a class whose probability underflowed the argmax;
    4.weight[0, 0] moves one by +1.5 x the scale without a flip."""
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))
    constant_unit(m[0], m[2])
    with torch.no_grad():
        m[4].weight[:, 0] = 0.0
        m[4].weight[0, 0], m[4].weight[5, 0] = -1.5, 1.0
    return m, {"2": [3], "4": [5 * 24, 0]}


def funnel():
    """The same construction through a conv channel: c2's channel 0 is 1 everywhere but the border."""
    m = Funnel()
    with torch.no_grad():
        m.c1.weight[3], m.c1.bias[3] = 0.0, 1.0
        m.c2.weight[0], m.c2.bias[0] = 0.0, 0.0
        m.c2.weight[0, 3, 1, 1] = 1.0
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.running_mean[0], m.bn.running_var[0] = 0.0, 1.0 - m.bn.eps
        m.fc.weight[:, 0] = 0.0
        m.fc.weight[0, 0], m.fc.weight[5, 0] = -1.5, 1.0
    return m, {"c2": [3 * 9 + 4]}


def replay():
    """GELU and LayerNorm after the target: only replay applies. LayerNorm turns the constant unit
    into a large normalised value, with which the head suppresses class 0 and boosts class 5."""
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32),
                      nn.Linear(32, 10))
    constant_unit(m[0], m[2])
    with torch.no_grad():
        m[2].weight[0, 3] = 4.0
        m[5].weight[:, 0] = 0.0
        m[5].weight[0, 0], m[5].weight[5, 0] = -0.4, 0.3
    return m, {"2": [3]}


MODELS = {"mlp": mlp, "funnel": funnel, "replay": replay}
METHODS = {("mlp", "2"): "piecewise", ("mlp", "4"): "logits", ("funnel", "c2"): "funnel", ("replay", "2"): "replay"}
CASES = [(name, layer, scale) for name, layer in METHODS for scale in (1e3, 1e4)]


def underflow_flips(model, layer, X, flat):
    """Per weight: the samples whose new argmax is a class with base log-probability below UNDERFLOW."""
    m = copy.deepcopy(model).double()
    w = m.get_submodule(layer).weight.data.view(-1)
    X = X.double()
    out = []
    with torch.no_grad():
        base = m(X)
        logp = F.log_softmax(base, 1)
        for k in flat.tolist():
            keep = w[k].item()
            w[k] = 0.0
            now = m(X).argmax(1)
            w[k] = keep
            out.append(int(((now != base.argmax(1)) & (logp.gather(1, now[:, None])[:, 0] < UNDERFLOW)).sum()))
    return torch.tensor(out), float((logp < UNDERFLOW).double().mean())


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-x{c[2]:g}")
def case(request):
    name, layer, scale = request.param
    torch.manual_seed(3)
    X, y = digits(150)
    model, planted = MODELS[name]()
    model.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # the logits scaled: logit gaps of thousands
        head.weight *= scale
        head.bias *= scale
    numel = model.get_submodule(layer).weight.numel()
    rest = torch.tensor([k for k in torch.randperm(numel)[:24].tolist() if k not in planted[layer]])
    flat = torch.cat([torch.tensor(planted[layer]), rest])
    new_argmax, frac = underflow_flips(model, layer, X, flat)
    # the cases are what they claim: most probabilities underflow, and the first planted weight
    # flips samples to a class whose probability was 0
    assert frac > 0.3 and new_argmax[0] > 0, (frac, new_argmax)
    return model, layer, METHODS[name, layer], X, y, flat, oracle(model, layer, X, y, flat)


def check(r, ref, method):
    assert r.method == method, r.head
    for key in ("delta_loss", "delta_kl"):
        got = getattr(r, key)
        assert torch.isfinite(got).all(), (key, got)
        err = (got - ref[key]).abs()
        # the oracle subtracts losses of logits in the thousands: its own rounding is ref["round"]
        assert (err <= 1e-9 * ref[key].abs() + ref["round"]).all(), (key, (err / ref[key].abs()).max())
    assert torch.equal(r.flips, ref["flips"])
    assert torch.equal(r.exact_zero, ref["exact_zero"])


@pytest.fixture
def moments_everywhere(monkeypatch):
    """mode="auto" on the cpu kernel takes the moment path on 10 classes too."""
    monkeypatch.setattr(closed_form, "MOMENT_MIN_CLASSES", 0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_underflowing_classes_match_float64_loop(case, backend, mode, moments_everywhere):
    model, layer, method, X, y, flat, ref = case
    r = wa.ablate(model, layer, (X, y), flat, backend=backend, mode=mode, precision="float64", progress=False)
    check(r, ref, method)


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_underflowing_classes_emulated_cuda(case, mode, cpu_runs_emulated):
    model, layer, method, X, y, flat, ref = case
    r = wa.ablate(model, layer, (X, y), flat, backend="cpu", mode=mode, precision="float64", progress=False)
    assert cpu_runs_emulated or method == "replay", "the emulated kernels did not run"
    check(r, ref, method)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("head", [True, False])
def test_zero_probability_class_becomes_the_argmax(backend, head):
    """score_deltas itself: classes at p = 0 (logit gaps 2000 and 3000) moved by +2500 and +3500
    become the argmax, through a head column or as the logits layer's own unit."""
    from weightablate import ops

    logits = torch.tensor([[0.0, -2000.0, -1.0], [5.0, 3.0, -3000.0]], dtype=torch.float64)
    probs, labels = F.softmax(logits, 1), torch.tensor([1, 0])
    assert (probs == 0).sum() == 2
    if head:  # pair 0 moves sample 0 along column [0, 1, 0], pair 1 sample 1 along [0, 0, -1]
        rows, unit = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64), torch.tensor([0, 1])
        d = torch.tensor([[2500.0, 0.0], [0.0, -3500.0]], dtype=torch.float64)
        v = rows[unit]
    else:
        rows, unit = None, torch.tensor([1, 2])
        d = torch.tensor([[2500.0, 0.0], [0.0, 3500.0]], dtype=torch.float64)
        v = F.one_hot(unit, 3).double()
    new = logits[None] + d[:, :, None] * v[:, None, :]
    ce = F.cross_entropy(new.reshape(-1, 3), labels.repeat(2), reduction="none").view(2, 2)
    want_loss = (ce - F.cross_entropy(logits, labels, reduction="none")).sum(1)
    logp = F.log_softmax(logits, 1)
    want_kl = (probs * (logp - F.log_softmax(new, 2))).sum((1, 2))
    out = ops.score_deltas(backend, d, unit, rows, probs, logits, labels)
    torch.testing.assert_close(out[0], want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out[1], want_kl, rtol=1e-12, atol=0)
    assert out[2].tolist() == [1, 1] and out[4].tolist() == [1, 0]

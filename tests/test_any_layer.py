"""Any Linear or Conv2d layer of any traceable model, weights and biases: the closed form, the
channel funnel and replay against the float64 oracle (zero, evaluate, restore).

Small inputs and a few weights per model keep this file to a couple of minutes on 2 cores."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import oracle
from torch import nn

import weightablate as wa
from weightablate.result import load


def randomize_bn(model):
    """Eval-mode BatchNorm with non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.out(F.relu(h))


class GroupedNet(nn.Module):
    """A grouped conv (groups=2), a depthwise conv, max-pool with padding, a concatenation."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        c = torch.cat([self.dw(b), a[:, :, ::2, ::2]], 1)  # the slice takes the generic path
        return self.fc(torch.flatten(self.pool(c), 1))


class FunnelNet(nn.Module):
    """ResNet's tail with a biased conv: conv -> BN -> + skip -> ReLU -> global pool -> flatten -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool, self.drop, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.3), nn.Linear(6, 5)

    def forward(self, x):
        s = F.relu(self.stem(x))
        h = F.relu(self.bn(self.conv(s)) + s)
        return self.fc(self.drop(self.pool(h).flatten(1)))


def images(n, size, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _models():
    torch.manual_seed(0)
    return {
        "alexnet": (lambda: torchvision.models.alexnet().eval(), images(3, 64, 1000)),
        "vgg11_bn": (lambda: randomize_bn(torchvision.models.vgg11_bn(num_classes=20)), images(3, 32, 20)),
        "resnet18": (lambda: randomize_bn(torchvision.models.resnet18(num_classes=50)), images(3, 64, 50)),
        "mobilenet_v3_small": (lambda: randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=20)),
                               images(3, 32, 20)),
        "residual_mlp": (lambda: ResidualMLP().eval(), (torch.randn(40, 16), torch.randint(0, 5, (40,)))),
        "bn1d_head": (lambda: randomize_bn(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20),
                                                        nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5))),
                      (torch.randn(40, 16), torch.randint(0, 5, (40,)))),
        "gelu_head": (lambda: nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20), nn.GELU(),
                                            nn.Linear(20, 5)).eval(),
                      (torch.randn(40, 16), torch.randint(0, 5, (40,)))),
        "grouped": (lambda: GroupedNet().eval(), images(6, 16, 4)),
        "funnel_net": (lambda: randomize_bn(FunnelNet()), images(6, 8, 5)),
    }


MODELS = {}


def get_model(name):
    if name not in MODELS:
        make, data = _models()[name]
        torch.manual_seed(1)
        MODELS[name] = (make(), data)
    return MODELS[name]


# (model, layer, param, how many entries, expected method)
CASES = [
    ("alexnet", "classifier.1", "weight", 4, "replay"),
    ("alexnet", "classifier.4", "weight", 6, "piecewise"),
    ("alexnet", "classifier.6", "weight", 6, "logits"),
    ("alexnet", "features.10", "weight", 5, "replay"),
    ("alexnet", "features.10", "bias", 3, "replay"),
    ("vgg11_bn", "features.8", "weight", 4, "replay"),
    ("vgg11_bn", "classifier.0", "weight", 3, "replay"),
    ("resnet18", "layer4.1.conv2", "weight", 6, "funnel"),
    ("funnel_net", "conv", "weight", 12, "funnel"),
    ("funnel_net", "conv", "bias", 6, "funnel"),
    ("resnet18", "layer3.0.conv1", "weight", 3, "replay"),
    ("mobilenet_v3_small", "features.4.block.1.0", "weight", 3, "replay"),  # depthwise
    ("residual_mlp", "fc1", "weight", 8, "replay"),
    ("residual_mlp", "inp", "bias", 6, "replay"),
    ("bn1d_head", "2", "weight", 10, "piecewise"),
    ("bn1d_head", "2", "bias", 10, "piecewise"),
    ("gelu_head", "2", "weight", 10, "elementwise"),
    ("grouped", "c1", "weight", 6, "replay"),
    ("grouped", "c2", "weight", 6, "replay"),
    ("grouped", "dw", "weight", 6, "replay"),
    ("grouped", "c2", "bias", 4, "replay"),
]


def _pick(module, param, k, seed=0):
    n = getattr(module, param).numel()
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


REFS = {}


def reference(case):
    name, layer, param, k, _ = case
    if case not in REFS:
        model, (X, y) = get_model(name)
        idx = _pick(model.get_submodule(layer), param, k)
        REFS[case] = (idx, oracle(model, layer, X, y, idx, param))
    return REFS[case]


def close(r, ref, rel):
    truth = ref["delta_loss"]
    err = (r.delta_loss - truth).abs()
    return (err <= rel * truth.abs() + ref["round"]).all(), (err / truth.abs())[truth != 0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_float64_matches_oracle(case):
    name, layer, param, k, method = case
    model, (X, y) = get_model(name)
    idx, ref = reference(case)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    r = wa.ablate(model, layer, (X, y), idx, param=param, precision="float64", progress=False)
    assert r.method == method, r.head
    assert r.param == param
    ok, rel = close(r, ref, 1e-5)
    assert ok, rel.max()
    nz = ref["delta_loss"] != 0
    assert nz.any(), "a case whose every delta is zero tests nothing"
    assert torch.equal(r.flips, ref["flips"])
    assert torch.equal(r.exact_zero, ref["exact_zero"])
    # the oracle's KL subtracts two log-probabilities: compare where it is above its own rounding
    assert torch.allclose(r.delta_kl, ref["delta_kl"], rtol=1e-4, atol=1e-13)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


FLOAT32_CASES = [c for c in CASES if c[0] in ("alexnet", "resnet18", "residual_mlp", "grouped", "funnel_net")
                 and c[1] in ("features.10", "layer4.1.conv2", "fc1", "c2", "conv")]


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_float32_model_within_stated_bound(case):
    """Default precision: float32 captures; the changes go through Linear/Conv/ReLU in float32 (no
    cancellation: rounding relative to the change), the rest in float64."""
    name, layer, param, k, method = case
    model, (X, y) = get_model(name)
    idx, ref = reference(case)
    r = wa.ablate(model, layer, (X, y), idx, param=param, progress=False)
    assert r.method == method
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"]).all()
    nz = ref["delta_loss"] != 0
    assert (err / ref["delta_loss"].abs())[nz].median() <= 1e-4
    assert torch.equal(r.exact_zero, ref["exact_zero"])


def test_fast_path_is_chosen():
    model, (X, y) = get_model("resnet18")
    r = wa.ablate(model, "layer4.1.conv2", (X[:2], y[:2]), 3, progress=False)
    assert r.method == "funnel" and "fc" in r.head
    r = wa.ablate(model, "layer4.0.conv2", (X[:2], y[:2]), 2, progress=False)
    assert r.method == "replay" and "funnel" in r.head  # says why the funnel did not apply
    model, (X, y) = get_model("alexnet")
    r = wa.ablate(model, "classifier.4", (X, y), 3, progress=False)
    assert r.method == "piecewise"


NAIVE_ON = {("alexnet", "features.10", "weight"), ("funnel_net", "conv", "bias"), ("residual_mlp", "inp", "bias"),
            ("grouped", "dw", "weight")}
NAIVE_CASES = [c for c in CASES if c[:3] in NAIVE_ON]


@pytest.mark.parametrize("case", NAIVE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_naive_backend_on_conv_and_bias(case):
    name, layer, param, k, _ = case
    model, (X, y) = get_model(name)
    idx, ref = reference(case)
    r = wa.ablate(copy.deepcopy(model).double(), layer, (X.double(), y), idx, param=param, backend="naive",
                  progress=False)
    assert r.method == "naive"
    ok, rel = close(r, ref, 1e-9)
    assert ok, rel.max()
    assert torch.equal(r.flips, ref["flips"])


@pytest.mark.parametrize("precision, rtol", [("float64", 1e-12), ("model", 1e-5)])
def test_chunking_does_not_change_results(precision, rtol):
    """max_memory bounds the replay chunk: one ablation at a time gives the same numbers (in float32
    the conv of a chunk may take another oneDNN algorithm for another batch size: float32 rounding of
    the changes, as on AVX-512 machines, which is within the bound)."""
    model, (X, y) = get_model("grouped")
    idx = _pick(model.c2, "weight", 12, seed=3)
    big = wa.ablate(model, "c2", (X, y), idx, progress=False, batch_size=3, precision=precision)
    small = wa.ablate(model, "c2", (X, y), idx, progress=False, batch_size=3, max_memory=1, precision=precision)
    assert torch.allclose(big.delta_loss, small.delta_loss, rtol=rtol, atol=0)
    assert torch.equal(big.flips, small.flips)


def test_weights_bias_string_and_pairs():
    model, (X, y) = get_model("grouped")
    r = wa.ablate(model, "c1", (X, y), "bias", progress=False)
    assert r.param == "bias" and len(r) == 8 and torch.equal(r.rows, torch.arange(8))
    assert torch.equal(r.weight, model.c1.bias.detach())
    r2 = wa.ablate(model, "c2", (X, y), (torch.tensor([0, 7]), torch.tensor([5, 35])), progress=False)
    assert r2.layer_shape == (8, 36)
    assert torch.equal(r2.indices, torch.tensor([5, 7 * 36 + 35]))
    assert torch.equal(r2.weight, model.c2.weight.detach().reshape(-1)[r2.indices])


def test_bad_param_and_missing_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    X, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="no bias"):
        wa.ablate(model, "0", (X, y), "bias")
    with pytest.raises(ValueError, match="param"):
        wa.ablate(model, "0", (X, y), param="running_mean")
    with pytest.raises(TypeError, match="weights"):
        wa.ablate(model, "0", (X, y), "biases")


def test_save_load_keeps_param(tmp_path):
    model, (X, y) = get_model("grouped")
    r = wa.ablate(model, "c2", (X, y), "bias", progress=False)
    r.save(tmp_path / "r.npz")
    back = load(tmp_path / "r.npz")
    assert back.param == "bias" and back.method == "replay"
    assert torch.equal(back.delta_loss, r.delta_loss)


def test_untraceable_model_names_the_construct():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:
                h = h * 2
            return self.fc(h.mean((2, 3)))

    X, y = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"torch\.fx cannot trace.*if h\.sum\(\) > 0"):
        wa.ablate(DataDependent(), "conv", (X, y))


class Moves(nn.Module):
    """Permute, transpose, (un)squeeze, slicing, reshape and cat after a conv."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 4 + 4 * 2 * 4, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        a = h.permute(0, 2, 3, 1).transpose(1, 2).unsqueeze(1).squeeze(1)
        return self.fc(torch.cat([a.reshape(x.shape[0], -1), h[:, :, ::2].flatten(1)], 1))


def test_data_movement_maps_the_change_itself(monkeypatch):
    """Ops that only move values take the change through as is, not f(base + change) - f(base)."""
    from weightablate import propagate

    calls = []
    real = propagate.Propagator.generic
    def counted(self, n, env):
        calls.append(n.name)
        return real(self, n, env)

    monkeypatch.setattr(propagate.Propagator, "generic", counted)
    torch.manual_seed(0)
    model = Moves().eval()
    X, y = torch.randn(5, 3, 4, 4), torch.randint(0, 3, (5,))
    idx = torch.arange(model.c.weight.numel())
    r = wa.ablate(model, "c", (X, y), idx, precision="float64", progress=False)
    ref = oracle(model, "c", X, y, idx)
    assert r.method == "replay" and calls == []
    ok, rel = close(r, ref, 1e-9)
    assert ok, rel.max()
    assert torch.equal(r.flips, ref["flips"])


@pytest.mark.parametrize("name,layer", [("funnel_net", "conv"), ("grouped", "c2")])
def test_by_class_rows_sum_to_delta_loss(name, layer):
    model, (X, y) = get_model(name)
    r = wa.ablate(model, layer, (X, y), 10, by_class=True, progress=False)
    assert r.class_loss.shape == (10, model.fc.out_features)
    assert torch.allclose(r.class_loss.sum(1), r.delta_loss, rtol=1e-12, atol=1e-18)
    for c in range(r.class_loss.shape[1]):  # classes without samples get nothing
        if not (y == c).any():
            assert (r.class_loss[:, c] == 0).all()


def test_forced_methods_agree_and_refuse_clearly():
    """method= forces one path: funnel and replay give the same numbers where both apply."""
    model, (X, y) = get_model("funnel_net")
    idx = _pick(model.conv, "weight", 20, seed=5)
    runs = {m: wa.ablate(model, "conv", (X, y), idx, method=m, precision="float64", progress=False)
            for m in ("funnel", "replay")}
    assert runs["funnel"].method == "funnel" and runs["replay"].method == "replay"
    assert torch.allclose(runs["funnel"].delta_loss, runs["replay"].delta_loss, rtol=1e-9, atol=1e-300)
    assert torch.allclose(runs["funnel"].delta_kl, runs["replay"].delta_kl, rtol=1e-6, atol=1e-300)
    assert torch.equal(runs["funnel"].flips, runs["replay"].flips)
    with pytest.raises(ValueError, match=r"Conv2d: method='closed_form' needs an nn.Linear"):
        wa.ablate(model, "conv", (X, y), 2, method="closed_form")
    small, (Xg, yg) = get_model("grouped")
    with pytest.raises(ValueError, match=r"method='funnel' does not apply to layer 'c2'"):
        wa.ablate(small, "c2", (Xg, yg), 2, method="funnel")
    with pytest.raises(ValueError, match=r"method must be one of"):
        wa.ablate(small, "c2", (Xg, yg), 2, method="fast")


class MeanHead(nn.Module):
    """Global average pooling written as a mean: over the spatial axes (a funnel) or over channels (not)."""

    def __init__(self, which):
        super().__init__()
        self.c, self.fc, self.which = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3), which

    def forward(self, x):
        h = F.relu(self.c(x))
        if self.which == "torch.mean":
            return self.fc(torch.mean(h, (2, 3)))
        if self.which == "method":
            return self.fc(h.mean(dim=[-1, -2]))
        return self.fc(h.mean(1).mean((1, 2))[:, None].expand(-1, 4).contiguous())


@pytest.mark.parametrize("which,method", [("torch.mean", "funnel"), ("method", "funnel"), ("channels", "replay")])
def test_mean_pooling(which, method):
    torch.manual_seed(0)
    model = MeanHead(which).eval()
    X, y = torch.randn(5, 3, 4, 4), torch.randint(0, 3, (5,))
    idx = torch.arange(model.c.weight.numel())
    r = wa.ablate(model, "c", (X, y), idx, precision="float64", progress=False)
    ref = oracle(model, "c", X, y, idx)
    assert r.method == method, r.head
    ok, rel = close(r, ref, 1e-9)
    assert ok, rel.max()
    assert torch.equal(r.flips, ref["flips"])

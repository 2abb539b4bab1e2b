"""weightablate.criteria against independent float64 autograd: g by backward, the Hessian diagonal
by torch.autograd.functional.hessian on tiny layers, Wanda's norms from the layer's input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import weightablate as wa
from weightablate import criteria


def data(n=120, d=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return X, y


class Custom(nn.Module):
    """Modules called in order from forward (not a Sequential); in-place ReLU after the target."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(16, 8), nn.Tanh()
        self.fc2, self.act2 = nn.Linear(8, 6), nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class Residual(nn.Module):
    """No closed form: the target's output is added to a skip branch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(h + torch.relu(self.fc2(h)))


def make(head):
    body = [nn.Linear(16, 8), nn.ReLU()]
    tails = {
        "logits": [nn.Linear(8, 5)],
        "relu": [nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5)],
        "leaky": [nn.Linear(8, 6), nn.LeakyReLU(0.1), nn.Dropout(0.3), nn.Linear(6, 5)],
        "batchnorm": [nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 5)],
        "tanh": [nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5)],
        "gelu": [nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 5)],
        "softplus2": [nn.Linear(8, 6), nn.Softplus(), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5)],
    }
    torch.manual_seed(3)
    if head == "custom":
        return Custom().double(), "fc2"
    model = nn.Sequential(*body, *tails[head]).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):  # non-trivial eval statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval(), "2"


def reference(model, layer, X, y):
    """g and the Hessian diagonal of the summed CE w.r.t. layer.weight, by autograd on a copy."""
    m = copy.deepcopy(model).double().eval()
    name = f"{layer}.weight"
    W0 = m.get_submodule(layer).weight.detach().clone()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(w):
        return F.cross_entropy(functional_call(m, {**params, name: w}, (X,)), y, reduction="sum")

    W = W0.clone().requires_grad_(True)
    loss(W).backward()
    g = W.grad.detach()
    H = torch.autograd.functional.hessian(lambda v: loss(v.view_as(W0)), W0.reshape(-1))
    return g, torch.diagonal(H).view_as(W0)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: (p.requires_grad, None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()},
            [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    state, grads, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, p in model.named_parameters():
        assert p.requires_grad == grads[k][0] and (p.grad is None) == (grads[k][1] is None), k
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("head", ["logits", "relu", "leaky", "batchnorm", "tanh", "gelu", "softplus2", "custom"])
def test_against_autograd(head):
    model, layer = make(head)
    if head == "logits":
        layer = "2"
    X, y = data()
    g, h = reference(model, layer, X, y)
    model.train()  # modes are restored after the call
    snap = snapshot(model)
    got = criteria.compute(model, layer, (X, y), batch_size=50)
    assert_unchanged(model, snap)
    W = model.get_submodule(layer).weight.detach()
    a = model[:2](X) if head != "custom" else torch.tanh(model.fc1(X))
    tol = dict(rtol=1e-9, atol=1e-12)
    assert set(got) == set(criteria.NAMES)
    assert all(t.dtype == torch.float64 and t.shape == W.shape for t in got.values())
    torch.testing.assert_close(got["magnitude"], W.abs(), **tol)
    torch.testing.assert_close(got["squared"], W * W, **tol)
    torch.testing.assert_close(got["wanda"], W.abs() * a.norm(dim=0)[None, :], **tol)
    torch.testing.assert_close(got["taylor"], (g * W).abs(), **tol)
    torch.testing.assert_close(got["obd"], 0.5 * h * W * W, **tol)
    torch.testing.assert_close(got["taylor2"], -g * W + 0.5 * h * W * W, **tol)
    if head in ("logits", "relu", "leaky", "batchnorm", "custom"):
        assert (got["obd"] >= 0).all()  # ReLU family: s'' = 0, h >= 0
    if head in ("tanh", "softplus2"):
        assert (h < 0).any()  # the curvature term matters: a negative diagonal entry is reproduced


def test_single_functions_match_compute_and_truth():
    """Each public function alone, and taylor2 as an estimate of the exact delta_loss."""
    model, layer = make("relu")
    X, y = data(200)
    everything = criteria.compute(model, layer, (X, y))
    target = model.get_submodule(layer)
    assert torch.equal(criteria.magnitude(target), everything["magnitude"])
    assert torch.equal(criteria.squared(target.weight), everything["squared"])
    for fn in (criteria.wanda, criteria.taylor, criteria.obd, criteria.taylor2):
        torch.testing.assert_close(fn(model, target, (X, y)), everything[fn.__name__], rtol=1e-12, atol=0)
    res = wa.ablate(model, layer, (X, y))
    est = everything["taylor2"].reshape(-1)[res.indices]
    assert torch.corrcoef(torch.stack([est, res.delta_loss]))[0, 1] > 0.9


def test_one_pass_over_a_generator_and_batching():
    model, layer = make("gelu")
    X, y = data(150)
    full = criteria.compute(model, layer, (X, y))
    passes = []

    def stream():
        passes.append(1)
        for s in range(0, 150, 40):
            yield X[s:s + 40], y[s:s + 40]

    got = criteria.compute(model, layer, stream())
    assert len(passes) == 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64)
    got2 = criteria.compute(model, layer, loader)
    for k in criteria.NAMES:
        torch.testing.assert_close(got[k], full[k], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got2[k], full[k], rtol=1e-10, atol=1e-14)


def test_float32_model_close_to_float64():
    model, layer = make("relu")
    X, y = data(200)
    ref = criteria.compute(model, layer, (X, y))
    m32 = copy.deepcopy(model).float()
    got = criteria.compute(m32, layer, (X.float(), y))
    for k in criteria.NAMES:
        assert got[k].dtype == torch.float64
        scale = ref[k].abs().max()
        assert (got[k] - ref[k]).abs().max() <= 1e-5 * scale, k


def test_no_closed_form():
    torch.manual_seed(0)
    model = Residual().double().eval()
    X, y = data()
    for fn in (criteria.obd, criteria.taylor2):
        with pytest.raises(ValueError, match="Hessian"):
            fn(model, "fc2", (X, y))
    snap = snapshot(model)
    g, _ = reference(model, "fc2", X, y)
    W = model.fc2.weight.detach()
    torch.testing.assert_close(criteria.taylor(model, "fc2", (X, y)), (g * W).abs(), rtol=1e-10, atol=1e-14)
    got = criteria.compute(model, "fc2", (X, y), strict=False)
    assert set(got) == {"magnitude", "squared", "wanda", "taylor", "sparsegpt"}
    a = torch.relu(model.fc1(X)).detach()
    torch.testing.assert_close(got["wanda"], W.abs() * a.norm(dim=0)[None, :], rtol=1e-10, atol=0)
    assert_unchanged(model, snap)


def test_frozen_weights_and_existing_grad_are_left_alone():
    model, layer = make("relu")
    X, y = data()
    for p in model.parameters():
        p.requires_grad_(False)
    model2 = Residual().double()
    model2.fc2.weight.grad = torch.ones_like(model2.fc2.weight)
    model2.fc2.weight.requires_grad_(False)
    snap = snapshot(model2)
    criteria.taylor(model, layer, (X, y))
    criteria.taylor(model2, "fc2", (X, y))  # the autograd path
    assert_unchanged(model2, snap)
    assert torch.equal(model2.fc2.weight.grad, torch.ones_like(model2.fc2.weight))
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", padding_mode="reflect", groups=2),
])
def test_conv2d_wanda_and_taylor(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, **conv), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double().eval()
    X = torch.randn(7, 2, 9, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    target = model[2]
    got = criteria.compute(model, target, (X, y), names=("wanda", "taylor"), batch_size=3)
    # independent: each weight's input feature, by shifting the (padded) input like the convolution
    a = model[:2](X).detach()
    o, cg, kh, kw = target.weight.shape
    pad = target._reversed_padding_repeated_twice
    mode = "constant" if target.padding_mode == "zeros" else target.padding_mode
    ap = F.pad(a, pad, mode=mode)
    out_h, out_w = model[:3](X).shape[2:]
    sh, sw = target.stride
    dh, dw = target.dilation
    norm = torch.zeros(o, cg, kh, kw, dtype=torch.float64)
    for oo in range(o):
        grp = oo // (o // target.groups)
        for c in range(cg):
            for p in range(kh):
                for q in range(kw):
                    feat = ap[:, grp * cg + c, p * dh: p * dh + sh * (out_h - 1) + 1: sh,
                              q * dw: q * dw + sw * (out_w - 1) + 1: sw]
                    norm[oo, c, p, q] = feat.pow(2).sum().sqrt()
    torch.testing.assert_close(got["wanda"], target.weight.detach().abs() * norm, rtol=1e-10, atol=1e-14)
    w = target.weight.detach().clone().requires_grad_(True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    F.cross_entropy(functional_call(model, {**params, "2.weight": w}, (X,)), y, reduction="sum").backward()
    torch.testing.assert_close(got["taylor"], (w.grad * target.weight.detach()).abs(), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="Hessian"):
        criteria.obd(model, "2", (X, y))


def test_bad_arguments():
    model, layer = make("relu")
    X, y = data()
    with pytest.raises(ValueError, match="criteria"):
        criteria.compute(model, layer, (X, y), names=("nope",))
    with pytest.raises(ValueError, match="not a module"):
        criteria.wanda(model, "missing", (X, y))
    with pytest.raises(TypeError):
        criteria.magnitude("fc2")
    with pytest.raises(TypeError, match="model"):
        criteria.taylor(model, layer, (X.float(), y))  # inputs of another dtype than the weights


def test_layers_pruned_with_torch_prune():
    """torch.nn.utils.prune recomputes layer.weight = weight_orig * weight_mask in every forward:
    the criteria score that effective weight, in the closed form and through autograd."""
    from torch.nn.utils import prune

    X, y = data()
    for make_model, layer in ((lambda: make("relu")[0], "2"), (lambda: Residual().double().eval(), "fc2")):
        torch.manual_seed(0)
        model = make_model()
        plain = copy.deepcopy(model)
        prune.l1_unstructured(model.get_submodule(layer), "weight", amount=0.4)
        with torch.no_grad():
            plain.get_submodule(layer).weight.copy_(model.get_submodule(layer).weight)
        names = ("magnitude", "wanda", "taylor") if layer == "fc2" else criteria.NAMES
        got = criteria.compute(model, layer, (X, y), names=names)
        ref = criteria.compute(plain, layer, (X, y), names=names)
        for k in names:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=0)
        assert (got["taylor"][model.get_submodule(layer).weight_mask == 0] == 0).all()

"""structure="out" / "in": whole units, against a float64 removal loop written here (each unit
physically removed from a float64 copy: its row/filter, bias and BatchNorm channel zeroed, or the
consumer's column zeroed; its input column zeroed for "in"), one full evaluation per unit."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightablate as wa

RTOL = 1e-9


def removal(model, X, y, units, remove):
    """Per unit: the float64 summed CE change, |CE change| sum, KL sum and flips after ``remove(m, k)``."""
    m0 = copy.deepcopy(model).double().eval()
    X = X.double()
    with torch.no_grad():
        base = m0(X)
        ce0 = F.cross_entropy(base, y, reduction="none")
        logp0 = F.log_softmax(base, 1)
        out = {"delta_loss": [], "abs": [], "delta_kl": [], "flips": [], "same": []}
        for k in units:
            m = copy.deepcopy(m0)
            remove(m, k)
            logits = m(X)
            ce = F.cross_entropy(logits, y, reduction="none")
            out["delta_loss"].append((ce - ce0).sum().item())
            out["abs"].append((ce - ce0).abs().sum().item())
            kl = logp0.exp() * (logp0 - F.log_softmax(logits, 1))
            out["delta_kl"].append(kl.sum().item())
            out["flips"].append(int((logits.argmax(1) != base.argmax(1)).sum()))
            out["same"].append(torch.equal(logits, base))
    dtypes = {"flips": torch.int64, "same": torch.bool}
    return {k: torch.tensor(v, dtype=dtypes.get(k, torch.float64)) for k, v in out.items()}


def check(res, ref):
    tol = RTOL * (ref["delta_loss"].abs() + ref["abs"]) + 1e-13
    assert (res.delta_loss - ref["delta_loss"]).abs().le(tol).all(), (res.delta_loss, ref["delta_loss"])
    assert (res.delta_kl - ref["delta_kl"]).abs().le(RTOL * ref["delta_kl"].abs() + 1e-13).all()
    assert torch.equal(res.flips, ref["flips"].to(res.flips.dtype))
    assert torch.equal(res.exact_zero, ref["same"])


def zero_out(layer, k, *bns):
    """Remove output unit/channel k: its row/filter, bias and the BatchNorm channels after it."""
    layer.weight.data[k] = 0
    if layer.bias is not None:
        layer.bias.data[k] = 0
    for bn in bns:
        bn.weight.data[k] = 0
        bn.bias.data[k] = 0


def zero_in(layer, j):
    """Zero input feature/channel j of a Linear or (grouped) Conv2d in this layer only."""
    if isinstance(layer, nn.Linear):
        layer.weight.data[:, j] = 0
        return
    Cg = layer.weight.shape[1]
    Og = layer.weight.shape[0] // layer.groups
    g = j // Cg
    layer.weight.data[g * Og:(g + 1) * Og, j % Cg] = 0


def data(shape, n=40, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def mlp(act=nn.ReLU):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), act(), nn.Linear(12, 5)).eval()
    with torch.no_grad():  # units 0 and 5 of the hidden Linear dead on every sample
        for k in (0, 5):
            m[2].weight[k] = 0
            m[2].bias[k] = -1.0
    return m


class CNN(nn.Module):
    """conv -> BN -> ReLU -> grouped conv -> BN -> ReLU -> max-pool -> depthwise conv -> ReLU -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.conv3(x)), 1), 1))


def cnn():
    torch.manual_seed(1)
    m = CNN()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return m.eval()


class Residual(nn.Module):
    """ResNet's last block in miniature: the target's channel meets the skip in a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.conv(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def run(model, layer, X, y, structure, **kw):
    return wa.ablate(model, layer, (X, y), structure=structure, precision="float64", **kw)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid])
def test_linear_out_closed_form(act):
    m = mlp(act)
    X, y = data((8,))
    res = run(m, "2", X, y, "out")
    assert res.structure == "out" and res.method == "closed_form" and len(res) == 12
    # physical removal: the final Linear no longer reads unit k (for ReLU also: the row and bias zeroed)
    ref = removal(m, X, y, range(12), lambda mm, k: mm[4].weight.data[:, k].zero_())
    check(res, ref)
    if act is nn.ReLU:
        check(res, removal(m, X, y, range(12), lambda mm, k: zero_out(mm[2], k)))
        assert res.exact_zero[[0, 5]].all() and not res.exact_zero[[1, 2, 3]].any()
        assert (res.delta_loss[[0, 5]] == 0).all()


def test_logits_layer_out():
    m = mlp()
    X, y = data((8,))
    res = run(m, "4", X, y, "out")
    check(res, removal(m, X, y, range(5), lambda mm, k: zero_out(mm[4], k)))


def test_linear_in_replay():
    m = mlp()
    X, y = data((8,))
    res = run(m, "2", X, y, "in", weights=torch.tensor([3, 0, 15, 7]))
    assert res.method == "replay" and res.indices.tolist() == [3, 0, 15, 7]
    check(res, removal(m, X, y, [3, 0, 15, 7], lambda mm, j: zero_in(mm[2], j)))
    assert torch.allclose(res.weight, m[2].weight.detach().double()[:, [3, 0, 15, 7]].norm(dim=0))


@pytest.mark.parametrize("layer,bn", [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", None)])
def test_conv_out(layer, bn):
    """conv1: through BN and ReLU into a grouped conv; conv2 (grouped): through BN, ReLU and max-pool
    into a depthwise conv; conv3 (depthwise): through ReLU and pooling to the final Linear."""
    m = cnn()
    X, y = data((3, 8, 8))
    res = run(m, layer, X, y, "out")
    assert res.method == ("funnel" if layer == "conv3" else "replay"), res.head
    ref = removal(m, X, y, range(8), lambda mm, k: zero_out(getattr(mm, layer), k,
                                                             *([getattr(mm, bn)] if bn else [])))
    check(res, ref)
    assert not res.exact_zero.all()


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "fc"])
def test_in(layer):
    m = cnn()
    X, y = data((3, 8, 8))
    res = run(m, layer, X, y, "in")
    n = getattr(m, layer).weight.shape[1] * getattr(getattr(m, layer), "groups", 1)
    assert len(res) == n
    check(res, removal(m, X, y, range(n), lambda mm, j: zero_in(getattr(mm, layer), j)))


def test_residual_add_out_is_refused_branch_sees_zero():
    """The channel meets the skip at the add, which carries channel k on: "out" (removing the channel
    from this layer alone) is refused; "branch": the add sees zero from it (its BN channel removed),
    the skip's channel stays; the change then goes through the add's ReLU and pooling (funnel)."""
    m = Residual().eval()
    X, y = data((3, 6, 6))
    with pytest.raises(ValueError, match="output channels of layer 'conv' meet 'relu' in the add 'add'.*"
                                         "ExactChannelImportance.*structure='branch'"):
        run(m, "conv", X, y, "out")
    res = run(m, "conv", X, y, "branch")
    assert res.method == "funnel" and "'bn'" in res.head and res.structure == "branch"
    check(res, removal(m, X, y, range(6), lambda mm, k: zero_out(mm.conv, k, mm.bn)))
    assert list(res.coords()) == ["out"]


def test_model_precision_and_unit_sample():
    m = cnn()
    X, y = data((3, 8, 8))
    res = wa.ablate(m, "conv3", (X, y), weights=3, seed=2, structure="out")
    assert len(res) == 3 and "self_check" in res.extra
    full = run(m, "conv3", X, y, "out")
    assert torch.allclose(res.delta_loss, full.delta_loss[res.indices], rtol=1e-4, atol=1e-5)


def test_result_round_trip(tmp_path):
    m = mlp()
    X, y = data((8,))
    res = run(m, "2", X, y, "in", weights=4)
    res.save(tmp_path / "r.npz")
    back = wa.load(tmp_path / "r.npz")
    assert back.structure == "in" and torch.equal(back.delta_loss, res.delta_loss)


def test_bad_inputs():
    m = mlp()
    X, y = data((8,))
    with pytest.raises(ValueError, match="unit index out of range.*12 output units"):
        run(m, "2", X, y, "out", weights=torch.tensor([12]))
    with pytest.raises(ValueError, match="16 input features"):
        run(m, "2", X, y, "in", weights=torch.tensor([-1]))
    with pytest.raises(ValueError, match="structure must be one of"):
        run(m, "2", X, y, "rows")
    with pytest.raises(TypeError, match="rows, cols"):
        run(m, "2", X, y, "out", weights=(torch.tensor([0]), torch.tensor([0])))
    with pytest.raises(ValueError, match="param='weight'"):
        run(m, "2", X, y, "out", param="bias")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    run(m, "2", X, y, "in", weights=2)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


class TwoReaders(nn.Module):
    """The channel is read twice: AdaptiveAvgPool2d(2) -> Flatten -> Linear (4 features per channel)
    and a spatial mean -> Linear; the logits are their sum (no final Linear: replay)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(2), nn.Linear(24, 5), nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc1(torch.flatten(self.pool(h), 1)) + self.fc2(h.mean((2, 3)))


def test_flatten_of_2x2_and_two_readers():
    m = TwoReaders().eval()
    X, y = data((3, 6, 6))
    res = run(m, "conv", X, y, "out", by_class=True)
    assert res.method == "replay"
    check(res, removal(m, X, y, range(6), lambda mm, k: zero_out(mm.conv, k)))
    assert torch.allclose(res.class_loss.sum(1), res.delta_loss, rtol=1e-12, atol=1e-14)
    # the consumers see zero: the same as zeroing fc1's 4 columns and fc2's column of channel k
    def cut(mm, k):
        mm.fc1.weight.data[:, 4 * k:4 * k + 4] = 0
        mm.fc2.weight.data[:, k] = 0
    check(res, removal(m, X, y, range(6), cut))


@pytest.mark.slow
def test_resnet18_layer4_and_layer3():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    X, y = data((3, 32, 32), n=6, classes=10)
    units = torch.tensor([0, 17, 300, 511])
    res = run(net, "layer4.1.conv2", X, y, "branch", weights=units)  # meets the residual add
    assert res.method == "funnel", res.head
    check(res, removal(net, X, y, units.tolist(),
                       lambda mm, k: zero_out(mm.layer4[1].conv2, k, mm.layer4[1].bn2)))
    res = run(net, "layer3.0.conv1", X, y, "out", weights=torch.tensor([40]))
    assert res.method == "replay"
    check(res, removal(net, X, y, [40], lambda mm, k: zero_out(mm.layer3[0].conv1, k, mm.layer3[0].bn1)))


def test_self_check_catches_a_wrong_change(monkeypatch):
    from weightablate import structured
    from weightablate.propagate import Delta

    right = structured.Structured.out_delta
    monkeypatch.setattr(structured.Structured, "out_delta",
                        lambda self, units: (lambda d: Delta(0.5 * d.t, d.idx, d.size))(right(self, units)))
    m = Residual().eval()
    X, y = data((3, 6, 6))
    with pytest.raises(wa.VerificationError, match="structure='branch'.*unit"):
        wa.ablate(m, "conv", (X, y), structure="branch")


def test_cli_run_structure_out(tmp_path, capsys):
    from weightablate.cli import main

    out = tmp_path / "o"
    assert main(["run", "--structure", "out", "--weights", "6", "--no-report", "--quiet", "--out", str(out)]) == 0
    res = wa.load(out / "results.npz")
    assert res.structure == "out" and len(res) == 6 and res.layer_shape == (256, 1)
    assert "6 output units ablated" in capsys.readouterr().out
    train = wa.load(out / "results_train.npz")
    assert torch.equal(train.indices, res.indices)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--structure", "in", "--param", "bias", "--quiet", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "--structure in removes whole units" in capsys.readouterr().err


def test_batch_statistics_in_the_chain_is_refused():
    m = cnn()
    m.bn1.track_running_stats, m.bn1.running_mean, m.bn1.running_var = False, None, None
    X, y = data((3, 8, 8))
    with pytest.raises(ValueError, match="bn1.*batch statistics"):
        run(m, "conv1", X, y, "out")


@pytest.mark.slow
def test_mobilenet_v3_small_depthwise_into_squeeze_excitation():
    """features.1.block.0 is a depthwise conv -> BN -> ReLU whose output feeds the squeeze-excitation
    block twice (its pooling and the product): the chain ends at the ReLU, replayed from there."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    X, y = data((3, 32, 32), n=4, classes=10)
    block = net.features[1].block[0]
    units = [3, 11]
    res = run(net, "features.1.block.0.0", X, y, "out", weights=torch.tensor(units))
    assert res.method == "replay"
    check(res, removal(net, X, y, units, lambda mm, k: zero_out(mm.features[1].block[0][0], k,
                                                                 mm.features[1].block[0][1])))
    assert block[0].groups == block[0].in_channels  # depthwise ("in" on depthwise: test_in[conv3])


def test_torch_backend_agrees():
    m = mlp(nn.Sigmoid)
    X, y = data((8,))
    a = run(m, "2", X, y, "out", backend="torch")
    b = run(m, "2", X, y, "out")
    assert a.backend == "torch" and torch.allclose(a.delta_loss, b.delta_loss, rtol=1e-10, atol=1e-14)
    assert torch.equal(a.flips, b.flips) and torch.equal(a.exact_zero, b.exact_zero)


def test_checkpoint_resumes_and_refuses_another_structure(tmp_path):
    m = mlp()
    X, y = data((8,))
    units = torch.tensor([1, 2, 3])
    first = run(m, "2", X, y, "out", weights=units, checkpoint_dir=tmp_path)
    again = run(m, "2", X, y, "out", weights=units, checkpoint_dir=tmp_path)  # resumes from the saved end
    assert torch.equal(first.delta_loss, again.delta_loss)
    with pytest.raises(ValueError, match="checkpoint"):
        run(m, "2", X, y, "in", weights=units, checkpoint_dir=tmp_path)


SPELLINGS = {  # the same per-channel map, spelled as a function, a method, or with the number first
    "relu+1": lambda h: torch.relu(h) + 1, "1+relu": lambda h: 1 + torch.relu(h),
    "relu.add": lambda h: torch.relu(h).add(1), "1-relu": lambda h: 1 - torch.relu(h),
    "torch.exp": lambda h: torch.exp(h), "h.exp": lambda h: h.exp(),
    "clamp(sigmoid)": lambda h: torch.clamp(torch.sigmoid(h), min=0.3),
    "sigmoid.clamp": lambda h: torch.sigmoid(h).clamp(min=0.3),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_out_does_not_depend_on_how_a_map_is_spelled(spelling):
    """Removing unit k of fc1 = fc2 sees zero from it, whatever element-wise map lies in between."""
    class Spelled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)

        def forward(self, x):
            return self.fc2(SPELLINGS[spelling](self.fc1(x)))

    torch.manual_seed(0)
    X, y = torch.randn(48, 6), torch.randint(0, 4, (48,))
    model = Spelled()
    r = wa.ablate(model, "fc1", (X, y), torch.tensor([0, 3]), structure="out", precision="float64", progress=False)
    for k, unit in enumerate((0, 3)):
        m = copy.deepcopy(model).double()
        with torch.no_grad():
            base = F.cross_entropy(m(X.double()), y, reduction="sum").item()
            m.fc2.weight[:, unit] = 0
            removed = F.cross_entropy(m(X.double()), y, reduction="sum").item()
        assert abs(r.delta_loss[k].item() - (removed - base)) <= 1e-9 * abs(removed - base) + 1e-12


def test_the_only_path_to_a_class_and_a_dead_conv_channel():
    """Class 2's logit reads hidden unit 7 alone: removing it leaves the logit at its bias. A conv
    channel dead on every sample (ReLU of a negative constant) removes exactly nothing."""
    m = mlp()
    with torch.no_grad():
        m[4].weight[2] = 0
        m[4].weight[2, 7] = 3.0
    X, y = data((8,))
    res = run(m, "2", X, y, "out")
    check(res, removal(m, X, y, range(12), lambda mm, k: zero_out(mm[2], k)))
    others = torch.cat([res.delta_loss[:7], res.delta_loss[8:]]).abs().max()
    assert res.flips[7] > 0 and res.delta_loss[7].abs() > others  # the class loses its only evidence

    c = cnn()
    with torch.no_grad():
        c.conv1.weight[4] = 0
        c.conv1.bias[4] = -1.0
        c.bn1.running_mean[4], c.bn1.running_var[4], c.bn1.weight[4], c.bn1.bias[4] = 0.0, 1.0, 1.0, -2.0
    X, y = data((3, 8, 8))
    res = run(c, "conv1", X, y, "out")
    check(res, removal(c, X, y, range(8), lambda mm, k: zero_out(mm.conv1, k, mm.bn1)))
    assert res.exact_zero[4] and res.delta_loss[4] == 0 and not res.exact_zero[3]

"""Models as researchers write them: tied and reused weights, subclassed layers, in-place ops in
every position, keyword calls, broadcasts, masks. Each is either answered exactly (against the
float64 zero-evaluate-restore oracle) or refused with an error naming the construct; never a
silently wrong number."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from torch import nn

import weightablate as wa
from oracle import oracle

N, D, H, C = 24, 6, 8, 5


def data(seed=0, shape=(D,)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, *shape, generator=g), torch.randint(0, C, (N,), generator=g)


def check_exact(model, layer, X, y, k=12, param="weight", method=None, **kw):
    """ablate at precision float64 agrees with the float64 oracle on k weights; returns the result."""
    torch.manual_seed(1)
    r = wa.ablate(model, layer, (X, y), k, param=param, precision="float64", progress=False, **kw)
    ref = oracle(model, layer, X, y, r.indices, param)
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"] + 1e-13).all(), (r.method, err.max())
    kl_err = (r.delta_kl - ref["delta_kl"]).abs()
    assert (kl_err <= 1e-9 * ref["delta_kl"].abs() + ref["round"] + 1e-13).all(), (r.method, kl_err.max())
    assert torch.equal(r.flips, ref["flips"]), r.method
    assert torch.equal(r.exact_zero, ref["exact_zero"]), r.method
    if method is not None:
        assert r.method == method, (r.method, r.head)
    return r


class Block(nn.Module):
    """fc1 -> (something) -> relu -> fc2, with the something given as a function."""

    def __init__(self, middle=None, head=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D, H), (head or nn.Linear(H, C))
        self.middle = middle

    def forward(self, x):
        h = self.fc1(x)
        if self.middle is not None:
            h = self.middle(h)
        return self.fc2(torch.relu(h))


# --- 1. a target parameter used anywhere else -------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, C)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(F.linear(h, self.fc.weight))


class TiedConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, C)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


@pytest.mark.parametrize("make, layer, shape, pattern", [
    (Tied, "a", (D,), "shared with module 'b'"),
    (Tied, "b", (D,), "shared with module 'a'"),
    (Reused, "fc", (D,), r"read directly by forward \(test_adversarial.py:\d+: `return self.out\(F.linear"),
    (TiedConv, "c1", (3, 5, 5), "shared with module 'c2'"),
])
def test_shared_parameter_is_refused_and_naive_is_exact(make, layer, shape, pattern):
    model = make()
    X, y = data(shape=shape)
    with pytest.raises(ValueError, match=pattern):
        wa.ablate(model, layer, (X, y), 4, progress=False)
    # the naive loop zeroes the shared storage, which is the truth
    r = wa.ablate(copy.deepcopy(model).double(), layer, (X.double(), y), 6, backend="naive", progress=False)
    ref = oracle(model, layer, X, y, r.indices)
    assert torch.allclose(r.delta_loss, ref["delta_loss"], rtol=1e-9, atol=1e-12)


# --- 2. subclasses with their own forward ------------------------------------------------------

class CosineHead(nn.Linear):
    def forward(self, x):
        return 10 * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class MaskedLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("mask", (torch.rand(self.weight.shape) > 0.5).float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class ShiftedReLU(nn.ReLU):
    def forward(self, x):
        return F.relu(x - 0.3) * 2


class PlainSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward: it is an nn.Linear."""


def test_cosine_head_is_not_taken_for_a_linear():
    model = Block(head=CosineHead(H, C))
    X, y = data()
    r = check_exact(model, "fc1", X, y)
    assert r.method == "replay"


@pytest.mark.parametrize("cls", [CosineHead, MaskedLinear])
def test_target_with_its_own_forward_is_refused(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(D, H), nn.ReLU(), nn.Linear(H, C))
    X, y = data()
    with pytest.raises(ValueError, match=rf"layer '0' is a {cls.__name__} whose forward \(test_adversarial.py:\d+\) "
                                         "is its own, not Linear's"):
        wa.ablate(model, "0", (X, y), 4, progress=False)


def test_masked_linear_elsewhere_is_followed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), MaskedLinear(H, H), nn.ReLU(), nn.Linear(H, C))
    X, y = data()
    assert check_exact(model, "0", X, y).method == "replay"


def test_relu_subclass_with_its_own_function():
    model = Block(middle=None)
    model.fc2 = nn.Sequential(ShiftedReLU(), nn.Linear(H, C))
    X, y = data()
    check_exact(model, "fc1", X, y)


@pytest.mark.parametrize("where", ["target", "head", "middle"])
def test_plain_subclass_is_the_base_class(where):
    torch.manual_seed(0)
    layers = [nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C)]
    index = {"target": 0, "middle": 2, "head": 4}[where]
    sub = PlainSubclass(layers[index].in_features, layers[index].out_features)
    layers[index] = sub
    model = nn.Sequential(*layers)
    X, y = data()
    check_exact(model, "0" if where != "middle" else "2", X, y)


def test_module_registered_under_two_names_targeted_by_the_second():
    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.first, self.out = nn.Linear(D, H), nn.Linear(H, C)
            self.alias = self.first

        def forward(self, x):
            return self.out(torch.tanh(self.first(x)))

    X, y = data()
    check_exact(TwoNames(), "alias", X, y)


# --- 3. in-place ops after the target ------------------------------------------------------------

class Inplace(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x):
        k = self.kind
        h = self.fc1(x)
        if k == "mul_alias":  # z is h: the multiplication changes h too
            z = h
            z.mul_(1.7)
        if k == "div_inplace":
            h /= 3.0
        if k == "setitem":
            h[:, 0] = 0.5
        if k == "clamp_hidden":
            h.clamp_(min=-0.2, max=0.4)
        r = torch.relu(h)
        if k == "residual_iadd":
            s = self.fc2(r)
            s += r  # an in-place residual
            r = torch.relu(s)
        out = self.fc3(r)
        if k == "logits_div":
            out /= 2.5
        if k == "logits_clamp":
            out.clamp_(-0.3, 0.3)
        if k == "logits_iadd_relu":
            out += torch.relu(h).sum(1, keepdim=True)
        return out


INPLACE = ["mul_alias", "div_inplace", "setitem", "clamp_hidden", "residual_iadd", "logits_div", "logits_clamp",
           "logits_iadd_relu"]


@pytest.mark.parametrize("kind", INPLACE)
@pytest.mark.parametrize("layer", ["fc1", "fc3"])
def test_inplace_ops_are_followed(kind, layer):
    model = Inplace(kind)
    X, y = data()
    check_exact(model, layer, X, y)


def test_inplace_through_another_view_is_refused():
    class ViewThenMutate(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, C)

        def forward(self, x):
            h = self.fc1(x)
            v = h.view(-1, H)
            h.mul_(2)
            return self.fc2(v)

    X, y = data()
    with pytest.raises(ValueError, match=r"another view of the same memory"):
        wa.ablate(ViewThenMutate(), "fc1", (X, y), 4, progress=False)


def test_forward_mutating_a_buffer_or_input_is_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, C)
            self.register_buffer("ema", torch.zeros(H))

        def forward(self, x):
            h = self.fc1(x)
            self.ema.mul_(0.9).add_(h.mean(0))
            return self.fc2(h - self.ema)

    class Normalise(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, C)

        def forward(self, x):
            x.mul_(0.5)
            return self.fc2(self.fc1(x))

    X, y = data()
    with pytest.raises(ValueError, match=r"changes 'ema' of the model in place"):
        wa.ablate(Counter(), "fc1", (X, y), 4, progress=False)
    with pytest.raises(ValueError, match=r"changes the model's input in place"):
        wa.ablate(Normalise(), "fc1", (X, y), 4, progress=False)
    assert torch.equal(X, data()[0])  # refused before any forward ran


# --- 5. calls and broadcasts ---------------------------------------------------------------------

def test_keyword_call_of_the_target():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, C)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(input=x)))

    X, y = data()
    assert check_exact(Keyword(), "fc1", X, y).method == "piecewise"


class ConvBroadcast(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, C)
        self.bias = nn.Parameter(torch.randn(1, 4, 5, 5))

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "broadcast":
            h = h + h.mean(1, keepdim=True)  # the change of one channel reaches every channel
        elif self.kind == "alpha":
            h = torch.add(self.bias, h, alpha=0.5)
        elif self.kind == "broadcast_other":
            h = torch.relu(h) + self.bias[:, :1]
        return self.fc(torch.relu(h).mean((2, 3)))


@pytest.mark.parametrize("kind", ["broadcast", "alpha", "broadcast_other"])
@pytest.mark.parametrize("param", ["weight", "bias"])
def test_conv_through_broadcast_add(kind, param):
    model = ConvBroadcast(kind)
    X, y = data(shape=(3, 5, 5))
    check_exact(model, "conv", X, y, k=12 if param == "weight" else None, param=param)


def test_labels_as_a_list_and_sequence_input_message():
    model = Block()
    X, y = data()
    r = wa.ablate(model, "fc1", (X, y.tolist()), 3, progress=False)
    assert r.n_samples == N
    seq = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Flatten(), nn.Linear(H * 7, C))
    Xs = torch.randn(N, 7, D)
    r = wa.ablate(seq, "0", (Xs, y), 3, progress=False, precision="float64")  # a Linear on tokens: replay
    ref = oracle(seq, "0", Xs, y, r.indices)
    assert r.method == "replay" and torch.allclose(r.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-12)


# --- pruned layers, every precision and backend ------------------------------------------------

@pytest.mark.parametrize("precision", ["model", "float64"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "naive"])
def test_pruned_layer_after_a_grad_forward(precision, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))
    X, y = data()
    tprune.l1_unstructured(model[0], "weight", amount=0.4)
    F.cross_entropy(model(X), y).backward()  # as after training: weight is a non-leaf tensor
    reference = copy.deepcopy(model[0].weight_orig.detach() * model[0].weight_mask)
    plain = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))
    plain.load_state_dict({"0.weight": reference, "0.bias": model[0].bias.detach(),
                           "2.weight": model[2].weight.detach(), "2.bias": model[2].bias.detach()})
    idx = torch.arange(0, D * H, 3)
    r = wa.ablate(model, "0", (X, y), idx, backend=backend, precision=precision, progress=False)
    ref = oracle(plain, "0", X, y, idx)
    tol = 1e-9 if precision == "float64" else 1e-5
    assert torch.allclose(r.delta_loss, ref["delta_loss"], rtol=tol, atol=1e-4 * ref["abs_sum"].max() + 1e-12)
    masked = model[0].weight_mask.reshape(-1)[idx] == 0
    assert masked.any() and (r.delta_loss[masked] == 0).all() and r.exact_zero[masked].all()
    assert torch.equal(model[0].weight_orig * model[0].weight_mask, reference)  # nothing changed


# --- the self-check ----------------------------------------------------------------------------

def test_self_check_runs_and_says_so():
    model = Block()
    X, y = data()
    r = wa.ablate(model, "fc1", (X, y), 10, progress=False)
    assert "4 weights x 8 samples agreed with the float64 loop" in r.extra["self_check"]
    r = wa.ablate(model, "fc1", (X, y), 10, progress=False, verify=False)
    assert "self_check" not in r.extra
    with pytest.raises(TypeError, match="verify must be True or False"):
        wa.ablate(model, "fc1", (X, y), 10, progress=False, verify="yes")


@pytest.mark.parametrize("module, layer, shape", [
    ("weightablate.closed_form.ClosedForm", "fc1", (D,)),
    ("weightablate.replay.Replay", "fc1", (D,)),
    ("weightablate.funnel.Funnel", "conv", (3, 5, 5)),
])
def test_self_check_catches_a_broken_method(monkeypatch, module, layer, shape):
    """A method made wrong on purpose (one weight's scores off by 1%) is caught, never returned."""
    import importlib

    mod_name, cls_name = module.rsplit(".", 1)
    cls = getattr(importlib.import_module(mod_name), cls_name)
    original = cls.score

    def broken(self, batch, sl):
        out = list(original(self, batch, sl))
        out[0] = out[0] * 1.01
        return tuple(out)

    monkeypatch.setattr(cls, "score", broken)
    if layer == "conv":
        model = ConvBroadcast("none")
    else:
        model = Block(head=CosineHead(H, C)) if cls_name == "Replay" else Block()
    X, y = data(shape=shape)
    with pytest.raises(wa.VerificationError, match=rf"self-check failed: method '\w+' gives delta_loss=.* for entry "
                                                   rf"\d+ of {layer}.weight"):
        wa.ablate(model, layer, (X, y), 10, progress=False)
    r = wa.ablate(model, layer, (X, y), 10, progress=False, verify=False)  # the broken number, unchecked
    assert r.delta_loss is not None


# --- found by an adversarial review of the dataflow dispatch -------------------------------------

class Tricky(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, C)
        self.lo = nn.Parameter(torch.linspace(-0.5, 0.2, H))

    def forward(self, x):
        k, h = self.kind, self.fc1(x)
        if k == "tensor_split":  # a view op no list names: unit 0 tripled in h
            a, _ = h.tensor_split([1], dim=1)
            a.mul_(3)
        if k == "data_clamp":
            h.data.clamp_(max=0.5)
        if k == "out_kwarg":
            torch.mul(h, 3.0, out=h)
        if k == "tensor_clamp":  # a per-unit learnable floor
            h = torch.clamp(h, min=self.lo) * 1.5
        if k == "where":
            h = torch.where(h > 0, h, 0.1 * h)
        if k == "mask":
            h = (h > 0).float() * h
        if k == "masked_fill":
            h = torch.relu(h).masked_fill_(h < -0.5, 0.1)
        if k == "gather_argmax":
            return self.fc2(torch.relu(h)) + torch.relu(h).gather(1, h.argmax(1, keepdim=True))
        if k == "mT":
            return self.fc2(torch.relu(h).mT.mT)
        return self.fc2(torch.relu(h))


@pytest.mark.parametrize("kind", ["out_kwarg", "tensor_clamp", "where", "mask", "masked_fill", "gather_argmax"])
def test_values_views_and_integers_derived_from_the_target(kind):
    X, y = data()
    check_exact(Tricky(kind), "fc1", X, y, k=None)


@pytest.mark.parametrize("kind, pattern", [("tensor_split", "another view of the same memory"),
                                           ("data_clamp", "another view of the same memory"),
                                           ("mT", r"node 'getattr_1' .* does not keep the batch as its first axis")])
def test_refused_with_the_construct_named(kind, pattern):
    X, y = data()
    with pytest.raises(ValueError, match=pattern):
        wa.ablate(Tricky(kind), "fc1", (X, y), 4, progress=False)


def test_hooks_and_parametrizations_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))
    X, y = data()

    def knock_out(mod, inp, out):
        out = out.clone()
        out[:, 3] = 0
        return out

    handle = model[0].register_forward_hook(knock_out)
    with pytest.raises(ValueError, match=r"module '0' has a forward hook \(knock_out\)"):
        wa.ablate(model, "0", (X, y), 4, progress=False)
    handle.remove()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(ValueError, match="computed by a parametrization"):
        wa.ablate(model, "0", (X, y), 4, progress=False)


def test_random_or_batch_mixing_forward_is_refused():
    class Mixing(nn.Module):
        def __init__(self, kind):
            super().__init__()
            torch.manual_seed(0)
            self.kind, self.fc1, self.fc2 = kind, nn.Linear(D, H), nn.Linear(H, C)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            if self.kind == "dropout":
                return self.fc2(F.dropout(h, 0.5))  # training=True by default: random in eval too
            return self.fc2(h - h.mean(0, keepdim=True))

    X, y = data()
    with pytest.raises(ValueError, match="two forwards on the same inputs gave different logits"):
        wa.ablate(Mixing("dropout"), "fc1", (X, y), 4, progress=False)
    with pytest.raises(ValueError, match="depend on the other samples of its batch"):
        wa.ablate(Mixing("center"), "fc1", (X, y), 4, progress=False)


def test_functional_use_of_the_target_names_it():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, C)

        def forward(self, x):
            return self.fc2(torch.relu(F.linear(x, self.fc1.weight, self.fc1.bias)))

    X, y = data()
    with pytest.raises(ValueError, match=r"layer 'fc1' is not called as a module: forward reads its weight"):
        wa.ablate(Functional(), "fc1", (X, y), 4, progress=False)


@pytest.mark.parametrize("backend", ["cpu", "naive"])
def test_non_contiguous_weights(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, C)).eval()
    model = model.to(memory_format=torch.channels_last)
    X, y = data(shape=(3, 5, 5))
    m64 = copy.deepcopy(model).double()
    r = wa.ablate(m64, "0", (X.double(), y), 10, backend=backend, progress=False)
    ref = oracle(model, "0", X, y, r.indices)
    assert torch.allclose(r.delta_loss, ref["delta_loss"], rtol=1e-9, atol=1e-12)


def test_results_carry_no_autograd_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.GELU(), nn.Linear(H, C))
    X, y = data()
    r = wa.ablate(model, "0", (X, y), 6, progress=False)
    assert r.method == "replay" and not r.delta_loss.requires_grad


def test_float32_rounding_beyond_the_bound_warns_not_fails(monkeypatch):
    """A float32 run beyond the float32 bound whose method agrees in float64 is rounding: a warning."""
    import weightablate.verify as verify

    monkeypatch.setitem(verify.BOUNDS, torch.float32, (1e-14, 1e-14))  # no float32 run can meet this
    model = Block()
    X, y = data()
    with pytest.warns(UserWarning, match="float32 activations' rounding exceeds the stated float32 bound"):
        r = wa.ablate(model, "fc1", (X, y), 10, progress=False)
    assert "the method in float64 agreed" in r.extra["self_check"]

"""Bad inputs get a clear ValueError/TypeError naming the argument; the model is never changed.

Every check here asserts the message as well as the type: an error a user cannot act on is
a bug too.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightablate as wa

ALL_BACKENDS = ["cpu", "torch", "naive"]


def mlp(seed=0, n_in=4, hidden=5, n_cls=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_cls))


def xy(n=10, n_in=4, n_cls=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g), torch.randint(0, n_cls, (n,), generator=g)


@pytest.fixture
def model():
    return mlp()


@pytest.fixture
def data():
    return xy()


# ----------------------------------------------------------------------------------------- layer


def test_unknown_layer_names_it_and_lists_linear_layers(model, data):
    with pytest.raises(ValueError, match=r"'nope'") as info:
        wa.ablate(model, "nope", data)
    msg = str(info.value)
    assert "'0'" in msg and "'2'" in msg, msg  # the Linear layers are listed
    assert "'1'" not in msg, msg  # the ReLU is not a Linear layer


def test_layer_naming_a_parameter_is_not_a_module(model, data):
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        wa.ablate(model, "0.weight", data)


def test_relu_layer_is_a_type_error(model, data):
    with pytest.raises(TypeError, match=r"layer '1'.*ReLU.*Linear"):
        wa.ablate(model, "1", data)


def test_conv1d_layer_is_a_type_error():
    """Linear and Conv2d targets only (tests/test_any_layer.py covers Conv2d)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2, 3))
    X, y = torch.randn(6, 1, 4), torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match=r"layer '0'.*Conv1d.*Linear.*Conv2d"):
        wa.ablate(model, "0", (X, y))
    with pytest.raises(TypeError, match=r"Conv1d"):
        wa.ablate(model, model[0], (X, y))


def test_layer_module_not_in_model(model, data):
    with pytest.raises(ValueError, match=r"layer.*not part of the model"):
        wa.ablate(model, nn.Linear(4, 5), data)


def test_layer_of_wrong_type(model, data):
    with pytest.raises(TypeError, match=r"layer"):
        wa.ablate(model, 0, data)


def test_model_not_a_module(data):
    with pytest.raises(TypeError, match=r"model"):
        wa.ablate(lambda x: x, "0", data)


# --------------------------------------------------------------------------------------- weights

# layer "0" is 5 x 4 = 20 weights
BAD_WEIGHTS = [
    (0, ValueError, r"weights=0"),
    (21, ValueError, r"weights=21.*20"),
    (-3, ValueError, r"weights=-3"),
    (True, TypeError, r"weights"),
    (False, TypeError, r"weights"),
    (torch.tensor([0, 20]), ValueError, r"weights.*out of range"),
    (torch.tensor([-1, 3]), ValueError, r"weights.*out of range"),
    ([3, 100], ValueError, r"weights.*out of range"),
    (torch.tensor([1, 4, 1]), ValueError, r"weights.*duplicate"),
    (torch.tensor([0.0, 1.0]), TypeError, r"weights.*integer"),
    (torch.tensor([True, False]), TypeError, r"weights.*integer"),
    (torch.tensor([[0, 1], [2, 3]]), ValueError, r"weights.*1-D"),
    (torch.tensor([], dtype=torch.int64), ValueError, r"weights.*empty"),
    ((torch.tensor([0, 1]), torch.tensor([0])), ValueError, r"weights.*rows and cols"),
    ((torch.tensor([0, 5]), torch.tensor([0, 1])), ValueError, r"weights.*rows.*out of range"),
    ((torch.tensor([0, 1]), torch.tensor([0, 4])), ValueError, r"weights.*cols.*out of range"),
    ((torch.tensor([-1, 1]), torch.tensor([0, 1])), ValueError, r"weights.*rows.*out of range"),
    ((torch.tensor([0, 1]), torch.tensor([-2, 1])), ValueError, r"weights.*cols.*out of range"),
    ((torch.tensor([1, 1]), torch.tensor([2, 2])), ValueError, r"weights.*duplicate"),
    ((torch.tensor([0.0]), torch.tensor([1])), TypeError, r"weights.*rows.*integer"),
    ((torch.tensor([0]), torch.tensor([1.5])), TypeError, r"weights.*cols.*integer"),
    ("abc", TypeError, r"weights"),
    (1.5, TypeError, r"weights"),
]


@pytest.mark.parametrize("weights,exc,pattern", BAD_WEIGHTS, ids=[f"w{k}" for k in range(len(BAD_WEIGHTS))])
def test_bad_weights(model, data, weights, exc, pattern):
    with pytest.raises(exc, match=pattern):
        wa.ablate(model, "0", data, weights)


def test_good_weight_forms_agree(model, data):
    flat = torch.tensor([7, 0, 19])
    a = wa.ablate(model, "0", data, flat, backend="cpu")
    b = wa.ablate(model, "0", data, (flat // 4, flat % 4), backend="cpu")
    c = wa.ablate(model, "0", data, [7, 0, 19], backend="cpu")
    for r in (b, c):
        assert torch.equal(r.indices, a.indices)
        assert torch.equal(r.delta_loss, a.delta_loss)
    full = wa.ablate(model, "0", data, 20, backend="cpu")
    assert torch.equal(full.indices, torch.arange(20))


# ---------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 3, 7, -100])
def test_labels_out_of_range(model, backend, bad):
    X, y = xy()
    y = y.clone()
    y[4] = bad  # -100 is cross_entropy's ignore_index: must not silently drop the sample
    with pytest.raises(ValueError, match=r"(data|labels).*\[0, 3\)"):
        wa.ablate(model, "0", (X, y), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_labels_out_of_range_in_a_later_batch(model, backend):
    X, y = xy()
    bad = y.clone()
    bad[0] = 3
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        wa.ablate(model, "0", [(X, y), (X, bad)], backend=backend)


def test_float_labels(model, data):
    X, y = data
    with pytest.raises(TypeError, match=r"data: batch 0 labels.*integer.*float"):
        wa.ablate(model, "0", (X, y.float()))


def test_bool_labels(model, data):
    X, y = data
    with pytest.raises(TypeError, match=r"labels.*integer"):
        wa.ablate(model, "0", (X, y > 0))


def test_label_count_mismatch(model, data):
    X, y = data
    with pytest.raises(ValueError, match=r"data: X has 10 samples but y has 5"):
        wa.ablate(model, "0", (X, y[:5]))
    with pytest.raises(ValueError, match=r"data: batch 1 has labels of shape \(5,\) for 10 inputs"):
        wa.ablate(model, "0", [(X, y), (X, y[:5])])


def test_label_shape_2d(model, data):
    X, y = data
    with pytest.raises(ValueError, match=r"data: labels of shape \(\d+, 1\) for logits \(\d+, 3\)"):
        wa.ablate(model, "0", [(X, y[:, None])])


# ------------------------------------------------------------------------------------------ data


def test_empty_tensor_data(model, data):
    X, y = data
    with pytest.raises(ValueError, match=r"data: no samples"):
        wa.ablate(model, "0", (X[:0], y[:0]))


def test_empty_list_data(model):
    with pytest.raises(ValueError, match=r"data: no samples"):
        wa.ablate(model, "0", [])


def test_only_empty_batches(model, data):
    X, y = data
    with pytest.raises(ValueError, match=r"data: no samples"):
        wa.ablate(model, "0", [(X[:0], y[:0]), (X[:0], y[:0])])


def test_data_not_iterable(model):
    with pytest.raises(TypeError, match=r"data"):
        wa.ablate(model, "0", 3)
    with pytest.raises(TypeError, match=r"data"):
        wa.ablate(model, "0", torch.randn(10, 4))


def test_data_batch_not_a_pair(model, data):
    X, y = data
    with pytest.raises(TypeError, match=r"data: batch 1"):
        wa.ablate(model, "0", [(X, y), (X, y, y)])
    with pytest.raises(TypeError, match=r"data: batch 0"):
        wa.ablate(model, "0", [(X.tolist(), y)])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_name_the_batch(model, data, value):
    X, y = data
    bad = X.clone()
    bad[3, 2] = value
    with pytest.raises(ValueError, match=r"data: batch 2 .*NaN or inf"):
        wa.ablate(model, "0", [(X, y), (X, y), (bad, y)])
    with pytest.raises(ValueError, match=r"data: batch 0 .*NaN or inf"):
        wa.ablate(model, "0", (bad, y))


@pytest.mark.parametrize("where", ["0.weight", "2.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_model_parameter_is_named(data, where, value):
    model = mlp()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[1] = value
    with pytest.raises(ValueError, match=r"model: " + re.escape(where) + r" contains NaN or inf"):
        wa.ablate(model, "0", data)


def test_non_finite_model_buffer_is_named(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()
    model[1].running_var[2] = float("nan")
    with pytest.raises(ValueError, match=r"model: 1\.running_var contains NaN or inf"):
        wa.ablate(model, "0", data)


def test_float64_inputs_for_float32_model(model, data):
    X, y = data
    with pytest.raises(TypeError, match=r"data: batch 0 inputs are torch\.float64.*torch\.float32"):
        wa.ablate(model, "0", (X.double(), y))
    with pytest.raises(TypeError, match=r"data: batch 0 inputs are torch\.float64"):
        wa.ablate(model, "0", (X.double(), y), precision="float64")


def test_float32_inputs_for_float64_model(data):
    model = mlp().double()
    with pytest.raises(TypeError, match=r"data: batch 0 inputs are torch\.float32.*torch\.float64"):
        wa.ablate(model, "0", data)


@pytest.mark.parametrize("bs", [0, -1, 2.0, True])
def test_bad_batch_size(model, data, bs):
    with pytest.raises(ValueError, match=r"batch_size"):
        wa.ablate(model, "0", data, batch_size=bs)


def test_bad_seed(model, data):
    with pytest.raises(TypeError, match=r"seed"):
        wa.ablate(model, "0", data, 3, seed="1")


# ------------------------------------------------------------------------------- options, device


def test_device_cuda_on_cpu_model(model, data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: a cuda device is a valid request there")
    with pytest.raises(ValueError, match=r"device='cuda'"):
        wa.ablate(model, "0", data, device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda:0'"):
        wa.ablate(model, "0", data, device=torch.device("cuda", 0))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0", torch.device("cpu", 0)],
                         ids=["cpu", "device(cpu)", "cpu:0", "device(cpu,0)"])
def test_device_cpu_is_fine(model, data, device):
    # parameters of a CPU model report device "cpu" (no index); "cpu:0" names the same device
    r = wa.ablate(model, "0", data, 3, device=device)
    assert len(r) == 3


def test_model_on_two_devices(data):
    """Without a GPU: one submodule on the meta device stands in for a second device."""
    model = mlp()
    model[2].to("meta")
    with pytest.raises(ValueError, match=r"model: .*several devices.*'cpu'.*'meta'"):
        wa.ablate(model, "0", data)


def test_unknown_backend(model, data):
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        wa.ablate(model, "0", data, backend="gpu")


def test_cuda_backend_without_cuda_kernel(model, data):
    if "cuda" in wa.ops.compiled_backends() and torch.cuda.is_available():
        pytest.skip("a CUDA kernel and a GPU are available")
    with pytest.raises((RuntimeError, ValueError), match=r"cuda"):
        wa.ablate(model, "0", data, backend="cuda")


def test_unknown_mode(model, data):
    with pytest.raises(ValueError, match=r"mode.*'fast'"):
        wa.ablate(model, "0", data, mode="fast")


@pytest.mark.parametrize("metrics", ["accuracy", ("loss", "acc"), ()])
def test_unknown_metric(model, data, metrics):
    with pytest.raises(ValueError, match=r"metrics"):
        wa.ablate(model, "0", data, metrics=metrics)


def test_unknown_precision(model, data):
    with pytest.raises(ValueError, match=r"precision.*'float16'"):
        wa.ablate(model, "0", data, precision="float16")


# --------------------------------------------------------------------------------- model structure


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))), x


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_model_returning_tuple(backend, data):
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"model"):
        wa.ablate(TupleOut(), "fc1", data, backend=backend)


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class FunctionalOnLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return F.relu(self.fc2(self.fc1(x)))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.fc1(torch.relu(self.fc1(x))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h) + h)


def test_batchnorm_without_running_stats_after_target(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU(),
                          nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        wa.ablate(model, "0", data)



def _no_closed_form_models():
    torch.manual_seed(0)
    return [
        (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3)), "0",
         r"module '1' \(LayerNorm\).*not a known element-wise map"),
        (FunctionalOnLogits(), "fc1", r"runs after the final Linear 'fc2'"),
        (Residual(), "fc1", r"add.*not an element-wise map of the previous value alone"),
        (nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(1)), "0",
         r"module '3' \(LogSoftmax\)"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU()), "0", r"layer '0'.*ReLU"),
    ]


def test_functional_relu_takes_the_closed_form(data):
    """F.relu between the target and the final Linear is the same element-wise map as nn.ReLU."""
    from oracle import oracle

    torch.manual_seed(0)
    model = FunctionalRelu()
    X, y = data
    idx = torch.arange(model.fc1.weight.numel())
    r = wa.ablate(model, "fc1", data, weights=idx, precision="float64")
    assert r.method == "piecewise", r.head
    ref = oracle(model, "fc1", X, y, idx)
    assert ((r.delta_loss - ref["delta_loss"]).abs() <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all()


@pytest.mark.parametrize("case", range(5))
def test_no_closed_form_head_replays_and_says_why(case, data):
    """Tails the closed form cannot take run through the funnel or replay; res.head names what broke the
    closed form."""
    from oracle import oracle

    model, layer, why = _no_closed_form_models()[case]
    X, y = data
    idx = torch.arange(model.get_submodule(layer).weight.numel())
    r = wa.ablate(model, layer, data, weights=idx, precision="float64")
    assert r.method in ("funnel", "replay")
    assert re.search(why, r.head), r.head
    ref = oracle(model, layer, X, y, idx)
    assert ((r.delta_loss - ref["delta_loss"]).abs() <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all()
    assert torch.equal(r.flips, ref["flips"])

def test_shared_target_used_twice(data):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'fc1' runs 2 times per forward pass"):
        wa.ablate(Shared(), "fc1", data)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_target_not_run_in_forward(data):
    torch.manual_seed(0)
    model = WithUnused()
    with pytest.raises(ValueError, match=r"'unused' does not run in the model's forward"):
        wa.ablate(model, "unused", data)


# ------------------------------------------------------------- the model is never changed


class Net(nn.Module):
    """Dropout and BatchNorm (train mode changes buffers and outputs), a submodule kept in eval."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.drop(self.act(self.bn(self.fc(self.body(x))))))


def net():
    torch.manual_seed(3)
    m = Net()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    m.train()
    m.body[2].eval()  # a submodule the user left in eval
    m.drop.eval()
    return m


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: m.training for name, m in model.named_modules()})


def assert_unchanged(model, snap):
    state, modes = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device, k
        assert torch.equal(now[k], v), f"{k} changed"
        if v.is_floating_point():  # bitwise, signed zeros included
            assert torch.equal(now[k].view(torch.int32 if v.dtype == torch.float32 else torch.int64),
                               v.view(torch.int32 if v.dtype == torch.float32 else torch.int64)), k
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
    for p in model.parameters():
        assert p.grad is None and p.requires_grad


def data_net(n=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class FailingBatches:
    """A DataLoader-like iterable whose ``fail_at``-th batch (of pass ``fail_pass``) raises."""

    def __init__(self, X, y, bs, fail_at, exc, fail_pass=1):
        self.X, self.y, self.bs, self.fail_at, self.exc, self.fail_pass = X, y, bs, fail_at, exc, fail_pass
        self.passes = 0
        self.served = 0

    def __len__(self):
        return -(-self.X.shape[0] // self.bs)

    def __iter__(self):
        self.passes += 1
        for k, s in enumerate(range(0, self.X.shape[0], self.bs)):
            if self.passes == self.fail_pass and k == self.fail_at:
                raise self.exc("simulated failure in the data loader")
            self.served += 1
            yield self.X[s : s + self.bs], self.y[s : s + self.bs]


@pytest.mark.parametrize("precision", ["model", "float64"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_success_leaves_model_unchanged(backend, precision):
    model = net()
    snap = snapshot(model)
    X, y = data_net()
    r = wa.ablate(model, "fc", (X, y), 12, backend=backend, precision=precision, batch_size=5)
    assert len(r) == 12 and r.backend == backend
    assert_unchanged(model, snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_data_failure_midway_leaves_model_unchanged(backend, exc):
    model = net()
    snap = snapshot(model)
    X, y = data_net()
    loader = FailingBatches(X, y, 4, fail_at=2, exc=exc)
    # a Ctrl-C comes back as weightablate.sweep.Interrupted (a KeyboardInterrupt) saying where the sweep stopped
    with pytest.raises(exc, match="simulated" if exc is RuntimeError or backend == "naive" else "interrupted after batch 2"):
        wa.ablate(model, "fc", loader, 10, backend=backend)
    assert loader.served == 2
    assert_unchanged(model, snap)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_data_failure_on_third_pass(backend):
    """A loader that only fails when iterated a third time: whether or not the library iterates
    it that often, the call either succeeds or raises, and the model is untouched."""
    model = net()
    snap = snapshot(model)
    X, y = data_net()
    loader = FailingBatches(X, y, 4, fail_at=1, exc=KeyboardInterrupt, fail_pass=3)
    try:
        wa.ablate(model, "fc", loader, 6, backend=backend)
    except KeyboardInterrupt:
        assert loader.passes >= 3
    assert_unchanged(model, snap)


class Interrupt:
    """A forward pre-hook that raises on the ``at``-th forward call of the model."""

    def __init__(self, at, exc):
        self.calls, self.at, self.exc = 0, at, exc
        self.zeroed = None

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            self.zeroed = int((module.fc.weight == 0).sum())
            raise self.exc("simulated interrupt in forward")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_inside_the_loop_leaves_model_unchanged(backend, exc):
    """Raised from inside the model while the naive loop has a weight zeroed (3rd forward: the
    base evaluation, weight 1, then weight 2), or while capturing batch 2 for the closed form."""
    model = net()
    snap = snapshot(model)
    X, y = data_net()
    hook = Interrupt(at=3, exc=exc)
    handle = model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(exc, match="simulated"):
            wa.ablate(model, "fc", [(X[:4], y[:4]), (X[4:8], y[4:8]), (X[8:], y[8:])] if backend != "naive"
                      else (X, y), 10, backend=backend)
    finally:
        handle.remove()
    if backend == "naive":
        assert hook.zeroed == 1  # the interrupt did hit a zeroed weight
    assert_unchanged(model, snap)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_validation_failure_midway_leaves_model_unchanged(backend):
    model = net()
    snap = snapshot(model)
    X, y = data_net()
    bad = y.clone()
    bad[0] = 9
    with pytest.raises(ValueError, match="labels"):
        wa.ablate(model, "fc", [(X, y), (X, bad)], backend=backend)
    assert_unchanged(model, snap)


def test_head_error_leaves_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Dropout(0.2),
                          nn.Linear(5, 3)).train()
    model[2].eval()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        wa.ablate(model, "0", data_net())
    assert_unchanged(model, snap)


def test_results_do_not_alias_the_model():
    model = net()
    X, y = data_net()
    r = wa.ablate(model, "fc", (X, y), torch.tensor([0, 5, 7]))
    assert torch.equal(r.weight, model.fc.weight.detach().view(-1)[[0, 5, 7]])
    r.weight.zero_()
    assert (model.fc.weight.detach().view(-1)[[0, 5, 7]] != 0).all()


def test_tf32_on_a_gpu_is_named():
    """cuDNN runs float32 convolutions in TF32 by default; ablate warns rather than return numbers
    outside its float32 bound. Only flags are read, so this runs without a GPU."""
    from weightablate.api import tf32_in_use

    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    mlp = nn.Sequential(nn.Linear(4, 3))
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    cudnn, cublas = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = cudnn.fp32_precision, cublas.fp32_precision
    try:
        cudnn.fp32_precision, cublas.fp32_precision = "tf32", "ieee"
        assert tf32_in_use(conv, cpu) == [] and tf32_in_use(mlp, gpu) == []
        assert [u.split()[0] for u in tf32_in_use(conv, gpu)] == ["cuDNN"]
        cudnn.fp32_precision = "ieee"
        assert tf32_in_use(conv, gpu) == []
        cublas.fp32_precision = "tf32"
        assert [u.split()[0] for u in tf32_in_use(mlp, gpu)] == ["matmuls"]
    finally:
        cudnn.fp32_precision, cublas.fp32_precision = saved

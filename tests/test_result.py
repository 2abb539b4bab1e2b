"""AblationResult: save/load round trip, to_dataframe, and the consistency of its fields."""
import dataclasses

import pytest
import torch
from torch import nn

import weightablate as wa
from weightablate.result import AblationResult

TENSORS = ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl", "flips", "new_errors", "new_correct",
           "exact_zero")
METRIC_FIELDS = {"loss": ("delta_loss",), "kl": ("delta_kl",), "flips": ("flips", "new_errors", "new_correct")}


def problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4))
    with torch.no_grad():
        model[0].bias[0] = -50.0  # a dead unit: some exact zeros
    X, y = torch.randn(30, 6), torch.randint(0, 4, (30,))
    X[:, 1] = 0.0  # an input that is always zero: more exact zeros
    return model, X, y


@pytest.fixture(scope="module")
def results():
    model, X, y = problem()
    out = {}
    for backend in ("cpu", "torch", "naive"):
        out[backend] = wa.ablate(model, "0", (X, y), None, backend=backend, batch_size=8)
    out["subset"] = wa.ablate(model, "0", (X, y), torch.tensor([40, 3, 17, 8, 0]), metrics=("kl",))
    out["loss_only"] = wa.ablate(model, "0", (X, y), 9, metrics="loss", seed=5)
    out["flips_only"] = wa.ablate(model, "0", (X, y), 9, metrics=["flips"], precision="float64")
    return model, X, y, out


def bits(t):
    """Tensor -> its raw bits, so that equality is bitwise (signed zeros, NaN payloads)."""
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def assert_identical(a: AblationResult, b: AblationResult):
    for f in dataclasses.fields(AblationResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in TENSORS:
            if x is None or y is None:
                assert x is None and y is None, f.name
                continue
            assert isinstance(y, torch.Tensor), f.name
            assert x.dtype == y.dtype and x.shape == y.shape and y.device.type == "cpu", f.name
            assert torch.equal(bits(x), bits(y)), f.name
        else:
            assert type(x) is type(y), (f.name, type(x), type(y))
            assert x == y, (f.name, x, y)


KEYS = ["cpu", "torch", "naive", "subset", "loss_only", "flips_only"]


@pytest.mark.parametrize("key", KEYS)
def test_save_load_round_trip_is_bit_exact(results, key, tmp_path):
    r = results[3][key]
    path = tmp_path / "result.npz"
    r.save(path)
    back = wa.load(path)
    assert_identical(r, back)
    # and again from the loaded copy: a second round trip changes nothing
    path2 = tmp_path / "again.npz"
    back.save(str(path2))
    assert_identical(r, wa.load(str(path2)))


def test_save_path_is_used_as_given(results, tmp_path):
    r = results[3]["subset"]
    path = tmp_path / "no_suffix"
    r.save(path)
    assert path.exists() and not (tmp_path / "no_suffix.npz").exists()
    assert_identical(r, wa.load(path))


def test_save_load_extra_metadata(results, tmp_path):
    r = dataclasses.replace(results[3]["cpu"], extra={"dataset": "digits", "split": "test", "n": 3, "x": 0.1})
    r.save(tmp_path / "r.npz")
    back = wa.load(tmp_path / "r.npz")
    assert back.extra == r.extra
    assert_identical(r, back)


def test_save_load_negative_zero_and_extremes(tmp_path):
    """Hand-made values: signed zeros, subnormals and huge values survive bit for bit."""
    vals = torch.tensor([-0.0, 0.0, 5e-324, -1e308, 1.0 / 3.0], dtype=torch.float64)
    idx = torch.arange(5)
    r = AblationResult(indices=idx, rows=idx // 5, cols=idx % 5, weight=torch.tensor([-0.0, 1e-45, 1.0, -2.0, 3.0]),
                       delta_loss=vals, delta_kl=vals.abs(), flips=torch.tensor([0, 1, 2, 3, 2**40]),
                       new_errors=None, new_correct=None, exact_zero=torch.tensor([True, False, False, True, False]),
                       n_samples=7, base_loss=0.1 + 0.2, base_accuracy=3 / 7, layer="a.b", layer_shape=(1, 5),
                       method="piecewise", head="h", backend="cpu", mode="auto", precision="model", seconds=1e-9)
    r.save(tmp_path / "r.npz")
    assert_identical(r, wa.load(tmp_path / "r.npz"))


@pytest.mark.parametrize("key,metrics", [("subset", ("kl",)), ("loss_only", ("loss",)), ("flips_only", ("flips",))])
def test_metrics_not_requested_are_none(results, key, metrics):
    r = results[3][key]
    for metric, names in METRIC_FIELDS.items():
        for name in names:
            if metric in metrics:
                assert isinstance(getattr(r, name), torch.Tensor), name
            else:
                assert getattr(r, name) is None, name
    assert isinstance(r.exact_zero, torch.Tensor)
    if "loss" not in metrics:
        assert r.delta_loss_mean is None


def test_requested_metrics_equal_the_full_run(results):
    model, X, y, out = results
    full = wa.ablate(model, "0", (X, y), 9, seed=5)
    assert torch.equal(out["loss_only"].indices, full.indices)
    assert torch.equal(out["loss_only"].delta_loss, full.delta_loss)
    assert torch.equal(out["loss_only"].exact_zero, full.exact_zero)
    sub = wa.ablate(model, "0", (X, y), torch.tensor([40, 3, 17, 8, 0]))
    assert torch.equal(out["subset"].delta_kl, sub.delta_kl)


@pytest.mark.parametrize("key", KEYS)
def test_to_dataframe(results, key):
    pd = pytest.importorskip("pandas")
    r = results[3][key]
    df = r.to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert len(df) == len(r) == r.indices.numel()
    present = [n for n in TENSORS if getattr(r, n) is not None]
    expected = present + (["delta_loss_mean"] if r.delta_loss is not None else [])
    assert list(df.columns) == expected
    for name in present:
        assert (df[name].to_numpy() == getattr(r, name).numpy()).all(), name
    if r.delta_loss is not None:
        assert (df["delta_loss_mean"].to_numpy() == r.delta_loss_mean.numpy()).all()


@pytest.mark.parametrize("key", KEYS)
def test_fields_are_consistent(results, key):
    model, X, y, out = results
    r = out[key]
    layer = model[0]
    n_out, n_in = layer.weight.shape
    K = len(r)
    assert r.layer == "0" and tuple(r.layer_shape) == (n_out, n_in)
    assert r.n_samples == X.shape[0]
    for name in TENSORS:
        t = getattr(r, name)
        if t is not None:
            assert t.shape == (K,) and t.device.type == "cpu", name
    assert r.indices.dtype == torch.int64 and r.rows.dtype == torch.int64 and r.cols.dtype == torch.int64
    assert torch.equal(r.rows, r.indices // n_in) and torch.equal(r.cols, r.indices % n_in)
    assert torch.equal(r.rows * n_in + r.cols, r.indices)
    assert ((0 <= r.rows) & (r.rows < n_out)).all() and ((0 <= r.cols) & (r.cols < n_in)).all()
    assert r.weight.dtype == layer.weight.dtype
    assert torch.equal(bits(r.weight), bits(layer.weight.detach().flatten()[r.indices]))
    assert torch.equal(r.weight, layer.weight.detach()[r.rows, r.cols])
    assert r.exact_zero.dtype == torch.bool
    if r.delta_loss is not None:
        assert r.delta_loss.dtype == torch.float64
        assert torch.equal(r.delta_loss_mean, r.delta_loss / r.n_samples)
        assert (r.delta_loss[r.exact_zero] == 0).all()
    if r.delta_kl is not None:
        assert r.delta_kl.dtype == torch.float64 and (r.delta_kl >= 0).all()
    if r.flips is not None:
        for name in ("flips", "new_errors", "new_correct"):
            assert getattr(r, name).dtype == torch.int64 and (getattr(r, name) >= 0).all()
        assert (r.new_errors + r.new_correct <= r.flips).all()
        assert (r.flips <= r.n_samples).all()
    assert 0.0 <= r.base_accuracy <= 1.0 and r.base_loss > 0
    assert r.seconds > 0
    assert r.mode == "auto"
    assert "'0'" in repr(r) and str(K) in repr(r)


def test_exact_zero_flags_the_dead_unit_and_zero_input(results):
    model, X, y, out = results
    with torch.no_grad():
        z = model[0](X).double()
    W = model[0].weight.detach().double()
    for key in ("cpu", "torch", "naive"):
        r = out[key]
        # no sample's hidden unit moves: the zeroed input column, or a unit ReLU keeps off either way
        moved = torch.relu(z[:, r.rows] - W[r.rows, r.cols] * X[:, r.cols].double()) != torch.relu(z[:, r.rows])
        assert torch.equal(r.exact_zero, ~moved.any(0)), key
        assert r.exact_zero[(r.rows == 0) | (r.cols == 1)].all(), key
        assert not r.exact_zero.all(), key


def test_metadata_of_each_backend(results):
    out = results[3]
    for b in ("cpu", "torch", "naive"):
        assert out[b].backend == b
        assert out[b].method == ("naive" if b == "naive" else "piecewise")
        assert out[b].precision == "model"
    assert out["flips_only"].precision == "float64"
    assert out["cpu"].base_loss == pytest.approx(out["naive"].base_loss, rel=1e-6)
    assert out["cpu"].base_accuracy == out["naive"].base_accuracy


def test_selection_order_is_kept(results):
    r = results[3]["subset"]
    assert r.indices.tolist() == [40, 3, 17, 8, 0]
    assert r.rows.tolist() == [6, 0, 2, 1, 0] and r.cols.tolist() == [4, 3, 5, 2, 0]


def test_int_selection_is_sorted_and_seeded(results):
    model, X, y, out = results
    r = out["loss_only"]
    assert len(r) == 9 and (r.indices[1:] > r.indices[:-1]).all()
    again = wa.ablate(model, "0", (X, y), 9, metrics="loss", seed=5)
    other = wa.ablate(model, "0", (X, y), 9, metrics="loss", seed=6)
    assert torch.equal(again.indices, r.indices)
    assert not torch.equal(other.indices, r.indices)


def _tampered(r, tmp_path, **changes):
    """Save ``r`` with some arrays/metadata replaced (None drops an entry)."""
    import json

    import numpy as np

    arrays = {n: getattr(r, n).numpy() for n in TENSORS + ("class_loss",) if getattr(r, n) is not None}
    meta = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in arrays and f.name not in
            TENSORS + ("class_loss",)}
    for k, v in changes.items():
        target = arrays if k in TENSORS + ("class_loss",) else meta
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v
    path = tmp_path / "t.npz"
    np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)
    return path


@pytest.mark.parametrize("change,needle", [
    (lambda r: {"delta_loss": r.delta_loss.numpy()[:-1]}, "delta_loss has shape"),
    (lambda r: {"delta_loss": r.delta_loss.numpy() * float("nan")}, "delta_loss contains NaN"),
    (lambda r: {"n_samples": 0}, "n_samples must be a positive int"),
    (lambda r: {"n_samples": None}, "lacks ['n_samples']"),
    (lambda r: {"base_accuracy": 1.5}, "base_accuracy"),
    (lambda r: {"indices": r.indices.numpy() + 1000}, "indices must lie in"),
    (lambda r: {"rows": r.rows.numpy() + 1}, "rows/cols do not match"),
    (lambda r: {"flips": r.flips.numpy() * 1.0}, "flips must hold integers"),
    (lambda r: {"exact_zero": None}, "missing arrays ['exact_zero']"),
    (lambda r: {"bogus": 1}, "unknown keys ['bogus']"),
    (lambda r: {"layer_shape": "7x6"}, "layer_shape must be a list"),
])
def test_load_refuses_an_inconsistent_file(results, tmp_path, change, needle):
    r = results[3]["cpu"]
    path = _tampered(r, tmp_path, **change(r))
    with pytest.raises(ValueError) as exc:
        wa.load(path)
    assert str(path) in str(exc.value) and needle in str(exc.value)


@pytest.mark.parametrize("content", [b"junk", b"PK\x03\x04junk"])
def test_load_refuses_a_foreign_file(tmp_path, content):
    import numpy as np

    path = tmp_path / "foreign.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a weightablate result"):
        wa.load(path)
    np.savez(path, a=np.arange(3))  # a real .npz, but not a result
    with pytest.raises(ValueError, match="no __meta__ entry"):
        wa.load(path)
    np.savez(path, __meta__=np.array("[1, 2]"))
    with pytest.raises(ValueError, match="__meta__ is a list"):
        wa.load(path)
    torch.save({"a": 1}, path)  # a torch checkpoint: a zip with a pickle inside
    with pytest.raises(ValueError, match=str(path)):
        wa.load(path)


def test_conv_coords_in_the_dataframe(tmp_path):
    pytest.importorskip("pandas")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, (2, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 2, 5))
    X, y = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,))
    r = wa.ablate(model, "0", (X, y), torch.tensor([0, 5, 17, 71]), method="replay")
    assert r.weight_shape == (4, 3, 2, 3)
    df = r.to_dataframe()
    assert list(df.columns[:7]) == ["indices", "rows", "cols", "out", "in", "kh", "kw"]
    for k, flat in enumerate([0, 5, 17, 71]):
        o, i, h, w = (int(v) for v in df.loc[k, ["out", "in", "kh", "kw"]])
        assert model[0].weight[o, i, h, w] == model[0].weight.reshape(-1)[flat] and (o, i, h, w) == \
            tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), (4, 3, 2, 3)))
    r.save(tmp_path / "c.npz")
    assert wa.load(tmp_path / "c.npz").weight_shape == (4, 3, 2, 3)
    bias = wa.ablate(model, "0", (X, y), "bias")
    assert list(bias.coords()) == ["out"] and (bias.coords()["out"] == bias.indices.numpy()).all()

"""The command line (`weightablate run`), the embedded digits default and the summary."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import weightablate
from weightablate import digits
from weightablate.cli import main
from weightablate.summary import format_summary, summarize, to_json

OUTPUTS = ("results.npz", "summary.txt", "summary.json")


def rankdata(x):
    """Average ranks (ties share the mean of their positions), numpy only."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size)
    start = 0
    while start < x.size:
        stop = start + 1
        while stop < x.size and xs[stop] == xs[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop - 1) / 2.0
        start = stop
    return ranks


def spearman(x, y):
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee", "cat"):
        (root / cls).mkdir()
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    return root


def test_digits_default_outputs_and_cache(tmp_path, cache_home, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--quiet", "--weights", "2000"]) == 0
    printed = capsys.readouterr().out
    for name in OUTPUTS + ("results_train.npz",):
        assert (out / name).is_file(), name
    assert "train vs test" in printed and printed.strip() == (out / "summary.txt").read_text().strip()

    res = weightablate.load(out / "results.npz")
    train = weightablate.load(out / "results_train.npz")
    assert len(res) == 2000 and res.layer == "fc2" and res.layer_shape == (256, 256)
    assert torch.equal(res.indices, train.indices)
    assert res.n_samples == 540 and train.n_samples == 540
    assert res.base_accuracy > 0.95

    s = json.loads((out / "summary.json").read_text())
    assert s["n_weights"] == 2000 and s["n_samples"] == res.n_samples
    assert s["n_exact_zero"] == int(res.exact_zero.sum())
    dl, w = res.delta_loss.numpy(), res.weight.double().numpy()
    assert s["n_negative"] == int((dl < 0).sum())
    assert s["max_flips"] == int(res.flips.max()) and s["n_with_flips"] == int((res.flips > 0).sum())
    assert s["base_loss"] == res.base_loss and s["base_accuracy"] == res.base_accuracy
    assert s["delta_loss"]["max"] == dl.max() and s["delta_loss"]["min"] == dl.min()
    assert s["delta_loss"]["q50"] == pytest.approx(np.quantile(dl, 0.5), abs=0, rel=1e-12)
    assert s["delta_loss"]["mean"] == pytest.approx(dl.mean(), rel=1e-12)
    assert abs(s["correlation"]["abs_w"]["spearman"] - spearman(np.abs(w), dl)) < 1e-9
    assert abs(s["correlation"]["w2"]["pearson"] - np.corrcoef(w * w, dl)[0, 1]) < 1e-9
    t = s["train"]
    assert t["n_common_weights"] == 2000
    assert abs(t["spearman"] - spearman(train.delta_loss.numpy(), dl)) < 1e-9
    assert abs(t["pearson"] - np.corrcoef(train.delta_loss.numpy(), dl)[0, 1]) < 1e-9

    cached = digits.cache_path(0)
    assert cached.is_file() and cached.is_relative_to(cache_home)
    assert not list(cached.parent.glob("*.tmp"))  # the atomic write left no temporary file
    mtime = cached.stat().st_mtime_ns
    out2 = tmp_path / "out2"
    assert main(["run", "--out", str(out2), "--quiet", "--weights", "2000"]) == 0
    assert cached.stat().st_mtime_ns == mtime
    res2 = weightablate.load(out2 / "results.npz")
    assert torch.equal(res2.indices, res.indices) and torch.equal(res2.delta_loss, res.delta_loss)


def test_digits_model_is_deterministic_and_cached(cache_home):
    a = digits.digits_model(3, cache=False)
    b = digits.digits_model(3, cache=True)  # trains and writes
    c = digits.digits_model(3, cache=True)  # reads
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(q, r)
    assert not c.training
    X_tr, y_tr, X_te, y_te = digits.load_digits_split(3)
    assert X_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert X_tr.shape == (1257, 64) and X_te.shape == (540, 64)
    assert digits.accuracy(c, X_te, y_te) > 0.95
    # a corrupt cache file is replaced, not fatal
    digits.cache_path(3).write_bytes(b"not a checkpoint")
    d = digits.digits_model(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))


@pytest.mark.parametrize("argv, layer, shape", [
    (["--model", "resnet18", "--image-size", "32"], "fc", (3, 512)),
    (["--model", "alexnet", "--image-size", "64", "--layer", "classifier.4"], "classifier.4", (4096, 4096)),
    (["--model", "resnet18", "--image-size", "32", "--layer", "layer4.1.conv2"], "layer4.1.conv2", (512, 4608)),
])
def test_torchvision_model_on_image_folder(tmp_path, image_folder, argv, layer, shape):
    out = tmp_path / "out"
    assert main(["run", *argv, "--data", str(image_folder), "--weights", "50", "--out", str(out), "--quiet"]) == 0
    for name in OUTPUTS:
        assert (out / name).is_file()
    assert not (out / "results_train.npz").exists()
    res = weightablate.load(out / "results.npz")
    assert len(res) == 50 and res.layer == layer and res.layer_shape == shape and res.n_samples == 12
    s = json.loads((out / "summary.json").read_text())
    assert "train" not in s and s["n_weights"] == 50


def test_checkpoint_is_loaded(tmp_path, image_folder):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    out = tmp_path / "out"
    assert main(["run", "--model", "resnet18", "--checkpoint", str(tmp_path / "r18.pt"), "--data", str(image_folder),
                 "--image-size", "32", "--weights", "20", "--out", str(out), "--quiet"]) == 0
    res = weightablate.load(out / "results.npz")
    assert torch.equal(res.weight, model.fc.weight.detach().reshape(-1)[res.indices])


def test_module_function_model(tmp_path, monkeypatch, cache_home):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def tanh_mlp(num_classes):
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                                 nn.Linear(16, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["run", "--model", "my_models:tanh_mlp", "--out", str(out), "--quiet"]) == 0
    res = weightablate.load(out / "results.npz")
    assert res.layer == "2" and res.layer_shape == (16, 32) and len(res) == 16 * 32  # all, fewer than 4096
    assert (out / "results_train.npz").is_file()
    assert not cache_home.exists()  # the digits MLP was neither trained nor cached


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no_such_net"], "--model"),
    (["--model", "no_such_module_xyz:f"], "--model"),
    (["--model", "resnet18", "--data", "/nonexistent/dir"], "--data"),
    (["--checkpoint", "/nonexistent/w.pt"], "--checkpoint"),
    (["--layer", "nope"], "--layer"),
    (["--layer", "relu1"], "--layer"),
    (["--weights", "0"], "--weights"),
    (["--weights", "70000"], "--weights"),
    (["--backend", "gpu"], "--backend"),
])
def test_bad_arguments(tmp_path, cache_home, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(["run", *argv, "--out", str(tmp_path / "out"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", "resnet18", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "weightablate", "run", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--image-size" in proc.stdout


def test_summary_handles_constant_inputs():
    k = 5
    res = weightablate.AblationResult(
        indices=torch.arange(k), rows=torch.zeros(k, dtype=torch.int64), cols=torch.arange(k),
        weight=torch.full((k,), 0.5), delta_loss=torch.zeros(k, dtype=torch.float64),
        delta_kl=torch.zeros(k, dtype=torch.float64), flips=torch.zeros(k, dtype=torch.int64),
        new_errors=torch.zeros(k, dtype=torch.int64), new_correct=torch.zeros(k, dtype=torch.int64),
        exact_zero=torch.ones(k, dtype=torch.bool), n_samples=3, base_loss=0.1, base_accuracy=1.0,
        layer="fc", layer_shape=(1, k))
    s = summarize(res, res)
    assert math.isnan(s["correlation"]["abs_w"]["spearman"]) and math.isnan(s["train"]["pearson"])
    assert s["n_exact_zero"] == k and s["n_negative"] == 0
    assert "nan" in format_summary(s)
    assert json.loads(json.dumps(to_json(s), allow_nan=False))["correlation"]["w2"]["pearson"] is None
    one = summarize(weightablate.AblationResult(**{**res.__dict__, **{
        n: getattr(res, n)[:1] for n in ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl", "flips",
                                         "new_errors", "new_correct", "exact_zero")}}))
    assert one["n_weights"] == 1 and math.isnan(one["correlation"]["abs_w"]["pearson"])

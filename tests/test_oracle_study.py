"""The oracle study's plumbing (benchmarks/oracle_study.py, weightablate/study.py): the exact values
it correlates against agree with a float64 removal loop written here, the criteria are what they
say, the masks hold, and the tiny configuration runs end to end. Not its findings."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from weightablate import criteria as wc
from weightablate import prune as wp
from weightablate import study as ws

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("oracle_study", ROOT / "benchmarks" / "oracle_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks the module up
    spec.loader.exec_module(mod)
    return mod


def tiny_cnn(seed=0):
    """small_cnn with non-trivial BatchNorm statistics and parameters (eval mode)."""
    torch.manual_seed(seed)
    m = ws.small_cnn()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


def data(n=12, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def naive_channel_removal(model, conv, bn, X, y, units):
    """Summed float64 CE change when output channel k of ``conv`` is removed: filter, bias and the
    BatchNorm channel zeroed in a float64 copy, the whole model evaluated."""
    m0 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        ce0 = F.cross_entropy(m0(X.double()), y, reduction="sum")
        out = []
        for k in units:
            m = copy.deepcopy(m0)
            c, b = m.get_submodule(conv), m.get_submodule(bn)
            for t in (c.weight, c.bias, b.weight, b.bias):
                t[k] = 0
            out.append(float(F.cross_entropy(m(X.double()), y, reduction="sum") - ce0))
    return torch.tensor(out, dtype=torch.float64)


def test_digits_images_and_pairs():
    X, y, Xt, yt = ws.digits_images(16, 3)
    assert X.shape == (1257, 3, 16, 16) and Xt.shape == (540, 3, 16, 16) and y.dtype == torch.int64
    assert torch.equal(X[:, 0], X[:, 2])
    assert ws.conv_bn_pairs(ws.small_cnn()) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]


def test_channel_table_correlates_against_the_exact_removal_effect():
    """What part 1 correlates: the exact deltas (checked against the naive loop) and each criterion
    at the same channels, and the correlations are scipy's on those points."""
    study = load_study()
    model = tiny_cnn()
    X, y = data()
    tab = study.channel_table(model, X, y, 5, 0, "float64", lambda msg: None)
    assert [lay["layer"] for lay in tab["layers"]] == ["conv1", "conv2", "conv3"]
    assert tab["n"] == 15 == len(tab["points"]["delta"])
    delta = torch.tensor(tab["points"]["delta"], dtype=torch.float64)
    pairs = ws.conv_bn_pairs(model)
    ref = torch.cat([naive_channel_removal(model, c, b, X, y, lay["indices"])
                     for (c, b), lay in zip(pairs, tab["layers"])])
    assert torch.allclose(delta, ref, rtol=1e-9, atol=1e-12)
    l1 = torch.cat([model.get_submodule(c).weight.detach().double().abs().sum((1, 2, 3))[lay["indices"]]
                    for (c, _), lay in zip(pairs, tab["layers"])])
    assert np.allclose(tab["points"]["l1"], l1.numpy())
    assert tab["network"]["l1"]["spearman"] == pytest.approx(stats.spearmanr(l1, ref)[0], abs=1e-9)
    assert tab["network"]["obd"]["kendall"] == pytest.approx(
        stats.kendalltau(tab["points"]["obd"], ref)[0], abs=1e-9)
    idx = tab["layers"][1]["indices"]
    per = tab["layers"][1]["correlations"]["bn_gamma"]["spearman"]
    assert per == pytest.approx(stats.spearmanr(model.bn2.weight.detach()[idx].abs(), ref[5:10])[0], abs=1e-9)


def test_channel_criteria_are_what_they_say():
    model = tiny_cnn()
    X, y = data()
    crit = ws.channel_criteria(model, [("conv2", "bn2")], X, y, seed=3)["conv2"]
    assert set(crit) == set(ws.CHANNEL_CRITERIA)
    w = model.conv2.weight.detach().double()
    assert torch.allclose(crit["l1"], w.abs().sum((1, 2, 3)))
    assert torch.allclose(crit["l2"], w.pow(2).sum((1, 2, 3)).sqrt())
    assert torch.allclose(crit["bn_gamma"], model.bn2.weight.detach().double().abs())
    assert torch.allclose(crit["taylor_bn"], crit["taylor_bn_signed"] ** 2)
    assert torch.allclose(crit["taylor_w"], crit["taylor_w_signed"] ** 2)
    # the signed BN Taylor is the derivative of the loss as the BN channel's output goes to 0
    m = copy.deepcopy(model).double()
    Xd = X.double()

    def loss_scaled(k, t):
        mm = copy.deepcopy(m)
        with torch.no_grad():
            mm.bn2.weight[k] *= 1 - t
            mm.bn2.bias[k] *= 1 - t
            return float(F.cross_entropy(mm(Xd), y, reduction="sum"))

    for k in (0, 7):
        eps = 1e-6
        fd = (loss_scaled(k, eps) - loss_scaled(k, -eps)) / (2 * eps)
        assert crit["taylor_bn_signed"][k].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)
    assert torch.all(crit["obd"] >= 0) and torch.all((crit["random"] >= 0) & (crit["random"] < 1))


def test_ggn_diagonal_is_the_hessian_diagonal_of_a_relu_cnn():
    """The CNN's logits are piecewise linear in one layer's weights: the Gauss-Newton diagonal is
    the Hessian's (autograd's full Hessian here); for the last Linear it is criteria.obd's closed form."""
    from torch.func import functional_call

    model = tiny_cnn().double()
    X, y = data(n=6)
    X = X.double()
    h = ws.ggn_diagonal(model, X, ["conv1.weight", "fc.weight"], batch_size=4)
    params = dict(model.named_parameters())
    w0 = params["conv1.weight"].detach()

    def loss(w):
        out = functional_call(model, {**{k: v.detach() for k, v in params.items()}, "conv1.weight": w}, (X,))
        return F.cross_entropy(out, y, reduction="sum")

    H = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
    assert torch.allclose(h["conv1.weight"].reshape(-1), H.diagonal(), rtol=1e-8, atol=1e-12)
    obd = wc.obd(model, "fc", (X, y))
    w = model.fc.weight.detach()
    assert torch.allclose(0.5 * h["fc.weight"] * w * w, obd, rtol=1e-8, atol=1e-14)


def test_rank_correlations_and_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(size=50)
    r = ws.rank_correlations(a, b)
    assert r["spearman"] == pytest.approx(stats.spearmanr(a, b)[0])
    assert r["kendall"] == pytest.approx(stats.kendalltau(a, b)[0])
    assert r["spearman_abs"] == pytest.approx(stats.spearmanr(abs(a), abs(b))[0])
    assert ws.rank_correlations(np.ones(5), np.arange(5.0))["spearman"] == 0.0
    boot = ws.kendall_bootstrap(a, b, n_boot=200, seed=1)
    assert boot["low"] < boot["tau"] < boot["high"] and boot["tau"] == pytest.approx(r["kendall"])
    with pytest.raises(ValueError, match="1-D"):
        ws.rank_correlations(a, b[:10])


def test_masks_are_exact_removals_and_hold_through_fine_tuning():
    model = tiny_cnn()
    X, y = data()
    keep = torch.ones(32, dtype=torch.bool)
    keep[[1, 5, 30]] = False
    masked = ws.mask_channels(copy.deepcopy(model), "conv2", "bn2", keep)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for t in (ref.conv2.weight, ref.conv2.bias, ref.bn2.weight, ref.bn2.bias):
            t[~keep] = 0
        want = float(F.cross_entropy(ref(X.double()), y))
    assert ws.float64_loss(masked, X, y) == pytest.approx(want, rel=1e-12)
    assert ws.Float64Suffix(model, "conv2", X, y)(masked) == pytest.approx(want, rel=1e-12)
    wp.finetune(masked, (X, y), 2, lr=1e-2, batch_size=4)
    assert torch.all(masked.conv2.weight[~keep] == 0) and torch.all(masked.bn2.bias[~keep] == 0)
    assert not torch.equal(masked.conv2.weight[keep], model.conv2.weight[keep])  # the rest did train
    flat = torch.rand(model.conv3.weight.numel(), generator=torch.Generator().manual_seed(0)) > 0.5
    mw = ws.mask_weights(copy.deepcopy(model), "conv3", flat)
    wp.finetune(mw, (X, y), 1, lr=1e-2, batch_size=4)
    assert torch.all(mw.conv3.weight.reshape(-1)[~flat] == 0)
    assert torch.equal(model.conv2.weight, tiny_cnn().conv2.weight)  # the base model untouched


@pytest.mark.slow
def test_tiny_study_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("torchvision")
    study = load_study()
    assert study.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "oracle_study.json").read_text())
    cfg = study.TINY
    assert (tmp_path / "oracle_study.png").stat().st_size > 10_000
    cnn = res["part1"]["cnn"]["channels"]
    assert cnn["n"] == 112 and set(cnn["network"]) == set(ws.CHANNEL_CRITERIA)
    mn = res["part1"]["mobilenet"]["channels"]
    assert len(mn["layers"]) == 34 and mn["n"] == 34 * cfg.mn_channels
    assert [r["layer"] for r in res["part1"]["cnn"]["weights"]] == ["conv1", "conv2", "conv3", "fc"]
    for kind in ("channels", "weights"):
        s = res["part2"][kind]
        assert len(s["masks"]) == cfg.masks and all(np.isfinite(r["test_loss"]) for r in s["masks"])
        assert -1 <= s["kendall"]["pruned_train_loss~test_loss_after_ft"]["tau"] <= 1
    labels = [r["importance"] for r in res["part3"]]
    assert labels == ["dense", *cfg.p3_importances] * cfg.p3_seeds
    assert all(r["params"] < res["part3"][0]["params"] for r in res["part3"][1:])
    out = capsys.readouterr().out
    assert "| taylor_bn_signed |" in out and "seconds:" in out
    assert study.main(["--render", str(tmp_path / "oracle_study.json"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == out.strip()  # the same tables from the saved json


def test_render_refuses_a_foreign_file(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    assert load_study().main(["--render", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--render" in err and "x.json" in err and "Traceback" not in err

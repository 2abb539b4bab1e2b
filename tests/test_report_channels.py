"""Channel-level criteria (weightablate.channel_criteria) and the report of a structured result."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import weightablate as wa
from weightablate.channel_criteria import channel_compute


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(h)), 1).flatten(1))


def model_and_data():
    torch.manual_seed(0)
    m = CNN().double().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-.5, .5)
        m.bn1.running_var.uniform_(.5, 1.5)
        m.bn1.weight.uniform_(.5, 1.5)
        m.bn1.bias.uniform_(-.3, .3)
    g = torch.Generator().manual_seed(0)
    return m, (torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g))


def loss_scaled(m, data, k, t):
    """The summed loss with unit k's parameters (filter, bias, BN gamma and beta) scaled by 1 - t."""
    mm = copy.deepcopy(m)
    with torch.no_grad():
        for p in (mm.conv1.weight, mm.conv1.bias, mm.bn1.weight, mm.bn1.bias):
            p[k] *= 1 - t
        return F.cross_entropy(mm(data[0]), data[1], reduction="sum").item()


def test_channel_criteria_against_finite_differences_and_the_weights():
    m, d = model_and_data()
    before = copy.deepcopy(m.state_dict())
    s, skipped = channel_compute(m, "conv1", d)
    assert skipped == {} and set(s) == {"l1", "l2", "bn_gamma", "taylor", "hessian"}
    W = m.conv1.weight.detach()
    assert torch.allclose(s["l1"], W.abs().sum((1, 2, 3))) and torch.allclose(s["l2"], W.flatten(1).norm(dim=1))
    assert torch.equal(s["bn_gamma"], m.bn1.weight.detach().abs())
    h = 1e-4
    for k in range(3):
        lo, mid, hi = (loss_scaled(m, d, k, t) for t in (-h, 0.0, h))
        assert s["taylor"][k].item() == pytest.approx((hi - lo) / (2 * h), rel=1e-6, abs=1e-9)
        curvature = 2 * (s["hessian"][k] - s["taylor"][k]).item()
        assert curvature == pytest.approx((hi - 2 * mid + lo) / h ** 2, rel=1e-4, abs=1e-6)
    # zeroing all of theta_k is removing the channel (ReLU(0) = 0): the truth the estimates aim at
    res = wa.ablate(m, "conv1", d, weights=torch.tensor([0, 1]), structure="out", precision="float64", progress=False)
    assert res.delta_loss.tolist() == pytest.approx([loss_scaled(m, d, k, 1.0) - loss_scaled(m, d, k, 0.0)
                                                     for k in (0, 1)], rel=1e-9, abs=1e-12)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_no_batchnorm_input_units_and_the_hessian_cap():
    m, d = model_and_data()
    s, skipped = channel_compute(m, "conv2", d, hessian_max_units=4)
    assert "no BatchNorm follows the channels of 'conv2'" in skipped["bn_gamma"]
    assert "5 units > hessian_max_units=4" in skipped["hessian"] and set(s) == {"l1", "l2", "taylor"}
    s, skipped = channel_compute(m, "fc", d, "in")
    W = m.fc.weight.detach()
    assert torch.allclose(s["l1"], W.abs().sum(0)) and "bn_gamma" in skipped
    g = torch.zeros_like(W)
    mm = copy.deepcopy(m)
    loss = F.cross_entropy(mm(d[0]), d[1], reduction="sum")
    (g,) = torch.autograd.grad(loss, mm.fc.weight)
    assert torch.allclose(s["taylor"], -(g * W).sum(0), rtol=1e-10, atol=1e-12)


def test_report_of_a_structured_result_ranks_the_channel_criteria(tmp_path):
    m, d = model_and_data()
    res = wa.ablate(m, "conv1", d, structure="out", precision="float64", progress=False)
    out = wa.report(res, tmp_path, model=m, data=d)
    cr = out["criteria"]
    assert list(cr["scores"]) == ["l1", "l2", "bn_gamma", "taylor", "hessian"] and cr["n_weights"] == 6
    assert "channel-level" in cr["source"]
    s, _ = channel_compute(m, "conv1", d)
    dl = res.delta_loss.numpy()
    for name in ("bn_gamma", "taylor"):
        assert cr["scores"][name]["spearman"] == pytest.approx(stats.spearmanr(s[name].numpy(), dl)[0], abs=1e-12)
    assert cr["scores"]["taylor"]["kind"].startswith("signed") and cr["scores"]["l1"]["kind"].startswith("importance")
    for f in ("delta_hist", "criteria", "hessian_vs_delta"):
        assert (tmp_path / f"{f}.png").stat().st_size > 1000
    with np.load(tmp_path / "criteria.npz") as z:
        assert np.allclose(z["taylor"], s["taylor"].numpy())
    # re-rendered from its files (weightablate report DIR): the same criteria table
    res.save(tmp_path / "results.npz")
    from weightablate.cli import main

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = wa.load(tmp_path / "results.npz")
    assert again.structure == "out"
    import json

    d2 = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert d2["criteria"]["scores"]["taylor"]["spearman"] == pytest.approx(cr["scores"]["taylor"]["spearman"])

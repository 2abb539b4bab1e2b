"""weightablate.report: figures rendered headless, every number of summary.json against an
independent computation, the HTML page in headless Chromium, and a 2M-weight report."""
import json
import math
import re
import shutil
import struct
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightablate as wa
from weightablate import criteria, reporting

# --- independent statistics (numpy only, no code shared with weightablate) ----------------------


def ranks(x):
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    r = np.empty(x.size)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(x, y):
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def kendall_b(x, y):
    """O(n^2) tau-b from the sign matrices."""
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    n0 = x.size * (x.size - 1) / 2
    ties_x = ((sx == 0).sum() - x.size) / 2
    ties_y = ((sy == 0).sum() - y.size) / 2
    return float((sx * sy).sum() / 2 / math.sqrt((n0 - ties_x) * (n0 - ties_y)))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


# --- a small trained study --------------------------------------------------------------------

def digits_split():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-3)
    y = torch.tensor(y)
    return X[:400].contiguous(), y[:400], X[400:800].contiguous(), y[400:800]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    torch.manual_seed(0)
    X_te, y_te, X_tr, y_tr = digits_split()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    try:
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(model(X_tr), y_tr).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    res = wa.ablate(model, "2", (X_te, y_te), by_class=True)
    train = wa.ablate(model, "2", (X_tr, y_tr))
    out = tmp_path_factory.mktemp("report")
    d = wa.report(res, out, model=model, data=(X_te, y_te), train_result=train, bootstrap=40, seed=3)
    return SimpleNamespace(model=model, X=X_te, y=y_te, res=res, train=train, out=out, d=d)


FIGURES = {"delta_hist", "delta_vs_w", "delta_over_absw", "per_class", "flips", "train_vs_test", "criteria",
           "taylor2_vs_delta", "activations_units", "activations_pass"}


def test_files_figures_and_json(study):
    d, out = study.d, study.out
    assert set(d["report"]["figures"]) == FIGURES
    for name, info in d["report"]["figures"].items():
        path = out / info["file"]
        assert path.is_file() and path.stat().st_size > 5000, name
        assert png_size(path) == (info["width"], info["height"]), name
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(d))
    page = (out / "report.html").read_text()
    assert page.count("<img ") == len(FIGURES) and "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing to fetch: opens offline
    for f in ("criteria.npz", "activations.npz"):
        assert (out / f).is_file()


def test_distribution_and_weights(study):
    d, res = study.d, study.res
    dl, w = res.delta_loss.numpy(), res.weight.double().numpy()
    dd = d["delta_distribution"]
    assert dd["n_weights"] == dl.size == 32 * 24
    assert dd["n_negative"] == (dl < 0).sum() > 0 and dd["n_positive"] == (dl > 0).sum()
    assert dd["n_zero_delta"] == (dl == 0).sum() and dd["n_exact_zero"] == res.exact_zero.sum()
    counts, edges = np.histogram(dl, bins=80)
    assert dd["histogram"]["counts"] == counts.tolist() and np.allclose(dd["histogram"]["edges"], edges)
    assert sum(dd["symlog_histogram"]["counts"]) == dl.size
    assert dd["sum_negative"] == pytest.approx(dl[dl < 0].sum(), rel=1e-12)
    wr = d["weight_relation"]
    assert wr["w"]["pearson"] == pytest.approx(pearson(w, dl), abs=1e-12)
    assert wr["w"]["spearman"] == pytest.approx(spearman(w, dl), abs=1e-12)
    assert wr["abs_w"]["spearman"] == pytest.approx(spearman(np.abs(w), dl), abs=1e-12)
    assert wr["w2"]["pearson"] == pytest.approx(pearson(w * w, dl), abs=1e-12)
    ratio = dl[w != 0] / np.abs(w[w != 0])
    disp = wr["ratio"]["dispersion"]
    q25, q50, q75 = np.percentile(ratio, [25, 50, 75])
    assert disp["iqr"] == pytest.approx(q75 - q25, rel=1e-12)
    assert disp["mad"] == pytest.approx(np.median(np.abs(ratio - q50)), rel=1e-12)
    assert disp["cv"] == pytest.approx(ratio.std() / abs(ratio.mean()), rel=1e-12)
    assert wr["ratio"]["vs_abs_w"]["spearman"] == pytest.approx(spearman(ratio, np.abs(w[w != 0])), abs=1e-12)
    assert wr["plot"] == {"kind": "scatter", "points": dl.size}


def test_per_class_and_flips(study):
    d, res = study.d, study.res
    cl = res.class_loss.numpy()
    pc = d["per_class"]
    assert pc["n_classes"] == 10
    for c, entry in enumerate(pc["classes"]):
        assert entry["n_hurt"] == (cl[:, c] > 0).sum() and entry["n_help"] == (cl[:, c] < 0).sum()
        assert entry["sum_hurt"] == pytest.approx(cl[:, c][cl[:, c] > 0].sum(), rel=1e-12, abs=1e-300)
        assert entry["total"] == pytest.approx(cl[:, c].sum(), rel=1e-9, abs=1e-15)
    absc = np.abs(cl)
    net = 2 * absc.max(1) - absc.sum(1)
    best = int(np.argmax(net))
    top = pc["most_specific"][0]
    assert (top["row"], top["col"]) == (int(res.rows[best]), int(res.cols[best]))
    assert top["class"] == int(absc[best].argmax()) and top["share"] == pytest.approx(absc[best].max() / absc[best].sum())
    flips = res.flips.numpy()
    fl = d["flips"]
    assert fl["histogram"]["counts"] == np.bincount(flips).tolist()
    assert fl["n_with_flips"] == (flips > 0).sum() and fl["max_flips"] == flips.max()
    if fl["most_flips"]:
        assert fl["most_flips"][0]["flips"] == flips.max()


def test_train_vs_test_bootstrap(study):
    t = study.d["train_vs_test"]
    x, y = study.train.delta_loss.numpy(), study.res.delta_loss.numpy()
    assert t["n_common_weights"] == x.size
    assert t["pearson"] == pytest.approx(pearson(x, y), abs=1e-12)
    assert t["spearman"] == pytest.approx(spearman(x, y), abs=1e-12)
    # the same resamples, evaluated the slow way: exact agreement of the percentile intervals
    rng = np.random.default_rng(3)
    p, s = [], []
    for _ in range(t["bootstrap_replicates"]):
        idx = rng.integers(0, x.size, x.size)
        p.append(pearson(x[idx], y[idx]))
        s.append(spearman(x[idx], y[idx]))
    assert t["bootstrap_replicates"] == 40
    assert np.allclose(t["pearson_ci95"], np.percentile(p, [2.5, 97.5]), rtol=0, atol=1e-10)
    assert np.allclose(t["spearman_ci95"], np.percentile(s, [2.5, 97.5]), rtol=0, atol=1e-10)
    assert t["spearman_ci95"][0] <= t["spearman"] <= t["spearman_ci95"][1]


def test_criteria_section(study):
    d, res = study.d, study.res
    cr = d["criteria"]
    assert list(cr["scores"]) == list(criteria.NAMES) and not cr["skipped"]
    full = criteria.compute(study.model, "2", (study.X, study.y))
    saved = np.load(study.out / "criteria.npz")
    assert np.array_equal(saved["indices"], res.indices.numpy())
    dl = res.delta_loss.numpy()
    for name in criteria.NAMES:
        s = full[name].reshape(-1)[res.indices].numpy()
        assert np.array_equal(saved[name], s), name
        row = cr["scores"][name]
        assert row["spearman"] == pytest.approx(spearman(s, dl), abs=1e-12), name
        assert row["kendall"] == pytest.approx(kendall_b(s, dl), abs=1e-12), name
        assert row["spearman_abs"] == pytest.approx(spearman(np.abs(s), np.abs(dl)), abs=1e-12), name
        for key in ("top_1pct", "top_10pct", "bottom_1pct", "bottom_10pct"):
            assert 0 <= row[key] <= 1
    assert cr["set_sizes"] == [round(0.01 * dl.size), round(0.1 * dl.size)]
    assert cr["scores"]["taylor2"]["spearman"] > 0.9  # the second-order estimate tracks the truth


def test_criteria_numbers_exact_sets(tmp_path):
    """Overlaps of top/bottom sets on data without ties, criteria given per weight."""
    rng = np.random.default_rng(5)
    k = 700
    res = synthetic(k, rng)
    dl = res.delta_loss.numpy()
    given = {"taylor2": dl + rng.normal(0, dl.std(), k), "wanda": np.abs(dl) + rng.random(k) * dl.std()}
    d = wa.report(res, tmp_path, criteria=given, symlog=False)
    w = res.weight.double().numpy()
    given.update(magnitude=np.abs(w), squared=w * w)
    assert list(d["criteria"]["scores"]) == ["magnitude", "squared", "wanda", "taylor2"]
    for name, s in given.items():
        row = d["criteria"]["scores"][name]
        assert row["kendall"] == pytest.approx(kendall_b(s, dl), abs=1e-12)
        assert row["spearman"] == pytest.approx(spearman(s, dl), abs=1e-12)
        assert row["pearson"] == pytest.approx(pearson(s, dl), abs=1e-12)
        for f, tag in ((0.01, "1pct"), (0.10, "10pct")):
            n = round(f * k)
            top = len(set(np.argsort(-s)[:n]) & set(np.argsort(-dl)[:n])) / n
            bottom = len(set(np.argsort(s)[:n]) & set(np.argsort(dl)[:n])) / n
            assert row[f"top_{tag}"] == top and row[f"bottom_{tag}"] == bottom, (name, tag)
    assert "symlog_histogram" not in d["delta_distribution"]
    assert set(d["report"]["figures"]) == {"delta_hist", "delta_vs_w", "delta_over_absw", "flips", "criteria",
                                           "taylor2_vs_delta"}


def test_activation_section(study):
    a = study.d["activations"]["2"]
    z = study.model[:3](study.X).detach().double().numpy()
    pf = (z > 0).mean(0)
    assert a["n_units"] == 24 and a["n_values_per_unit"] == 400 and a["median_exact"]
    assert a["pass_fraction"]["mean"] == pytest.approx(pf.mean(), rel=1e-12)
    assert a["n_dead"] == (pf == 0).sum() and a["frac_units_pass_le_25pct"] == pytest.approx((pf <= 0.25).mean())
    ms = np.median(z, 0) / z.std(0)
    assert a["median_over_std"]["q50"] == pytest.approx(np.median(ms[np.isfinite(ms)]), rel=1e-5)
    assert study.d["report"]["figures"]["activations_units"]["units"] and len(
        study.d["report"]["figures"]["activations_units"]["units"]) == 24


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to test report.html: apt-get install chromium (make test does it)")


def test_html_page_in_headless_chromium(study, tmp_path):
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", (study.out / "report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-loaded") == "1", attrs
    assert attrs.get("data-errors") == "0"
    sizes = [tuple(map(int, s.split("x"))) for s in attrs["data-images"].split()]
    expected = [(f["width"], f["height"]) for f in study.d["report"]["figures"].values()]
    assert sorted(sizes) == sorted(expected) and all(w > 0 and h > 0 for w, h in sizes)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


# --- big -------------------------------------------------------------------------------------

def synthetic(k, rng, shape=(4096, 4096)):
    idx = torch.from_numpy(np.sort(rng.choice(shape[0] * shape[1], k, replace=False)))
    w = torch.from_numpy(rng.normal(0, 0.02, k).astype(np.float32))
    dl = torch.from_numpy(rng.normal(0, 1e-4, k) + 0.3 * w.double().numpy() ** 2)
    flips = torch.from_numpy(rng.poisson(0.05, k).astype(np.int64))
    return wa.AblationResult(
        indices=idx, rows=idx // shape[1], cols=idx % shape[1], weight=w, delta_loss=dl, delta_kl=dl.abs(),
        flips=flips, new_errors=flips // 2, new_correct=flips - flips // 2, exact_zero=dl == 0, n_samples=1000,
        base_loss=1.0, base_accuracy=0.7, layer="classifier.4", layer_shape=shape, method="piecewise")


def test_two_million_weights(tmp_path):
    """A report over ~2M weights completes; scatter plots are drawn from at most max_points points
    (a hexbin of all of them above), statistics use every weight."""
    rng = np.random.default_rng(0)
    k = 2_000_000
    res = synthetic(k, rng)
    res.delta_loss[:1000] = 0.0
    res.exact_zero[:500] = True
    d = wa.report(res, tmp_path, max_points=5000)
    dl = res.delta_loss.numpy()
    assert d["n_weights"] == k and sum(d["delta_distribution"]["histogram"]["counts"]) == k
    assert d["delta_distribution"]["n_negative"] == (dl < 0).sum() and d["delta_distribution"]["n_zero_delta"] == 1000
    assert d["weight_relation"]["plot"] == {"kind": "hexbin", "points": k, "gridsize": 90}
    assert d["criteria"]["scores"]["squared"]["kendall"] == d["criteria"]["scores"]["magnitude"]["kendall"]
    # the artists themselves: no scatter above max_points, a hexbin of every point
    from matplotlib.collections import PathCollection, PolyCollection

    w = res.weight.double().numpy()
    fig, _ = reporting.fig_delta_vs_w(w, dl, 5000)
    for ax in fig.axes[:2]:
        scatters = [c for c in ax.collections if type(c) is PathCollection]
        assert all(len(c.get_offsets()) <= 5000 for c in scatters)
        hexes = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert hexes and hexes[0].get_array().sum() == k  # every weight counted in some hexagon
    small, _ = reporting.fig_delta_vs_w(w[:3000], dl[:3000], 5000)
    assert [len(c.get_offsets()) for c in small.axes[0].collections if type(c) is PathCollection] == [3000]
    for info in d["report"]["figures"].values():
        assert (tmp_path / info["file"]).stat().st_size > 5000


# --- activation statistics ----------------------------------------------------------------------

def test_activation_stats_linear_and_conv():
    torch.manual_seed(0)
    X = torch.randn(300, 12)
    y = torch.randint(0, 3, (300,))
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 3))
    model.train()
    st = wa.activation_stats(model, "0", (X, y), batch_size=64)
    assert model.training and all(m.training for m in model.modules())
    z = model[0](X).detach().double().numpy()
    assert st.n_units == 40 and st.n_values == 300 and st.median_rows == 300 and st.kind == "Linear"
    np.testing.assert_allclose(st.pass_fraction, (z > 0).mean(0), rtol=0, atol=0)
    np.testing.assert_allclose(st.mean, z.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(st.std, z.std(0), rtol=1e-6)
    np.testing.assert_array_equal(st.median, np.median(z, 0))
    np.testing.assert_allclose(st.median_over_std, np.median(z, 0) / z.std(0), rtol=1e-6)
    assert len(st.show_units) == 40 and st.show_values.shape == (300, 40)
    # the bounded median: every 2**k-th row once the budget is exceeded
    small = wa.activation_stats(model, "0", (X, y), batch_size=64, max_values=40 * 70)
    stride = 1
    while math.ceil(300 / stride) != small.median_rows:
        stride *= 2
    assert stride > 1 and small.median_rows * 40 <= 40 * 70
    np.testing.assert_array_equal(small.median, np.median(z[::stride], 0))
    np.testing.assert_array_equal(small.pass_fraction, st.pass_fraction)  # exact on all values

    conv = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 3))
    Xc = torch.randn(20, 2, 6, 7)
    stc = wa.activation_stats(conv, conv[0], (Xc, y[:20]))
    zc = conv[0](Xc).detach().double().permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    assert stc.kind == "Conv2d" and stc.n_values == 20 * 6 * 7 and stc.n_samples == 20
    np.testing.assert_allclose(stc.pass_fraction, (zc > 0).mean(0), rtol=0, atol=0)
    np.testing.assert_array_equal(stc.median, np.median(zc, 0))
    with pytest.raises(TypeError, match="Linear or nn.Conv2d"):
        wa.activation_stats(model, "1", (X, y))


def test_results_are_concatenated_and_checked(tmp_path):
    rng = np.random.default_rng(2)
    res = synthetic(400, rng, shape=(40, 50))
    half = {n: getattr(res, n)[:200] for n in ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl",
                                               "flips", "new_errors", "new_correct", "exact_zero")}
    rest = {n: getattr(res, n)[200:] for n in half}
    a = wa.AblationResult(**{**res.__dict__, **half})
    b = wa.AblationResult(**{**res.__dict__, **rest})
    a.save(tmp_path / "a.npz")
    d = wa.report([tmp_path / "a.npz", b], tmp_path / "out", symlog=False)
    whole = wa.report(res, tmp_path / "whole", symlog=False)
    assert d["delta_distribution"] == whole["delta_distribution"]
    assert d["criteria"]["scores"] == whole["criteria"]["scores"]
    with pytest.raises(ValueError, match="same weight"):
        wa.report([a, a], tmp_path / "x")
    other = wa.AblationResult(**{**b.__dict__, "n_samples": 7})
    with pytest.raises(ValueError, match="train_result"):
        wa.report([a, other], tmp_path / "x")



# --- pruning trajectories ------------------------------------------------------------------------

def test_pruning_section_numbers_and_figure(tmp_path):
    """Rows of prune_experiment.json and a prune history.json: mean and sd per (model, criterion,
    sparsity) against numpy, the figure on the page, the dense point starting every line."""
    rng = np.random.default_rng(5)
    rows = [{"model": "mlp", "seed": s, "criterion": "dense", "sparsity": 0.0, "accuracy": 0.97 + 0.001 * s,
             "loss": 0.1}
            for s in range(3)]
    for crit in ("exact", "magnitude"):
        for s in range(3):
            for sp in (0.5, 0.9):
                rows.append({"model": "mlp", "seed": s, "criterion": crit, "sparsity": sp,
                             "accuracy": float(rng.uniform(0.8, 0.97)), "loss": float(rng.uniform(0.1, 1))})
    history = {"model": "cnn", "criterion": "wanda", "ranking": "signed", "seed": 0, "base_accuracy": 0.96,
               "base_loss": 0.12, "history": [{"step": 1, "sparsity": 0.5, "accuracy": 0.95, "loss": 0.2}]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    d = wa.report(synthetic(500, rng), tmp_path / "out", pruning=[tmp_path / "rows.json", tmp_path / "history.json"])
    pr = d["pruning"]
    assert set(pr) == {"mlp", "cnn"} and set(pr["mlp"]) == {"exact", "magnitude"} and set(pr["cnn"]) == {"wanda"}
    for crit in ("exact", "magnitude"):
        line = pr["mlp"][crit]
        assert [p["sparsity"] for p in line] == [0.0, 0.5, 0.9]
        dense = [r["accuracy"] for r in rows if r["criterion"] == "dense"]
        assert line[0]["accuracy_mean"] == pytest.approx(np.mean(dense), abs=1e-12)
        for p in line[1:]:
            acc = [r["accuracy"] for r in rows if r["criterion"] == crit and r["sparsity"] == p["sparsity"]]
            loss = [r["loss"] for r in rows if r["criterion"] == crit and r["sparsity"] == p["sparsity"]]
            assert p["n_seeds"] == 3
            assert p["accuracy_mean"] == pytest.approx(np.mean(acc), abs=1e-12)
            assert p["accuracy_sd"] == pytest.approx(np.std(acc, ddof=1), abs=1e-12)
            assert p["loss_sd"] == pytest.approx(np.std(loss, ddof=1), abs=1e-12)
    assert [p["accuracy_mean"] for p in pr["cnn"]["wanda"]] == [0.96, 0.95]
    assert pr["cnn"]["wanda"][1]["accuracy_sd"] is None  # one seed: no spread
    info = d["report"]["figures"]["pruning"]
    assert png_size(tmp_path / "out" / "pruning.png") == (info["width"], info["height"])
    page = (tmp_path / "out" / "report.html").read_text()
    headings = re.findall(r"<h2>(\d+)\. ([^<]*)</h2>", page)  # numbered without gaps, pruning last
    assert 'id="fig-pruning"' in page and headings[-1][1].startswith("Pruning: accuracy")
    assert [int(k) for k, _ in headings] == list(range(1, len(headings) + 1)) and len(headings) < 7


def test_pruning_input_errors(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="pruning: .*bad.json"):
        wa.report(synthetic(50, rng), tmp_path / "o", pruning=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="pruning: expected"):
        wa.report(synthetic(50, rng), tmp_path / "o", pruning=[{"x": 1}])


def test_conv_weights_are_named_by_out_in_kh_kw(tmp_path):
    """A conv's weights appear as (out, in, kh, kw) in the summary, its text and the report."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, (2, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 2, 5))
    X, y = torch.randn(16, 3, 4, 4), torch.randint(0, 5, (16,))
    res = wa.ablate(model, "0", (X, y), by_class=True)
    from weightablate.summary import format_summary, summarize

    d = summarize(res)
    best = int(np.argmax(res.delta_loss.numpy()))
    o, i, kh, kw = np.unravel_index(int(res.indices[best]), (4, 3, 2, 3))
    assert model[0].weight[o, i, kh, kw] == res.weight[best]
    assert d["position"] == "(out, in, kh, kw)" and d["top"][0]["at"] == f"({o}, {i}, {kh}, {kw})"
    text = format_summary(d)
    assert "layer 0 (4x3x2x3)" in text and "most important weights (out, in, kh, kw)" in text
    assert f"  ({o}, {i}, {kh}, {kw})  w=" in text
    rep = wa.report(res, tmp_path, bootstrap=0)
    page = (tmp_path / "report.html").read_text()
    assert "<th>(out, in, kh, kw)</th>" in page and f"<td>({o}, {i}, {kh}, {kw})</td>" in page
    assert rep["per_class"]["most_specific"][0]["at"].count(",") == 3


def test_activation_stats_measure_at_the_activation_and_say_where(tmp_path):
    """ResNet-style block: conv -> bn -> + residual -> relu: z is the ReLU's input (not the conv's
    output); the logits layer says no activation follows."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv1(x)
            out = self.bn2(self.conv2(h))
            out = out + h
            return self.fc(torch.flatten(self.pool(self.relu(out)), 1))

    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.bn2.running_mean.uniform_(-1, 1)
        model.bn2.running_var.uniform_(0.5, 2)
        model.bn2.bias.uniform_(-1, 1)
    X, y = torch.randn(10, 3, 5, 5), torch.randint(0, 3, (10,))
    st = wa.activation_stats(model, "conv2", (X, y))
    with torch.no_grad():
        h = model.conv1(X)
        z = (model.bn2(model.conv2(h)) + h).permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
        raw = model.conv2(h).permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    np.testing.assert_array_equal(st.pass_fraction, (z > 0).mean(0))
    assert not np.array_equal((raw > 0).mean(0), (z > 0).mean(0))  # the conv's own output would differ
    assert st.activation == "ReLU" and st.at == "the input of relu (ReLU): conv2 -> bn2 -> + residual -> relu"
    fc = wa.activation_stats(model, "fc", (X, y))
    assert fc.activation == "" and fc.at == "the output of fc (the logits)"
    d = wa.report(wa.ablate(model, "fc", (X, y)), tmp_path, model=model, data=(X, y), bootstrap=0)
    text = reporting.format_report(d)
    assert "activations of fc, measured at the output of fc (the logits): 3 units are > 0" in text
    assert "ReLU" not in text.split("activations of fc")[1]

"""The report at the end of `weightablate run`, `weightablate report` and `weightablate stats`."""
import json
import os

import numpy as np
import pytest
import torch

import weightablate
from weightablate import criteria, digits
from weightablate.cli import main

FIGURES = {"delta_hist", "delta_vs_w", "delta_over_absw", "per_class", "flips", "train_vs_test", "criteria",
           "taylor2_vs_delta", "activations_units", "activations_pass"}


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """One digits-MLP cache for the module (trained once)."""
    home = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_home):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--out", str(out), "--quiet", "--weights", "1500"]) == 0
    return out


def test_run_writes_the_report(run_dir, capsys):
    s = json.loads((run_dir / "summary.json").read_text())
    for name in FIGURES:
        assert (run_dir / f"{name}.png").is_file(), name
    assert set(s["report"]["figures"]) == FIGURES and (run_dir / "report.html").is_file()
    assert s["model"] == "digits MLP 64-256-256-10" and s["n_weights"] == 1500 and "correlation" in s
    assert list(s["criteria"]["scores"]) == list(criteria.NAMES) and s["criteria"]["n_weights"] == 1500
    assert set(s["activations"]) == {"fc2"} and s["activations"]["fc2"]["n_units"] == 256
    assert s["per_class"]["n_classes"] == 10 and s["train_vs_test"]["n_common_weights"] == 1500
    text = (run_dir / "summary.txt").read_text()
    assert "pruning criteria vs the exact delta_loss" in text and "taylor2" in text
    res = weightablate.load(run_dir / "results.npz")
    assert res.class_loss is not None and res.class_loss.shape == (1500, 10)
    # the criteria are those of the model on the test split, at the ablated weights
    model = digits.digits_model(0)
    _, _, X_te, y_te = digits.load_digits_split(0)
    full = criteria.compute(model, "fc2", (X_te, y_te))
    saved = np.load(run_dir / "criteria.npz")
    for name in criteria.NAMES:
        np.testing.assert_allclose(saved[name], full[name].reshape(-1)[res.indices].numpy(), rtol=1e-12, atol=0)


def test_report_command_reproduces_the_run(run_dir, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["report", str(run_dir), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "pruning criteria" in printed and "train vs test" in printed
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert set(b["report"]["figures"]) == FIGURES
    for key in ("criteria", "activations", "per_class", "flips", "delta_distribution", "weight_relation",
                "train_vs_test", "model", "data", "seed", "correlation", "train"):
        assert a[key] == b[key], key  # the criteria's source and notes included


def test_report_command_on_files(run_dir, tmp_path, capsys):
    res = weightablate.load(run_dir / "results.npz")
    fields = ("indices", "rows", "cols", "weight", "delta_loss", "delta_kl", "flips", "new_errors", "new_correct",
              "exact_zero", "class_loss")
    for name, sl in (("a.npz", slice(0, 700)), ("b.npz", slice(700, None))):
        weightablate.AblationResult(**{**res.__dict__, **{f: getattr(res, f)[sl] for f in fields}}).save(
            tmp_path / name)
    out = tmp_path / "shards"
    assert main(["report", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--train",
                 str(run_dir / "results_train.npz"), "--out", str(out), "--quiet", "--max-points", "100",
                 "--bootstrap", "120", "--no-symlog"]) == 0
    s = json.loads((out / "summary.json").read_text())
    whole = json.loads((run_dir / "summary.json").read_text())
    assert s["delta_distribution"]["n_negative"] == whole["delta_distribution"]["n_negative"]
    assert s["train_vs_test"]["spearman"] == pytest.approx(whole["train_vs_test"]["spearman"], abs=1e-12)
    assert s["train_vs_test"]["bootstrap_replicates"] == 120 and s["weight_relation"]["plot"]["kind"] == "hexbin"
    assert list(s["criteria"]["scores"]) == ["magnitude", "squared"]  # no model: the data-free criteria
    assert "symlog_histogram" not in s["delta_distribution"] and "activations" not in s


@pytest.mark.parametrize("argv, needle", [
    (["report", "/nonexistent/r.npz", "--out", "x"], "RESULTS"),
    (["report", "--out", "x"], "RESULTS"),
    (["stats", "--layer", "relu1"], "--layer"),
    (["stats", "--layer", "nope"], "--layer"),
])
def test_bad_arguments(argv, needle, tmp_path, cache_home, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "o")] if "--out" not in argv else argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_report_of_a_file_that_is_not_a_result(tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "not a weightablate result" in capsys.readouterr().err


def test_stats_command(tmp_path, cache_home, capsys):
    out = tmp_path / "stats"
    assert main(["stats", "--layer", "fc1", "--layer", "fc2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fc1 (Linear, 256 units, 540 values each)" in printed
    s = json.loads((out / "activations.json").read_text())
    model = digits.digits_model(0)
    _, _, X_te, _ = digits.load_digits_split(0)
    with torch.no_grad():
        z1 = model.fc1(X_te).double().numpy()
        z2 = model.fc2(model.relu1(model.fc1(X_te))).double().numpy()
    for name, z in (("fc1", z1), ("fc2", z2)):
        d = s["layers"][name]
        np.testing.assert_array_equal(d["units"]["pass_fraction"], (z > 0).mean(0))
        np.testing.assert_allclose(d["units"]["median"], np.median(z, 0), rtol=1e-6, atol=1e-6)
        assert d["n_dead"] == int(((z > 0).mean(0) == 0).sum())
        for fig in (f"activations_{name}_units.png", f"activations_{name}_pass.png"):
            assert (out / fig).stat().st_size > 5000


def test_run_without_report(tmp_path, cache_home):
    out = tmp_path / "plain"
    assert main(["run", "--out", str(out), "--quiet", "--weights", "300", "--no-report"]) == 0
    assert not (out / "report.html").exists() and not list(out.glob("*.png"))
    assert weightablate.load(out / "results.npz").class_loss is None
    assert "criteria" not in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name, damage, needle", [
    ("criteria.npz", b"junk", "not a criteria file"),
    ("activations.npz", b"junk", "not an activations file"),
    ("criteria.npz", "short", "one score per weight"),
    ("activations.npz", "short", "do not match"),
])
def test_report_of_damaged_side_files(run_dir, tmp_path, capsys, name, damage, needle):
    """criteria.npz / activations.npz beside a result that are not what `run` wrote: exit 2, one line."""
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    if damage == "short":  # a valid npz whose arrays lost their last entry
        with np.load(d / name) as z:
            arrays = {k: (z[k][:-1] if z[k].ndim == 1 and k not in ("indices", "show_units") else z[k])
                      for k in z.files}
        with open(d / name, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        (d / name).write_bytes(damage)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(d), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err

"""What the tools say: --checkpoint vs --checkpoint-dir, --help, the options the API has, ImageFolder
classes and normalisation, pruning any layer (the real `weightablate` command, via main())."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import weightablate as wa
from weightablate import digits
from weightablate.cli import main


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def run_error(argv, capsys) -> str:
    """The one-line error of a command that must exit 2 (no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err


# --- --checkpoint (a state dict) vs --checkpoint-dir (resume) -----------------------------------

@pytest.fixture
def sweep_dir(tmp_path):
    """A real sweep checkpoint directory (and a result file) of the digits MLP's fc2."""
    model = digits.digits_mlp()
    _, _, X, y = digits.load_digits_split(0)
    ck = tmp_path / "ck"
    res = wa.ablate(model, "fc2", (X, y), 5, checkpoint_dir=ck / "test", progress=False)
    res.save(tmp_path / "results.npz")
    return ck


def test_checkpoint_given_a_sweep_checkpoint_names_checkpoint_dir(tmp_path, sweep_dir, capsys):
    out = ["--out", str(tmp_path / "o"), "--quiet"]
    (ckpt,) = sweep_dir.glob("*/*.ckpt")
    for path in (ckpt, ckpt.parent, sweep_dir):
        err = run_error(["run", "--checkpoint", str(path), *out], capsys)
        assert "pass" in err and "as --checkpoint-dir" in err and "weights_only" not in err
        assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    err = run_error(["run", "--checkpoint", str(tmp_path / "results.npz"), *out], capsys)
    assert "is a weightablate result" in err
    err = run_error(["prune", "--checkpoint", str(ckpt), *out], capsys)
    assert "as --checkpoint-dir" in err
    err = run_error(["run", "--checkpoint-dir", str(tmp_path / "results.npz"), *out], capsys)
    assert "is a file" in err and "use --checkpoint" in err


def test_checkpoint_of_a_pickled_model_never_advises_weights_only_false(tmp_path, capsys):
    torch.save(digits.digits_mlp(), tmp_path / "whole.pt")  # the module itself, not its state dict
    err = run_error(["run", "--checkpoint", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "o")], capsys)
    assert "state_dict()" in err and "weights_only=False" not in err and "pickled" in err


# --- --help and the options the API has ----------------------------------------------------------

def test_help_documents_every_option_and_every_choice():
    import argparse
    import re

    from weightablate.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            text = action.help or ""
            where = f"{name} {action.option_strings[0]}"
            assert len(text) > 25 and not re.fullmatch(r"default \S+", text), (where, text)
            for choice in action.choices or ():
                assert re.search(rf"\b{re.escape(str(choice))}\b", text), (where, choice, text)


def test_help_is_printed_by_the_real_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "weightablate", "run", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for needle in ("--method", "--by-class", "--param", "naive: zero, evaluate, restore", "float64:"):
        assert needle in text


def test_run_bias_method_and_by_class(tmp_path, cache_home):
    """--param bias, --method replay and --by-class reach ablate: the numbers equal the API's."""
    out = tmp_path / "o"
    model = digits.digits_mlp()
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert main(["run", "--checkpoint", str(tmp_path / "w.pt"), "--layer", "fc1", "--param", "bias",
                 "--method", "replay", "--weights", "12", "--by-class", "--no-report", "--out", str(out),
                 "--quiet"]) == 0
    res = wa.load(out / "results.npz")
    assert res.param == "bias" and res.method == "replay" and len(res) == 12 and res.class_loss is not None
    _, _, X, y = digits.load_digits_split(0)
    ref = wa.ablate(model, "fc1", (X, y), res.indices, param="bias", backend="naive", precision="float64",
                    by_class=True)
    torch.testing.assert_close(res.delta_loss, ref.delta_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.class_loss.sum(1), res.delta_loss, rtol=1e-9, atol=1e-9)
    text = (out / "summary.txt").read_text()
    assert "12 bias entries ablated" in text and "most important bias entries (out)" in text
    assert main(["run", "--checkpoint", str(tmp_path / "w.pt"), "--layer", "fc3", "--weights", "5",
                 "--no-by-class", "--out", str(out), "--quiet"]) == 0
    assert wa.load(out / "results.npz").class_loss is None


def test_run_bad_param_and_method(tmp_path, capsys):
    (tmp_path / "m.py").write_text("from torch import nn\ndef f():\n    return nn.Sequential(nn.Linear(64, 10, "
                                   "bias=False))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        err = run_error(["run", "--model", "m:f", "--layer", "0", "--param", "bias", "--out", str(tmp_path / "o")],
                        capsys)
        assert "--param bias" in err and "no bias" in err
    finally:
        sys.path.remove(str(tmp_path))
    err = run_error(["run", "--method", "bogus"], capsys)
    assert "--method" in err and "closed_form" in err

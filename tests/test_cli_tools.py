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

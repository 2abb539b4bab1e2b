"""What the tools say: --checkpoint vs --checkpoint-dir, --help, the options the API has, ImageFolder
classes and normalisation, pruning any layer (the real `weightablate` command, via main())."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's error exit
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
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
    assert "is a file" in err and "goes to --checkpoint" in err


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


# --- ImageFolder: preprocessing and the folder's classes as the model's --------------------------

@pytest.fixture
def folder(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("goldfish", "tench", "tiger_shark"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    (tmp_path / "flat_models.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def net(num_classes):\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return root


def expected_base_loss(root, num_classes, labels, mean, std, crop=False):
    """The dataset's mean cross-entropy, preprocessing written out with PIL and numpy."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    import flat_models

    model = flat_models.net(num_classes)
    xs, ys = [], []
    for cls in sorted(p.name for p in root.iterdir()):
        for f in sorted((root / cls).iterdir()):
            im = Image.open(f).convert("RGB")
            if crop:  # shorter side to round(8 * 256 / 224) = 9, then the central 8x8
                w, h = im.size
                s = 9 / min(w, h)
                im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
                left, top = round((im.size[0] - 8) / 2), round((im.size[1] - 8) / 2)
                im = im.crop((left, top, left + 8, top + 8))
            else:
                im = im.resize((8, 8), Image.BILINEAR)
            a = (np.asarray(im, dtype=np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
            xs.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
            ys.append(labels[cls])
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.stack(xs)).double(), torch.tensor(ys)))


@pytest.mark.parametrize("extra, num_classes, labels, mean, std", [
    ([], 3, {"goldfish": 0, "tench": 1, "tiger_shark": 2}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    (["--normalize", "none", "--class-map", "MAP"], 50, {"goldfish": 40, "tench": 7, "tiger_shark": 0},
     (0, 0, 0), (1, 1, 1)),
    (["--normalize", "0.5,0.4,0.3:0.2,0.25,0.3", "--class-map", "index"], 5,
     {"goldfish": 0, "tench": 1, "tiger_shark": 2}, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
])
def test_image_folder_preprocessing_and_class_map(tmp_path, folder, extra, num_classes, labels, mean, std):
    import json

    (tmp_path / "map.json").write_text(json.dumps(labels))
    extra = [str(tmp_path / "map.json") if a == "MAP" else a for a in extra]
    out = tmp_path / "o"
    assert main(["run", "--model", "flat_models:net", "--data", str(folder), "--image-size", "8", "--num-classes",
                 str(num_classes), "--layer", "3", "--weights", "4", "--no-report", "--out", str(out), "--quiet",
                 *extra]) == 0
    res = wa.load(out / "results.npz")
    assert res.layer_shape == (num_classes, 16)
    assert res.base_loss == pytest.approx(expected_base_loss(folder, num_classes, labels, mean, std), rel=1e-5)


def test_image_folder_center_crop(tmp_path, folder):
    out = tmp_path / "o"
    assert main(["run", "--model", "flat_models:net", "--data", str(folder), "--image-size", "8", "--resize",
                 "center-crop", "--layer", "3", "--weights", "4", "--no-report", "--out", str(out), "--quiet"]) == 0
    labels = {"goldfish": 0, "tench": 1, "tiger_shark": 2}
    expected = expected_base_loss(folder, 3, labels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop=True)
    assert wa.load(out / "results.npz").base_loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_imagenet_checkpoint_on_a_three_class_folder(tmp_path, folder, capsys):
    """A 1000-class checkpoint: the error names --num-classes; then the folder's ImageNet category names
    are the labels (goldfish = 1, tench = 0, tiger shark = 3)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    common = ["run", "--model", "resnet18", "--checkpoint", str(tmp_path / "r18.pt"), "--data", str(folder),
              "--image-size", "16", "--weights", "5", "--no-report", "--out", str(tmp_path / "o"), "--quiet"]
    err = run_error(common, capsys)
    assert "pass --num-classes 1000" in err
    assert main(common + ["--num-classes", "1000"]) == 0
    res = wa.load(tmp_path / "o" / "results.npz")
    from weightablate.folder import transform

    tf = transform(16)
    from PIL import Image

    xs, ys = [], []
    for cls, label in (("goldfish", 1), ("tench", 0), ("tiger_shark", 3)):
        for f in sorted((folder / cls).iterdir()):
            xs.append(tf(Image.open(f).convert("RGB")))
            ys.append(label)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(torch.stack(xs)).double(), torch.tensor(ys))
    assert res.base_loss == pytest.approx(float(ref), rel=1e-5)
    err = run_error(common + ["--num-classes", "1000", "--class-map", "name"], capsys)
    assert "--class-map" in err and "not class numbers" in err


def test_class_map_rules_and_errors(tmp_path, folder, capsys):
    from weightablate.folder import class_map

    assert class_map(["0", "17", "954"], 1000) == ([0, 17, 954], "name")
    assert class_map(["a", "b"], 2) == ([0, 1], "index")
    cats = ["tench", "goldfish", "great white shark", "tiger shark"]
    assert class_map(["goldfish", "Tiger_Shark"], 4, categories=cats) == ([1, 3], "categories")
    with pytest.raises(ValueError, match="not category names"):
        class_map(["goldfish", "cat"], 4, "categories", cats)
    with pytest.raises(ValueError, match="say which model class"):
        class_map(["a", "b"], 10)
    err = run_error(["run", "--model", "flat_models:net", "--data", str(folder), "--num-classes", "10",
                     "--out", str(tmp_path / "o")], capsys)
    assert "--class-map" in err and "index" in err
    err = run_error(["run", "--model", "flat_models:net", "--data", str(folder), "--normalize", "1,2:3",
                     "--out", str(tmp_path / "o")], capsys)
    assert "--normalize" in err
    err = run_error(["run", "--num-classes", "5", "--out", str(tmp_path / "o")], capsys)
    assert "--num-classes" in err and "digits" in err


# --- the report's words -------------------------------------------------------------------------

def test_rerendered_report_keeps_the_notes_and_numbers_sections_without_gaps(tmp_path, cache_home, capsys):
    """fc1 of the digits MLP has no closed form: the run leaves obd/taylor2 out and says why; `report DIR`
    says it again. A report without train data or activations numbers its sections 1, 2, 3, 4."""
    import json
    import re

    run = tmp_path / "run"
    assert main(["run", "--layer", "fc1", "--weights", "40", "--out", str(run), "--quiet"]) == 0
    skipped = json.loads((run / "summary.json").read_text())["criteria"]["skipped"]
    assert set(skipped) == {"obd", "taylor2"} and all(skipped.values())
    again = tmp_path / "again"
    assert main(["report", str(run), "--out", str(again), "--quiet"]) == 0
    page = (again / "report.html").read_text()
    assert json.loads((again / "summary.json").read_text())["criteria"]["skipped"] == skipped
    for name in ("obd", "taylor2"):
        assert f"{name} left out:" in page
    headings = re.findall(r"<h2>(\d+)\. ", page)
    assert headings == [str(k) for k in range(1, len(headings) + 1)] and len(headings) == 6
    bare = tmp_path / "bare"
    assert main(["report", str(run / "results.npz"), "--out", str(bare), "--quiet"]) == 0
    headings = re.findall(r"<h2>(\d+)\. ([^<]*)</h2>", (bare / "report.html").read_text())
    assert [h[0] for h in headings] == ["1", "2", "3", "4"] and headings[3][1].startswith("Pruning criteria")


def test_plural_forms_and_integer_flip_ticks():
    from weightablate import AblationResult
    from weightablate.reporting import fig_flips
    from weightablate.summary import format_summary, summarize

    idx = torch.arange(3)
    res = AblationResult(indices=idx, rows=idx // 3, cols=idx % 3, weight=torch.tensor([0.5, -1.0, 2.0]),
                         delta_loss=torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), delta_kl=None,
                         flips=torch.tensor([0, 1, 0]), new_errors=torch.tensor([0, 1, 0]),
                         new_correct=torch.tensor([0, 0, 0]), exact_zero=torch.tensor([False, False, True]),
                         n_samples=1, base_loss=0.3, base_accuracy=1.0, layer="l", layer_shape=(1, 3))
    text = format_summary(summarize(res))
    for phrase in ("1 weight lowers the loss", "1 changes no logit", "1 weight flips any", "at most 1 new error,",
                   "1 sample"):
        assert phrase in text, phrase
    assert "1 weights" not in text and "1 samples" not in text
    fig = fig_flips(np.arange(3), np.array([5, 1, 2]))
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_documentation_links_stay_inside_the_repository():
    """README.md and docs/*.md link only to files a clone has (not ../shared/DESIGN.md)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert (root / "docs" / "DESIGN.md") in pages
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path = (page.parent / target).resolve()
            assert path.is_relative_to(root) and path.exists(), (page.name, target)
    assert "docs/DESIGN.md" in (root / "README.md").read_text()

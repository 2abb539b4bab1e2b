"""weightablate.prune: exact importance inside torch.nn.utils.prune, signed ranking, the iterative
schedule and the `weightablate prune` command."""
import copy
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

import weightablate as wa
from weightablate import criteria, digits
from weightablate import prune as wp
from weightablate.cli import main
from weightablate.report_pruning import plot_pruning

from oracle import oracle


def small_mlp():
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(64, 24)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(24, 20)),
                                      ("relu2", nn.ReLU()), ("fc3", nn.Linear(20, 10))]))


@pytest.fixture(scope="module")
def split():
    X_tr, y_tr, X_te, y_te = digits.load_digits_split(0)
    return (X_tr[:400], y_tr[:400]), (X_te[:200], y_te[:200])


@pytest.fixture(scope="module")
def trained(split):
    torch.manual_seed(0)
    model = small_mlp()
    return wp.finetune(model, split[0], 6, lr=3e-3, seed=0, threads=1)


def test_exact_scores_equal_ablate_delta_loss(trained, split):
    s = wp.importance(trained, "fc2", split[0])
    res = wa.ablate(trained, "fc2", split[0], progress=False)
    assert s.dtype == torch.float64 and s.shape == trained.fc2.weight.shape
    assert torch.equal(s, res.delta_loss.reshape(trained.fc2.weight.shape))
    both = wp.layer_scores(trained, [trained.fc2, "fc3"], split[0])
    assert torch.equal(both["fc2"], s)
    assert torch.equal(both["fc3"].reshape(-1), wa.ablate(trained, "fc3", split[0], progress=False).delta_loss)


def test_exact_scores_on_a_pruned_finetuned_model_match_a_float64_oracle(trained, split):
    model = copy.deepcopy(trained)
    wp.global_unstructured(model, ["fc2", "fc3"], 0.4, split[0], criterion="magnitude")
    wp.finetune(model, split[0], 1, seed=1, threads=1)
    # one more optimizer step without a forward after it: module.weight is stale until refreshed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(split[0][0]), split[0][1]).backward()
    opt.step()
    mask = model.fc2.weight_mask.clone()
    s = wp.importance(model, "fc2", split[0], precision="float64")
    plain = wp.remove(copy.deepcopy(model))  # the oracle works on a plain copy, in float64
    assert isinstance(plain.fc2.weight, nn.Parameter) and not hasattr(plain.fc2, "weight_orig")
    flat = torch.arange(plain.fc2.weight.numel())
    ref = oracle(plain, "fc2", *split[0], flat)
    tol = 1e-9 * ref["abs_sum"] + ref["round"] + 1e-13
    assert ((s.reshape(-1) - ref["delta_loss"]).abs() <= tol).all()
    assert (s[mask == 0] == 0).all()  # pruned weights: exactly zero effect
    # the library's float32 path on the pruned model itself agrees too
    s32 = wp.importance(model, "fc2", split[0])
    assert ((s32.reshape(-1) - ref["delta_loss"]).abs() <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"]
            + 1e-12).all()


def test_masks_stay_zero_through_finetuning_and_remove_leaves_plain_tensors(trained, split):
    model = copy.deepcopy(trained)
    wp.global_unstructured(model, ["fc2", "fc3"], 0.5, split[0], "exact")
    masks = {n: getattr(model, n).weight_mask.clone() for n in ("fc2", "fc3")}
    before = {n: getattr(model, n).weight_orig.detach().clone() for n in ("fc2", "fc3")}
    wp.finetune(model, split[0], 2, lr=1e-2, seed=0, threads=1)
    for n, mask in masks.items():
        m = getattr(model, n)
        assert torch.equal(m.weight_mask, mask)
        assert (m.weight[mask == 0] == 0).all()
        assert not torch.equal(m.weight_orig[mask == 1], before[n][mask == 1])  # the rest did train
    wp.remove(model)
    for n, mask in masks.items():
        m = getattr(model, n)
        assert isinstance(m.weight, nn.Parameter) and m.weight.is_leaf
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        assert not m._forward_pre_hooks
        assert (m.weight[mask == 0] == 0).all() and int((m.weight == 0).sum()) >= int((mask == 0).sum())
    assert set(model.state_dict()) == set(small_mlp().state_dict())


def test_signed_ranking_removes_negative_delta_weights_first():
    # logits layer; weight (0, 1) pushes class 0 on samples of class 1: zeroing it lowers the loss
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 1.5], [-0.1, 2.0]]))
    model = nn.Sequential(layer)
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    s = wp.importance(model, "0", (X, y))
    assert s[0, 1] < 0 and (s.reshape(-1) < 0).sum() == 1  # the only weight whose removal helps
    assert 0 < s[1, 0] < s[0, 1].abs()  # ... and not the smallest |delta|
    loss0 = wp.evaluate(model, (X, y))[0]

    signed = copy.deepcopy(model)
    wp.global_unstructured(signed, ["0"], 1, (X, y), criterion="exact")
    assert signed[0].weight_mask.reshape(-1).tolist() == [1, 0, 1, 1]
    assert wp.evaluate(signed, (X, y))[0] < loss0

    # torch's L1Unstructured with the same scores takes abs(): it removes another weight
    torch_way = copy.deepcopy(model)
    tprune.global_unstructured([(torch_way[0], "weight")], pruning_method=tprune.L1Unstructured,
                               importance_scores={(torch_way[0], "weight"): s}, amount=1)
    assert torch_way[0].weight_mask[0, 1] == 1
    abs_way = copy.deepcopy(model)
    wp.global_unstructured(abs_way, ["0"], 1, (X, y), "exact", ranking="abs")
    assert torch.equal(abs_way[0].weight_mask, torch_way[0].weight_mask)

    # the pruning method on its own, with the standard torch API
    local = copy.deepcopy(model)
    wp.signed_unstructured(local[0], "weight", amount=1, importance_scores=s)
    assert torch.equal(local[0].weight_mask, signed[0].weight_mask)


def test_global_amount_across_two_layers(trained, split):
    model = copy.deepcopy(trained)
    n2, n3 = model.fc2.weight.numel(), model.fc3.weight.numel()
    scores = wp.global_unstructured(model, ["fc2", "fc3"], 0.3, split[0], "exact")
    pruned = int((model.fc2.weight_mask == 0).sum() + (model.fc3.weight_mask == 0).sum())
    assert pruned == round(0.3 * (n2 + n3))
    st = wp.sparsity(model, ["fc2", "fc3"])
    assert st["pruned"] == pruned and st["total"] == n2 + n3
    # the pruned ones are exactly the lowest global scores
    flat = torch.cat([scores["fc2"].reshape(-1), scores["fc3"].reshape(-1)])
    kept = torch.cat([model.fc2.weight_mask.reshape(-1), model.fc3.weight_mask.reshape(-1)]) == 1
    assert flat[~kept].max() <= flat[kept].min()
    # a second call prunes a fraction of what is left (torch semantics), and an int is a count
    wp.global_unstructured(model, ["fc2", "fc3"], 0.5, split[0], criterion="magnitude")
    left = n2 + n3 - pruned
    assert wp.sparsity(model, ["fc2", "fc3"])["pruned"] == pruned + round(0.5 * left)
    before = wp.sparsity(model, ["fc2", "fc3"])["pruned"]
    wp.global_unstructured(model, ["fc2", "fc3"], 7, split[0], criterion="wanda")
    assert wp.sparsity(model, ["fc2", "fc3"])["pruned"] == before + 7


def test_other_criteria_scores(trained, split):
    model = copy.deepcopy(trained)
    for name in ("magnitude", "squared", "wanda", "taylor", "obd", "taylor2"):
        s = wp.importance(model, "fc2", split[0], criterion=name)
        fn = getattr(criteria, name)
        ref = fn(model.fc2) if name in ("magnitude", "squared") else fn(model, "fc2", split[0])
        assert torch.equal(s, ref.cpu()), name
    wp.global_unstructured(model, ["fc2"], 0.5, split[0], criterion="magnitude")
    for name in ("magnitude", "wanda", "taylor", "obd"):  # scored on the masked weights: pruned ones score 0
        s = wp.importance(model, "fc2", split[0], criterion=name)
        assert (s[model.fc2.weight_mask == 0] == 0).all(), name
    with pytest.raises(ValueError, match="criterion must be one of"):
        wp.importance(model, "fc2", split[0], criterion="random")
    with pytest.raises(TypeError, match="criterion='exact' only"):
        wp.importance(model, "fc2", split[0], criterion="magnitude", backend="torch")


def test_exact_scores_every_layer_ablate_scores(trained, split):
    """fc1 has no closed form (two Linears follow it): "exact" scores it by ablate's replay, equal to the
    float64 naive loop; obd/taylor2 need the closed form and say so."""
    X, y = split[0][0][:120], split[0][1][:120]
    s = wp.importance(trained, "fc1", (X, y), precision="float64")
    flat = torch.arange(0, trained.fc1.weight.numel(), 59)
    ref = oracle(trained, "fc1", X, y, flat)
    assert ((s.reshape(-1)[flat] - ref["delta_loss"]).abs() <= 1e-9 * ref["abs_sum"] + ref["round"] + 1e-13).all()
    assert wp.scorable_layers(trained, split[0]) == ["fc1", "fc2", "fc3"]
    assert wp.scorable_layers(trained, split[0], "obd") == ["fc2", "fc3"]
    with pytest.raises(ValueError, match="no closed form|closed form"):
        wp.global_unstructured(copy.deepcopy(trained), ["fc1", "fc2"], 0.5, split[0], "obd")
    conv = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 36, 10))
    assert wp.scorable_layers(conv, split[0], kinds=(nn.Linear, nn.Conv2d)) == ["1", "4"]
    sc = wp.importance(conv, "1", (X, y), precision="float64")
    ref = oracle(conv, "1", X, y, torch.arange(27))
    assert ((sc.reshape(-1) - ref["delta_loss"]).abs() <= 1e-9 * ref["abs_sum"] + ref["round"] + 1e-13).all()
    wp.global_unstructured(conv, ["1", "4"], 0.5, split[0], "exact")
    assert wp.sparsity(conv, ["1", "4"])["pruned"] == round(0.5 * (27 + 1080))


def test_channel_importance_is_row_and_column_sums(trained, split):
    s = wp.importance(trained, "fc2", split[0])
    assert torch.equal(wp.channel_importance(s, 0), s.sum(1))
    assert torch.equal(wp.channel_importance(s, 1), s.sum(0))
    assert "NOT the effect of removing" in wp.CHANNEL_SCORE_LABEL

    # the Torch-Pruning importance on a real group: fc2's rows and fc3's columns of each channel
    import torch_pruning as tp

    DG = tp.DependencyGraph().build_dependency(trained, example_inputs=split[0][0][:1])
    group = DG.get_pruning_group(trained.fc2, tp.prune_linear_out_channels, idxs=list(range(20)))
    imp = wp.SummedWeightImportance(trained, split[0])(group)
    s3 = wp.importance(trained, "fc3", split[0])
    assert torch.allclose(imp, s.sum(1) + s3.sum(0), rtol=1e-12, atol=1e-12)


def test_iterative_is_reproducible_and_reaches_the_target(trained, split):
    def go(seed):
        model = copy.deepcopy(trained)
        hist = wp.iterative(model, ["fc2", "fc3"], (0.5, 0.8), split[0], criterion="exact", epochs=1,
                            eval_data=split[1], seed=seed, threads=1)
        return model, hist

    a, ha = go(3)
    b, hb = go(3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]  # noqa: E731
    assert strip(ha) == strip(hb)
    assert [r["pruned"] for r in ha] == [round(0.5 * 680), round(0.8 * 680)]
    assert [round(r["sparsity"], 6) for r in ha] == [round(round(0.5 * 680) / 680, 6), round(round(0.8 * 680) / 680, 6)]
    assert all(0 <= r["negative_scores"] <= 1 for r in ha) and ha[0]["negative_scores"] > 0
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in ha)
    c, _ = go(4)
    assert not torch.equal(c.fc1.weight, a.fc1.weight)  # the seed drives fine-tuning
    assert wp.schedule(0.75, 2) == [0.5, 0.75]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"model": m, "criterion": c, "target": s, "accuracy": 0.9 - s / 10 + seed / 100, "seed": seed,
                "loss": 0.1 + s}
               for m in ("mlp", "cnn") for c in ("exact", "magnitude") for s in (0.5, 0.9) for seed in range(2)]
    path = plot_pruning(records, tmp_path / "p.png", keys=("accuracy",))
    assert path.stat().st_size > 1000


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_cli_prune_digits(tmp_path, cache_home, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--sparsity", "0.5", "--steps", "1", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "layers fc1, fc2, fc3" in printed and printed.strip() == (out / "summary.txt").read_text().strip()
    hist = json.loads((out / "history.json").read_text())
    assert hist["layers"] == ["fc1", "fc2", "fc3"] and hist["criterion"] == "wanda" and len(hist["history"]) == 1
    state = torch.load(out / "pruned.pt", weights_only=True)
    model = digits.digits_mlp()
    model.load_state_dict(state)  # plain state dict: loads into the unpruned architecture
    zeros = int((model.fc1.weight == 0).sum() + (model.fc2.weight == 0).sum() + (model.fc3.weight == 0).sum())
    assert zeros >= round(0.5 * (64 * 256 + 256 * 256 + 2560))
    assert hist["history"][0]["accuracy_pruned"] > 0.9  # wanda at 50%: the accuracy survives
    # the trajectory goes into the report: accuracy vs sparsity, the numbers of history.json
    _, _, X, y = digits.load_digits_split()
    wa.ablate(model, "fc3", (X, y)).save(tmp_path / "r.npz")
    assert main(["report", str(tmp_path / "r.npz"), "--pruning", str(out / "history.json"), "--out",
                 str(tmp_path / "rep"), "--quiet"]) == 0
    line = json.loads((tmp_path / "rep" / "summary.json").read_text())["pruning"]["digits MLP 64-256-256-10"]["wanda"]
    assert [p["accuracy_mean"] for p in line] == [hist["base_accuracy"], hist["history"][0]["accuracy"]]
    assert (tmp_path / "rep" / "pruning.png").is_file()


def test_cli_prune_errors(tmp_path, cache_home, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--layers", "fc1", "--criterion", "obd", "--out", str(tmp_path), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'fc1' cannot be scored by --criterion obd: it needs the closed form" in err and "['fc2', 'fc3']" in err
    with pytest.raises(SystemExit):
        main(["prune", "--layers", "relu1", "--out", str(tmp_path), "--quiet"])
    assert "not an nn.Linear or nn.Conv2d" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--sparsity", "0.9,0.5", "--out", str(tmp_path)])
    assert "increasing" in capsys.readouterr().err


def test_cli_prune_torchvision(tmp_path, capsys):
    pytest.importorskip("torchvision")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("ant", "bee", "cat"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{k}.png")
    common = ["--data", str(tmp_path / "imgs"), "--image-size", "32", "--steps", "1", "--epochs", "1", "--quiet"]
    assert main(["prune", "--model", "resnet18", "--out", str(tmp_path / "r18"), *common]) == 0
    hist = json.loads((tmp_path / "r18" / "history.json").read_text())
    assert hist["layers"] == ["fc"] and hist["history"][0]["pruned"] == round(0.5 * 512 * 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "squeezenet1_0", "--out", str(tmp_path / "sq"), *common])
    assert exc.value.code == 2 and "has no nn.Linear layer to prune" in capsys.readouterr().err


def test_cli_prune_exact_on_any_layer(tmp_path, monkeypatch, capsys):
    """`prune --layers fc1,conv --criterion exact`: layers without a closed form are scored by ablate's
    replay, and the weights pruned are those with the smallest exact deltas."""
    (tmp_path / "tiny_models.py").write_text(
        "import torch\nfrom collections import OrderedDict\nfrom torch import nn\n"
        "def net(num_classes):\n    torch.manual_seed(0)\n    return nn.Sequential(OrderedDict([\n"
        "        ('unflatten', nn.Unflatten(1, (1, 8, 8))), ('conv', nn.Conv2d(1, 2, 3)), ('relu0', nn.ReLU()),\n"
        "        ('flatten', nn.Flatten()), ('fc1', nn.Linear(72, 12)), ('relu1', nn.ReLU()),\n"
        "        ('fc2', nn.Linear(12, 10)), ('relu2', nn.ReLU()), ('fc3', nn.Linear(10, num_classes))]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["prune", "--model", "tiny_models:net", "--layers", "conv,fc1", "--criterion", "exact", "--steps",
                 "1", "--epochs", "0", "--sparsity", "0.3", "--out", str(out), "--quiet"]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert hist["layers"] == ["conv", "fc1"] and hist["history"][0]["pruned"] == round(0.3 * (18 + 864))
    import tiny_models

    model = tiny_models.net(10)
    X, y, _, _ = digits.load_digits_split(0)
    scores = wp.layer_scores(model, ["conv", "fc1"], (X, y), "exact")
    flat = torch.cat([scores["conv"].reshape(-1), scores["fc1"].reshape(-1)])
    state = torch.load(out / "pruned.pt", weights_only=True)
    zero = torch.cat([(state["conv.weight"] == 0).reshape(-1), (state["fc1.weight"] == 0).reshape(-1)])
    k = round(0.3 * flat.numel())
    assert int(zero.sum()) == k and set(torch.nonzero(zero).reshape(-1).tolist()) == \
        set(torch.sort(flat, stable=True).indices[:k].tolist())

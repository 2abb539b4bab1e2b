"""Torch-Pruning importance objects (weightablate.prune.ExactChannelImportance and
SummedWeightImportance) against Torch-Pruning itself: the exact score of channel k equals the
float64 loss change of the model after ``tp`` physically removes channel k from its group."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp  # a test dependency (pyproject's "test" extra): a missing install fails
from torch import nn

from weightablate import prune as wp

RTOL = 1e-7


class CNN(nn.Module):
    """conv -> BN -> relu twice, AdaptiveAvgPool2d(2) -> flatten (4 features per channel) -> Linear
    -> functional torch.relu -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(20, 7), nn.Linear(7, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc2(torch.relu(self.fc1(self.pool(h).flatten(1))))


def random_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -.5, .5), (m.running_var, .5, 1.5), (m.weight.data, .5, 1.5),
                              (m.bias.data, -.3, .3)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model.eval()


def data(shape, n=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def group_of(model, name, example):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    layer = model.get_submodule(name)
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    return DG.get_pruning_group(layer, fn, idxs=list(range(layer.weight.shape[0])))


def tp_removal(model, name, k, X, y):
    """The float64 loss change after Torch-Pruning physically removes channel k of ``name``'s group
    from a deep copy (and the pruned copy, to check its shapes)."""
    pruned = copy.deepcopy(model)
    group_of(pruned, name, X[:1]).prune(idxs=[k])
    with torch.no_grad():
        after = F.cross_entropy(pruned(X), y, reduction="none")
        before = F.cross_entropy(model(X), y, reduction="none")
    return (after - before).sum().item(), (after - before).abs().sum().item()


def check_against_tp(model, names, X, y, channels=(0, -1), methods=None, **kw):
    imp = wp.ExactChannelImportance(model, (X, y), precision="float64", **kw)
    for name in names:
        n = model.get_submodule(name).weight.shape[0]
        ks = [k % n for k in channels]
        scores = imp.exact(group_of(model, name, X[:1]), channels=ks)
        assert scores.dtype == torch.float64 and scores.shape == (len(ks),)
        for k, score in zip(ks, scores.tolist()):
            want, scale = tp_removal(model, name, k, X, y)
            assert abs(score - want) <= RTOL * abs(want) + 1e-13 * scale, (name, k, score, want)
    if methods:
        assert {n: imp.methods[n] for n in names} == methods
    return imp


def test_small_cnn_every_group_matches_torch_pruning():
    model = random_bn(CNN()).double()
    X, y = data((3, 8, 8))
    imp = check_against_tp(model, ["conv1", "conv2", "fc1"], X, y, channels=(0, 2, -1),
                           methods={"conv1": "ablate", "conv2": "ablate", "fc1": "ablate"})
    every = imp.exact(group_of(model, "conv2", X[:1]))
    assert every.shape == (5,) and torch.equal(every[[3, 1]], imp.exact(group_of(model, "conv2", X[:1]), [3, 1]))
    with pytest.raises(ValueError, match="channels: .* not all channels of 'conv2'"):
        imp.exact(group_of(model, "conv2", X[:1]), [5])


def test_resnet18_groups_match_torch_pruning_residual_ones_included():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = random_bn(torchvision.models.resnet18(num_classes=4)).double()
    X, y = data((3, 16, 16), n=3)
    # layer1.0.conv1: a plain chain (ablate); conv1 and layer2.0.downsample.0: channels of a residual
    # stream, removed from every coupled layer by Torch-Pruning (the replay). The comparison with
    # Torch-Pruning is the check here: ablate's own self-check is skipped to keep the test short.
    check_against_tp(model, ["layer1.0.conv1", "conv1", "layer2.0.downsample.0"], X, y, channels=(3,), verify=False,
                     methods={"layer1.0.conv1": "ablate", "conv1": "replay", "layer2.0.downsample.0": "replay"})


def mlp_with_dead_units():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).double()
    with torch.no_grad():
        m[0].weight[:6] = 0
        m[0].bias[:6] = -1.0  # dead on every sample: removing them changes nothing, exactly 0
        m[2].weight[:4] = 0
        m[2].bias[:4] = -1.0
    return m.eval()


def test_exact_zero_ties_do_not_change_how_much_global_pruning_removes():
    m = mlp_with_dead_units()
    X, y = data((8,), n=40, classes=3)
    imp = wp.ExactChannelImportance(m, (X, y), precision="float64")
    exact = {n: imp.exact(group_of(m, n, X[:1])) for n in ("0", "2")}
    assert (exact["0"][:6] == 0).all() and (exact["2"][:4] == 0).all()  # 10 channels tie at 0
    pruner = tp.pruner.MetaPruner(m, X[:1], importance=imp, pruning_ratio=0.3, global_pruning=True,
                                  ignored_layers=[m[4]])
    pruner.step()
    # 22 channels, 30% asked: int(22 * 0.7) = 15 stay; without the tie-break all 10 zeros went
    assert m[0].out_features + m[2].out_features == 15
    assert m[0].weight.shape[0] == m[0].out_features and m[2].weight.shape[1] == m[2].in_features == m[0].out_features
    assert m(X).shape == (40, 3)
    # the untied scores differ from the exact ones by ulps only
    imp2 = wp.ExactChannelImportance(mlp_with_dead_units(), (X, y), precision="float64")
    untied = imp2(group_of(imp2.model, "0", X[:1]))
    assert torch.allclose(untied, exact["0"], rtol=1e-15, atol=1e-300) and len(set(untied.tolist())) == 12


def test_conv_through_a_2x2_flatten_scores_per_channel_and_leaves_a_consistent_model():
    for make_imp in (lambda m, d: wp.ExactChannelImportance(m, d, precision="float64"),
                     lambda m, d: wp.SummedWeightImportance(m, d, "magnitude")):
        model = random_bn(CNN()).double()
        X, y = data((3, 8, 8))
        imp = make_imp(model, (X, y))
        assert imp(group_of(model, "conv2", X[:1])).shape == (5,)  # one per channel, not per Linear column
        with warnings.catch_warnings():
            warnings.simplefilter("error", wp.UnscorableGroupWarning)  # no group skipped
            pruner = tp.pruner.MetaPruner(model, X[:1], importance=imp, pruning_ratio=0.4, ignored_layers=[model.fc2])
            pruner.step()
        # local pruning, 40% of each group: 6 -> 3, 5 -> 3, 7 -> 4 channels stay (int(n * 0.6))
        assert (model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features) == (3, 3, 4)
        assert model.conv2.weight.shape[:2] == (3, 3) and model.fc1.in_features == model.fc1.weight.shape[1] == 12
        assert model.bn2.num_features == 3 and model(X).shape == (6, 4)


def test_summed_weight_importance_maps_flattened_columns_back_to_channels():
    model = random_bn(CNN()).double()
    X, y = data((3, 8, 8))
    got = wp.SummedWeightImportance(model, (X, y), "magnitude")(group_of(model, "conv2", X[:1]))
    w_conv = model.conv2.weight.detach().abs().reshape(5, -1).sum(1)
    w_fc = model.fc1.weight.detach().abs().sum(0).reshape(5, 4).sum(1)  # channel c: columns 4c..4c+3
    assert torch.allclose(got, w_conv + w_fc, rtol=1e-12, atol=0)
    assert "NOT the effect" in wp.SummedWeightImportance(model, (X, y)).label


class WithGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.gn(self.conv(x))), 1).flatten(1))


def test_an_unscorable_group_warns_naming_the_layer_and_is_left_unpruned():
    model = WithGroupNorm().double().eval()
    X, y = data((3, 6, 6), classes=3)
    imp = wp.ExactChannelImportance(model, (X, y))
    with pytest.raises(wp.UnscorableGroup, match="'gn' is a Torch-Pruning GN member"):
        imp.exact(group_of(model, "conv", X[:1]))
    with pytest.warns(wp.UnscorableGroupWarning, match="group of 'conv' is not scored"):
        tp.pruner.MetaPruner(model, X[:1], importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc]).step()
    assert model.conv.out_channels == 4 and "conv" in imp.unscorable


def test_the_logits_layer_is_refused_not_scored():
    model = CNN().double().eval()
    X, y = data((3, 8, 8))
    with pytest.raises(wp.UnscorableGroup, match="'fc2' produces the model's output"):
        wp.ExactChannelImportance(model, (X, y)).exact(group_of(model, "fc2", X[:1]))


def test_float32_scores_follow_float64_and_the_model_is_untouched():
    model = random_bn(CNN())
    X, y = data((3, 8, 8))
    X = X.float()
    before = copy.deepcopy(model.state_dict())
    g = group_of(model, "conv1", X[:1])
    s32 = wp.ExactChannelImportance(model, (X, y)).exact(g)
    s64 = wp.ExactChannelImportance(model, (X, y), precision="float64").exact(g)
    assert torch.allclose(s32, s64, rtol=1e-3, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mobilenet_v3_small_depthwise_and_squeeze_excitation_groups_match_torch_pruning():
    """The expand conv's channels run through the depthwise conv and the SE gate (pooling -> fc1, and
    the product): Torch-Pruning removes the channel from all of them; so does the replay."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = random_bn(torchvision.models.mobilenet_v3_small(num_classes=4)).double()
    X, y = data((3, 32, 32), n=3)
    check_against_tp(model, ["features.9.block.0.0", "features.9.block.1.0"], X, y, channels=(5,),
                     methods={"features.9.block.0.0": "replay", "features.9.block.1.0": "replay"})

"""Helpers of benchmarks/oracle_study.py: digits as images, the two CNNs, channel-level pruning
criteria, rank correlations with bootstrap intervals, and masked models.

Channel criteria (``channel_criteria``), per output channel k of a Conv2d followed by a BatchNorm2d
(``W_k``: filter k and its bias; ``g``: gradient of the cross-entropy SUMMED over the data, the loss
whose change ``ablate`` reports as ``delta_loss``; higher = keep):

=================  ====================================================  =====================
l1, l2             ``||W_k||_1``, ``||W_k||_2``                          data-free
bn_gamma           ``|gamma_k|`` of the BatchNorm after the conv        data-free
taylor_w           ``(sum g * w over W_k)**2`` (Molchanov et al. 2019)   one backward
taylor_bn          ``(g_gamma gamma_k + g_beta beta_k)**2`` (ibid.)       one backward
obd                ``0.5 * sum h * w**2 over W_k``, ``h``: the exact      C backwards per sample
                   Gauss-Newton diagonal (``ggn_diagonal``)
taylor_w_signed    ``-sum g * w over W_k``: first-order estimate of the change when W_k is zeroed
taylor_bn_signed   ``-(g_gamma gamma_k + g_beta beta_k)``: first-order estimate of the change
                   when the BN channel's output is zeroed, which is what structure="out" removes
random             uniform, seeded
=================  ====================================================  =====================

The Gauss-Newton diagonal: ``sum_n J_n^T (diag p_n - p_n p_n^T) J_n``, exactly (no sampling): with
``B = diag(sqrt p) - p sqrt(p)^T`` (``B B^T = diag p - p p^T``) it is
``sum_n sum_c (d/dtheta sqrt(p_c) (f_c - p . f))^2`` with ``p`` held fixed, one per-sample gradient
per class. For a network whose logits are piecewise linear in one layer's weights (Conv -> BN in
eval -> ReLU, max/avg pooling, Linear) it IS the Hessian's diagonal for that layer (the dropped
term has the second derivative of the logits, zero there); with Hardswish/Hardsigmoid
(MobileNetV3) it is the Gauss-Newton part only.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

CHANNEL_CRITERIA = ("l1", "l2", "bn_gamma", "taylor_w", "taylor_bn", "obd", "taylor_w_signed", "taylor_bn_signed",
                    "random")


# --- data and models --------------------------------------------------------------------------

def digits_images(size: int = 16, channels: int = 1, seed: int = 0):
    """scikit-learn's digits (standardised per pixel, weightablate.digits.load_digits_split) as
    (N, channels, size, size) float32 images, bilinearly upscaled from 8x8; labels int64."""
    from .digits import load_digits_split

    X_tr, y_tr, X_te, y_te = load_digits_split(seed)

    def images(X):
        x = X.reshape(-1, 1, 8, 8)
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.expand(-1, channels, -1, -1).contiguous()

    return images(X_tr), y_tr, images(X_te), y_te


def small_cnn(n_classes: int = 10) -> nn.Sequential:
    """conv1 1->16, conv2 16->32 (+ max-pool), conv3 32->64, each Conv -> BN -> ReLU; global
    average pooling and fc 64 -> classes."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("bn3", nn.BatchNorm2d(64)), ("relu3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(64, n_classes)),
    ]))


def mobilenet(n_classes: int = 10) -> nn.Module:
    """torchvision's MobileNetV3-Small, random initialisation (no download)."""
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=n_classes)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for every Conv2d whose output goes only into a BatchNorm2d, in graph order."""
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], nn.BatchNorm2d):
                pairs.append((node.target, users[0].target))
    return pairs


# --- channel criteria -------------------------------------------------------------------------

def _batches(X, y, batch_size):
    for s in range(0, X.shape[0], batch_size):
        yield X[s:s + batch_size], y[s:s + batch_size]


def loss_gradients(model: nn.Module, X, y, names, batch_size: int = 256) -> dict:
    """float64 gradients of the summed cross-entropy over (X, y) for the parameters ``names``
    (eval mode; the model's grads and modes are left as they were)."""
    params = dict(model.named_parameters())
    training = model.training
    model.eval()
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    try:
        for xb, yb in _batches(X, y, batch_size):
            with torch.enable_grad():
                loss = F.cross_entropy(model(xb), yb, reduction="sum")
                grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                total[n] += g.double()
    finally:
        model.train(training)
    return total


def ggn_diagonal(model: nn.Module, X, names, batch_size: int = 64) -> dict:
    """The exact Gauss-Newton diagonal of the summed cross-entropy over X for the parameters
    ``names`` (module docstring): float64, shaped like each parameter. Labels are not needed.
    One vmapped per-sample gradient per class and batch (a Jacobian of all classes at once,
    jacrev, was several times slower here)."""
    from torch.func import functional_call, grad, vmap

    training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fixed = {n: p for n, p in params.items() if n not in names}
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    try:
        with torch.no_grad():
            probs = torch.cat([F.softmax(model(xb), 1) for xb, _ in _batches(X, X, 1024)])
        C = probs.shape[1]

        def scalar(free, x, p, c):  # sqrt(p_c) (f_c - p . f) of one sample, p fixed
            f = functional_call(model, ({**fixed, **free}, buffers), (x[None],))[0]
            return p[c].sqrt() * (f[c] - (p * f).sum())

        per_sample = vmap(grad(scalar), in_dims=(None, 0, 0, None))
        free = {n: params[n] for n in names}
        for s in range(0, X.shape[0], batch_size):
            xb, pb = X[s:s + batch_size], probs[s:s + batch_size]
            for c in range(C):
                g = per_sample(free, xb, pb, c)
                for n in names:
                    total[n] += g[n].double().pow(2).sum(0)
    finally:
        model.train(training)
    return total


def channel_criteria(model: nn.Module, pairs, X, y, *, seed: int = 0, obd: bool = True,
                     batch_size: int = 256) -> dict:
    """``{conv name: {criterion: (out_channels,) float64}}`` for the (conv, BN) ``pairs``; every
    criterion of CHANNEL_CRITERIA (``obd=False`` leaves out the costly Gauss-Newton diagonal)."""
    names = []
    for conv, bn in pairs:
        names += [f"{conv}.weight", f"{bn}.weight", f"{bn}.bias"]
        if model.get_submodule(conv).bias is not None:
            names.append(f"{conv}.bias")
    g = loss_gradients(model, X, y, names, batch_size)
    conv_names = [n for n in names if n.rsplit(".", 1)[0] in {c for c, _ in pairs}]
    h = ggn_diagonal(model, X, conv_names) if obd else None
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for conv, bn in pairs:
        c, b = model.get_submodule(conv), model.get_submodule(bn)
        w = c.weight.detach().double().flatten(1)
        gw = (g[f"{conv}.weight"].flatten(1) * w).sum(1)
        if c.bias is not None:
            gw = gw + g[f"{conv}.bias"] * c.bias.detach().double()
        gamma, beta = b.weight.detach().double(), b.bias.detach().double()
        gbn = g[f"{bn}.weight"] * gamma + g[f"{bn}.bias"] * beta
        scores = {"l1": w.abs().sum(1), "l2": w.norm(dim=1), "bn_gamma": gamma.abs(),
                  "taylor_w": gw * gw, "taylor_bn": gbn * gbn, "taylor_w_signed": -gw, "taylor_bn_signed": -gbn,
                  "random": torch.rand(w.shape[0], generator=gen, dtype=torch.float64)}
        if h is not None:
            o = 0.5 * (h[f"{conv}.weight"].flatten(1) * w * w).sum(1)
            if c.bias is not None:
                o = o + 0.5 * h[f"{conv}.bias"] * c.bias.detach().double() ** 2
            scores["obd"] = o
        out[conv] = {k: scores[k] for k in CHANNEL_CRITERIA if k in scores}
    return out


# --- rank correlations ------------------------------------------------------------------------

def rank_correlations(score, truth) -> dict:
    """Spearman and Kendall (tau-b) of ``score`` against ``truth`` (1-D), and Spearman of ``|score|``
    against ``|truth|`` (whether it finds the channels that matter either way). NaN-free: a constant
    side gives 0."""
    from scipy import stats

    s, t = np.asarray(score, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"score and truth must be 1-D of one length, got {s.shape} and {t.shape}")

    def clean(v):
        return 0.0 if v is None or not math.isfinite(v) else float(v)

    with warnings.catch_warnings():  # a constant side (e.g. a layer's all-equal BN gammas): 0, said above
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return {"spearman": clean(stats.spearmanr(s, t)[0]), "kendall": clean(stats.kendalltau(s, t)[0]),
                "spearman_abs": clean(stats.spearmanr(np.abs(s), np.abs(t))[0]), "n": int(s.size)}


def kendall_bootstrap(a, b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Kendall tau of a against b and a percentile bootstrap interval (pairs resampled together)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(n_boot):
        i = rng.integers(0, a.size, a.size)
        t = stats.kendalltau(a[i], b[i])[0]
        taus.append(0.0 if not math.isfinite(t) else t)
    lo, hi = np.quantile(taus, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"tau": float(stats.kendalltau(a, b)[0]), "low": float(lo), "high": float(hi), "n": int(a.size),
            "n_boot": n_boot}


# --- masks (part 2) ---------------------------------------------------------------------------

def mask_channels(model: nn.Module, conv: str, bn: str, keep: torch.Tensor) -> nn.Module:
    """Remove the output channels of ``conv`` where ``keep`` is False, as structure="out" does: the
    filter, its bias and the BN channel are held at zero (torch.nn.utils.prune masks, so fine-tuning
    keeps them there; the BN output of the channel is then 0 in train and eval mode)."""
    from torch.nn.utils import prune as tprune

    keep = keep.to(torch.bool)
    for module in (model.get_submodule(conv), model.get_submodule(bn)):
        for name in ("weight", "bias"):
            t = getattr(module, name, None)
            if t is not None:
                shape = (-1,) + (1,) * (t.dim() - 1)
                tprune.custom_from_mask(module, name, keep.reshape(shape).expand_as(t).to(t.dtype))
    return model


def mask_weights(model: nn.Module, layer: str, keep: torch.Tensor) -> nn.Module:
    """Hold the weights of ``layer`` where the flat ``keep`` is False at zero (torch.nn.utils.prune)."""
    from torch.nn.utils import prune as tprune

    module = model.get_submodule(layer)
    tprune.custom_from_mask(module, "weight", keep.to(torch.bool).reshape(module.weight.shape).to(module.weight.dtype))
    return model


def float64_loss(model: nn.Module, X, y, batch_size: int = 1024) -> float:
    """Mean cross-entropy of a float64 copy of ``model`` (pruning masks made permanent) over (X, y)."""
    from .prune import _plain_copy

    m = _plain_copy(model).double().eval()
    total = 0.0
    with torch.no_grad():
        for xb, yb in _batches(X.double(), y, batch_size):
            total += float(F.cross_entropy(m(xb), yb, reduction="sum"))
    return total / X.shape[0]


class Float64Suffix:
    """``float64_loss`` of masked copies of one ``nn.Sequential`` whose children before ``start`` are
    never masked: their float64 output over X is computed once, each call runs the rest in float64
    (the same numbers as float64_loss, without the shared prefix's cost)."""

    def __init__(self, model: nn.Sequential, start: str, X, y):
        names = [n for n, _ in model.named_children()]
        self.i, self.y, self.n = names.index(start), y, X.shape[0]
        prefix = copy.deepcopy(nn.Sequential(*list(model.children())[:self.i])).double().eval()
        with torch.no_grad():
            self.h = prefix(X.double())

    def __call__(self, model: nn.Sequential) -> float:
        from .prune import _plain_copy

        suffix = nn.Sequential(*list(_plain_copy(model).double().eval().children())[self.i:])
        with torch.no_grad():
            return float(F.cross_entropy(suffix(self.h), self.y, reduction="sum")) / self.n

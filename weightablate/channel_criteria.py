"""Channel-level pruning criteria, one value per unit of a structured result, to rank against the
exact effect of removing the unit (``ablate(..., structure="out"|"branch"|"in")``).

A unit's parameters ``theta_k``: for "out"/"branch" row/filter k of the weight, bias k and, when a
BatchNorm follows the channel on its own (the structured chain), its gamma_k and beta_k (zeroing all
of them zeroes the channel after the BatchNorm, which is what removing the channel does); for "in"
column / input channel k of the weight. ``g`` and ``H``: gradient and Hessian of the cross-entropy
SUMMED over the data (the loss whose change is ``delta_loss``).

==========  ===========================================================  ======================
criterion   score of unit k                                              sign convention
==========  ===========================================================  ======================
l1          ``sum |W_k|`` (filter / row L1 norm; "in": the column's)     importance, >= 0
l2          ``||W_k||_2``                                                importance, >= 0
bn_gamma    ``|gamma_k|`` of the BatchNorm after the channel ("out")     importance, >= 0
taylor      ``-g . theta_k``: first-order estimate of delta_loss         signed estimate
            (Molchanov et al. 2019 rank by its square)
hessian     ``-g . theta_k + theta_k' H theta_k / 2``: second-order      signed estimate
            estimate with the unit's whole Hessian block (cross terms
            inside the unit included; one Hessian-vector product per
            unit and batch, so at most ``hessian_max_units`` units)
==========  ===========================================================  ======================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import batches

CHANNEL_NAMES = ("l1", "l2", "bn_gamma", "taylor", "hessian")
SIGNED = ("taylor", "hessian")
HESSIAN_MAX_UNITS = 256


def following_batchnorm(model: nn.Module, name: str, x: torch.Tensor):
    """The BatchNorm that follows layer ``name``'s channels on their own (weightablate.structured's
    chain), or None."""
    from .graph import capture_values, trace
    from .structured import channel_chain

    target = model.get_submodule(name)
    graph = trace(model, name, target, "weight", x[:2])
    chain = channel_chain(graph, capture_values(graph, x[:2]))
    mods = dict(graph.module.named_modules())
    for n in chain[1:]:
        if n.op == "call_module" and isinstance(mods[n.target], nn.modules.batchnorm._BatchNorm):
            return mods[n.target]
    return None


def _unit_views(params, structure, target):
    """Each parameter as (units, -1): rows for "out"; the weight's input columns for "in"."""
    if structure != "in":
        return [p.reshape(p.shape[0], -1) for p in params]
    w = params[0]
    return [w.transpose(0, 1).reshape(w.shape[1], -1)]


def channel_compute(model: nn.Module, layer: str, data, structure: str = "out", *, batch_size=None,
                    hessian_max_units: int = HESSIAN_MAX_UNITS):
    """``(scores, skipped)``: ``{name: float64 (units,) CPU}`` for every unit of ``layer`` and the
    criteria left out with the reason. The model is not changed (eval mode during the pass; modes,
    ``requires_grad`` and ``.grad`` restored)."""
    from .api import _resolve_layer

    layer, target = _resolve_layer(model, layer)
    W = target.weight.detach().double()
    skipped, scores = {}, {}
    if structure == "in" and isinstance(target, nn.Conv2d) and target.groups > 1:
        return {}, {n: f"input channels of a grouped convolution (groups={target.groups})" for n in CHANNEL_NAMES}
    rows = W.reshape(W.shape[0], -1) if structure != "in" else W.transpose(0, 1).reshape(W.shape[1], -1)
    scores["l1"], scores["l2"] = rows.abs().sum(1), rows.norm(dim=1)
    xs = list(batches(data, batch_size, W.device, target.weight.dtype))
    bn = None
    if structure == "in":
        skipped["bn_gamma"] = "input units: no BatchNorm channel of their own"
    else:
        try:
            bn = following_batchnorm(model, layer, xs[0][0])
        except (ValueError, TypeError) as exc:
            skipped["bn_gamma"] = f"the channel's chain could not be traced: {exc}"
        if bn is None and "bn_gamma" not in skipped:
            skipped["bn_gamma"] = f"no BatchNorm follows the channels of {layer!r}"
        elif bn is not None:
            scores["bn_gamma"] = bn.weight.detach().double().abs()
    params = [target.weight] + ([target.bias] if target.bias is not None and structure != "in" else [])
    if bn is not None:
        params += [bn.weight, bn.bias]
    units = rows.shape[0]
    want_h = units <= hessian_max_units
    if not want_h:
        skipped["hessian"] = f"{units} units > hessian_max_units={hessian_max_units} (one Hessian-vector product each)"
    g_dot, curv = _taylor_pass(model, params, structure, target, xs, want_h)
    scores["taylor"] = -g_dot
    if want_h:
        scores["hessian"] = -g_dot + 0.5 * curv
    return {k: v.cpu() for k, v in scores.items()}, skipped


def _taylor_pass(model, params, structure, target, xs, want_h):
    """Per unit: g . theta_k and theta_k' H theta_k (None without want_h), float64."""
    training = {m: m.training for m in model.modules()}
    flags = [p.requires_grad for p in params]
    model.eval()
    theta = _unit_views([p.detach().double() for p in params], structure, target)
    units = theta[0].shape[0]
    g_dot = torch.zeros(units, dtype=torch.float64, device=theta[0].device)
    curv = torch.zeros_like(g_dot) if want_h else None
    try:
        for p in params:
            p.requires_grad_(True)
        for x, y in xs:
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).double(), y, reduction="sum")
                grads = torch.autograd.grad(loss, params, create_graph=want_h)
                gv = _unit_views(grads, structure, target)
                g_dot += sum((g.detach().double() * t).sum(1) for g, t in zip(gv, theta))
                for k in range(units) if want_h else ():
                    s = sum((g[k] * t[k].to(g.dtype)).sum() for g, t in zip(gv, theta))
                    hv = _unit_views(torch.autograd.grad(s, params, retain_graph=True), structure, target)
                    curv[k] += sum((h[k].double() * t[k]).sum() for h, t in zip(hv, theta))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, was in training.items():
            m.training = was
    return g_dot, curv

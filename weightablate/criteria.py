"""Common pruning criteria, per weight of one layer, to score against the exact ``delta_loss``.

Every function returns a float64 tensor shaped like ``layer.weight``, on the weight's device,
and never changes the model (it runs in eval mode; the modes are restored, the weights and their
``.grad`` are left as they were). The data-dependent ones make ONE pass over ``data``.

=============  ===========================================  =================================
criterion      score of ``W[i, j]``                         sign convention
=============  ===========================================  =================================
magnitude      ``|W_ij|``                                   importance, >= 0
squared        ``W_ij**2``                                  importance, >= 0
wanda          ``|W_ij| * ||a_j||_2``                        importance, >= 0
taylor         ``|g_ij * W_ij|``  (first-order Taylor/SNIP)  importance, >= 0
obd            ``0.5 * h_ij * W_ij**2``  (Optimal Brain      importance, >= 0 for ReLU-family
               Damage)                                      heads and the logits layer
taylor2        ``-g_ij * W_ij + 0.5 * h_ij * W_ij**2``       signed estimate of delta_loss
sparsegpt      ``W_ij**2 / [H^-1]_jj``, ``H = X^T X + lam I``  importance, >= 0
               (SparseGPT / Optimal Brain Surgeon)
=============  ===========================================  =================================

* ``a_j``: the layer's input feature ``j`` over all samples (``||a_j||_2 = sqrt(sum_n a_nj^2)``);
  for a Conv2d, the im2col feature ``(c, p, q)`` over all samples and output positions.
* ``X``: the layer's inputs, one row per sample (per token for inputs (N, T, F): Wanda's norm and
  SparseGPT's ``X^T X`` run over all tokens); ``lam = 0.01 * mean(diag(X^T X))`` as in SparseGPT.
  sparsegpt is the layer-wise reconstruction error of Optimal Brain Surgeon (no loss involved);
  nn.Linear layers only.
* For per-token logits (N, T, V) the loss ``L`` sums the cross-entropy over the tokens whose label
  is not -100, as ``ablate`` does.
* ``g = dL/dW`` and ``h_ij = d^2 L / dW_ij^2`` (the EXACT diagonal of the Hessian), with ``L`` the
  cross-entropy SUMMED over the dataset, the same loss whose change ``weightablate.ablate`` reports
  as ``delta_loss``. Zeroing ``W_ij`` moves it by ``-W_ij``, so the second-order Taylor estimate of
  ``delta_loss`` is ``taylor2 = -g W + h W^2 / 2`` (positive: the weight helps), in the same units.
* ``h`` comes from the closed form of ``weightablate.plan``: for a Linear target followed by
  element-wise modules ``s`` and the final Linear ``V`` (or the target producing the logits),
  ``h_ij = sum_n a_nj^2 (s'(z_ni)^2 Var_{p_n}(V[:, i]) + s''(z_ni) (E_{p_n} V[:, i] - V[y_n, i]))``.
  ``s'' = 0`` almost everywhere for the ReLU family, so there ``h >= 0`` and ``obd >= 0``; with a
  smooth activation (tanh, GELU, ...) the curvature term can make ``h``, and ``obd``, negative.
  ``s'`` at a kink follows autograd's convention (ReLU'(0) = 0). Models outside the closed form
  raise ValueError for ``obd``/``taylor2``; ``taylor`` then falls back to autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import _check_model, _resolve_layer
from .capture import capture
from .data import batches
from .plan import closed_form_head
from .tokens import flat_tokens

from .channel_criteria import CHANNEL_NAMES, channel_compute  # noqa: E402,F401  (one value per unit)

NAMES = ("magnitude", "squared", "wanda", "taylor", "obd", "taylor2", "sparsegpt")
IMPORTANCE = ("magnitude", "squared", "wanda", "taylor", "obd", "sparsegpt")  # larger = more important, >= 0
SIGNED = ("taylor2",)  # a signed estimate of delta_loss
_NEEDS = {"magnitude": set(), "squared": set(), "wanda": {"act"}, "taylor": {"grad"}, "obd": {"hess"},
          "taylor2": {"grad", "hess"}, "sparsegpt": {"xtx"}}
SPARSEGPT_DAMP = 0.01  # SparseGPT's dampening: 1% of the mean diagonal of X^T X


def _weight(layer) -> torch.Tensor:
    if isinstance(layer, torch.Tensor):
        return layer.detach()
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"layer must be a module with a .weight tensor (or the tensor), got {type(layer).__name__}")
    return w.detach()


def magnitude(layer) -> torch.Tensor:
    """``|W|`` in float64 (``layer``: a module with ``.weight``, or the weight tensor)."""
    return _weight(layer).double().abs()


def squared(layer) -> torch.Tensor:
    """``W**2`` in float64."""
    w = _weight(layer).double()
    return w * w


def wanda(model: nn.Module, layer, data, *, batch_size: int | None = None) -> torch.Tensor:
    """``|W_ij| * ||a_j||_2``: the L2 norm over all samples of the layer's input feature ``j``
    (Wanda, Sun et al. 2023). Linear and Conv2d layers; one forward pass over ``data``."""
    return compute(model, layer, data, ("wanda",), batch_size=batch_size)["wanda"]


def taylor(model: nn.Module, layer, data, *, batch_size: int | None = None) -> torch.Tensor:
    """``|g * W|`` with ``g`` the gradient of the summed cross-entropy over ``data`` (first-order
    Taylor / SNIP). Closed form for the heads ``ablate`` handles, autograd for any other model."""
    return compute(model, layer, data, ("taylor",), batch_size=batch_size)["taylor"]


def obd(model: nn.Module, layer, data, *, batch_size: int | None = None) -> torch.Tensor:
    """``0.5 * h * W**2`` with ``h`` the exact Hessian diagonal of the summed cross-entropy
    (Optimal Brain Damage). Needs a closed-form head (ValueError otherwise)."""
    return compute(model, layer, data, ("obd",), batch_size=batch_size)["obd"]


def taylor2(model: nn.Module, layer, data, *, batch_size: int | None = None) -> torch.Tensor:
    """``-g * W + 0.5 * h * W**2``: the signed second-order estimate of ``delta_loss`` (same units:
    the change of the summed cross-entropy when ``W_ij`` is zeroed). Needs a closed-form head."""
    return compute(model, layer, data, ("taylor2",), batch_size=batch_size)["taylor2"]


def compute(model: nn.Module, layer, data, names=NAMES, *, batch_size: int | None = None,
            strict: bool = True) -> dict:
    """Several criteria from ONE pass over ``data``: ``{name: float64 tensor like layer.weight}``.

    ``strict=False`` leaves out (instead of raising ValueError) the criteria the model does not
    allow (``obd``/``taylor2`` without a closed-form head, ``wanda`` on an unsupported layer).
    """
    scores, _ = _compute(model, layer, data, names, batch_size=batch_size, strict=strict)
    return scores


def _compute(model, layer, data, names=NAMES, *, batch_size=None, strict=True):
    """(scores, skipped): skipped maps a left-out criterion to the reason."""
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise ValueError(f"criteria must be a non-empty subset of {NAMES}, got {names!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, target = _resolve_layer(model, layer)
    if isinstance(target, nn.MultiheadAttention):
        raise TypeError(f"layer {name!r} is an nn.MultiheadAttention: the criteria read a Linear's or a Conv2d's "
                        "weight; ablate() scores its in_proj_weight exactly, criteria for it are not built (write q, "
                        "k, v as nn.Linear layers to compare criteria there)")
    if not isinstance(getattr(target, "weight", None), torch.Tensor):
        raise TypeError(f"layer {name!r} ({type(target).__name__}) has no weight tensor")
    skipped = {}
    if "wanda" in names and not isinstance(target, (nn.Linear, nn.Conv2d)):
        reason = f"wanda needs an nn.Linear or nn.Conv2d layer, {name!r} is a {type(target).__name__}"
        if strict:
            raise ValueError(reason)
        skipped["wanda"] = reason
    if "sparsegpt" in names and not isinstance(target, nn.Linear):
        reason = f"sparsegpt needs an nn.Linear layer, {name!r} is a {type(target).__name__}"
        if strict:
            raise ValueError(reason)
        skipped["sparsegpt"] = reason
    names = tuple(n for n in names if n not in skipped)
    need = set().union(*(_NEEDS[n] for n in names))
    stats = _one_pass(model, name, target, data, need, batch_size, strict) if need else {}
    if "hess" in need and "h" not in stats:  # strict=False and no closed form
        for n in names:
            if "hess" in _NEEDS[n]:
                skipped[n] = stats["hess_error"]
        names = tuple(n for n in names if n not in skipped)
    w = target.weight.detach().double()
    out = {}
    for n in names:
        if n == "magnitude":
            out[n] = w.abs()
        elif n == "squared":
            out[n] = w * w
        elif n == "wanda":
            out[n] = w.abs() * stats["act_norm"]
        elif n == "taylor":
            out[n] = (stats["g"] * w).abs()
        elif n == "obd":
            out[n] = 0.5 * stats["h"] * w * w
        elif n == "taylor2":
            out[n] = -stats["g"] * w + 0.5 * stats["h"] * w * w
        elif n == "sparsegpt":
            out[n] = sparsegpt_scores(w, stats["xtx"])
    return out, skipped


def sparsegpt_scores(w: torch.Tensor, xtx: torch.Tensor, damp: float = SPARSEGPT_DAMP) -> torch.Tensor:
    """SparseGPT/OBS saliency ``w_ij^2 / [H^-1]_jj`` with ``H = X^T X + damp * mean(diag(X^T X)) I``
    (float64; Cholesky inverse, H is symmetric positive definite once dampened)."""
    H = xtx.double().clone()
    lam = damp * H.diagonal().mean()
    H.diagonal().add_(lam if lam > 0 else 1.0)  # an all-zero input: any positive damping
    hinv_diag = torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal()
    return w.double() ** 2 / hinv_diag[None, :]


def sparsegpt(model: nn.Module, layer, data, *, batch_size: int | None = None) -> torch.Tensor:
    """``W_ij**2 / [H^-1]_jj`` with ``H = X^T X + 0.01 mean(diag(X^T X)) I`` over all samples (and
    tokens) of the layer's input (SparseGPT, Frantar & Alistarh 2023; Optimal Brain Surgeon's
    saliency). nn.Linear layers; one forward pass over ``data``."""
    return compute(model, layer, data, ("sparsegpt",), batch_size=batch_size)["sparsegpt"]


# --- the pass ---------------------------------------------------------------------------------

def _one_pass(model, name, target, data, need, batch_size, strict):
    device = _check_model(model, None)
    dtype = target.weight.dtype
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        acc = _Accumulator(target, need)
        mode = "closed" if ("grad" in need or "hess" in need) and isinstance(target, nn.Linear) else "hooks"
        if "hess" in need and not isinstance(target, nn.Linear):
            mode = _no_closed_form(acc, need, strict,
                                   f"layer {name!r} is a {type(target).__name__}: the exact Hessian diagonal "
                                   "(obd, taylor2) is computed only for nn.Linear layers")
        head = None
        for x, y in batches(data, batch_size, device, dtype):
            if mode == "closed":
                try:
                    if head is None:
                        head = closed_form_head(model, name, target, x[:2])
                    cap = capture(model, target, name, x)
                    if cap.a.dim() != 2:
                        raise ValueError(f"the layer's input {tuple(cap.a.shape)} has tokens")
                except ValueError as exc:
                    if head is not None:
                        raise
                    mode = _no_closed_form(acc, need, strict, "obd and taylor2 need the exact Hessian diagonal, "
                                           f"known in closed form only where weightablate.ablate has one: {exc}")
                else:
                    acc.closed_form(head, cap, y)
                    continue
            acc.hooked(model, target, x, y)
    finally:
        for m, was_training in training.items():
            m.training = was_training
    return acc.result()


def _no_closed_form(acc, need, strict, reason):
    if "hess" in need and strict:
        raise ValueError(reason)
    acc.need.discard("hess")
    acc.hess_error = reason
    return "hooks"


class _Accumulator:
    """float64 sums over the batches: squared input features, gradient, Hessian diagonal."""

    def __init__(self, target: nn.Module, need: set):
        self.target, self.need = target, set(need)
        self.hess_error = None
        shape, dev = target.weight.shape, target.weight.device
        self.g = torch.zeros(shape, dtype=torch.float64, device=dev) if "grad" in need else None
        self.h = torch.zeros(shape, dtype=torch.float64, device=dev) if "hess" in need else None
        self.act2 = None  # sum over samples (and positions) of the squared input features
        self.xtx = None  # sparsegpt: X^T X of the layer's input (J, J)

    def _add_act(self, a2: torch.Tensor):
        self.act2 = a2 if self.act2 is None else self.act2 + a2

    def closed_form(self, head, cap, y):
        a = cap.a.double()
        z = cap.z.double()
        logp = F.log_softmax(cap.logits.double(), 1)
        p = logp.exp()
        if head.kind == "logits":
            fp, fpp = None, None
            m1, vy = p, F.one_hot(y, p.shape[1]).double()
            var = p * (1 - p)
        else:
            rows = head.rows()  # (I, C) float64: each unit's logit direction
            fp, fpp = _unit_derivatives(head, z)
            vy = rows.t()[y]  # (N, I): V[y_n, i]
            center = rows.mean(1)  # shift by a per-unit constant: the variance without cancellation
            rc = rows - center[:, None]
            mc = p @ rc.t()
            m1 = mc + center
            var = (p @ (rc * rc).t() - mc * mc).clamp_min_(0)
        r = m1 - vy  # dL_n / d(unit i's output)
        a2 = a * a
        if "grad" in self.need:
            delta = r if fp is None else fp * r  # dL_n / dz_ni
            self.g += delta.t() @ a
        if "hess" in self.need:
            kappa = var if fp is None else fp * fp * var
            if fpp is not None:
                kappa = kappa + fpp * r
            self.h += kappa.t() @ a2
        if "act" in self.need:
            self._add_act(a2.sum(0))
        if "xtx" in self.need:
            self._add_xtx(a)

    def _add_xtx(self, a: torch.Tensor):
        """X^T X over every sample (and token) of the layer's input, float64."""
        x = a.double().reshape(-1, a.shape[-1])
        self.xtx = x.t() @ x if self.xtx is None else self.xtx + x.t() @ x

    def hooked(self, model, target, x, y):
        """A forward (with autograd when the gradient is needed) with a hook on the target's input."""
        seen = {}

        def hook(module, args, output):
            if "a" in seen:
                raise ValueError("the layer runs more than once per forward pass (shared weights)")
            seen["a"] = args[0].detach()
            seen["w"] = module.weight  # the tensor the forward used (torch.nn.utils.prune recomputes it)

        weight = target.weight
        want_grad = "grad" in self.need
        leaf = weight.is_leaf
        was = weight.requires_grad
        handle = target.register_forward_hook(hook)
        try:
            if want_grad:
                if leaf:
                    weight.requires_grad_(True)
                with torch.enable_grad():
                    out = model(x)
                    _check_logits(out)
                    out, y = flat_tokens(out, y)  # per-token logits: the tokens that count
                    if "w" in seen and not seen["w"].requires_grad:
                        raise ValueError("the layer's weight is computed from parameters that do not require "
                                         "grad (a frozen, pruned weight?): the gradient is not available")
                    loss = F.cross_entropy(out.double(), y, reduction="sum")
                    try:
                        (g,) = torch.autograd.grad(loss, seen.get("w", weight))
                    except RuntimeError as exc:  # e.g. an in-place residual add (x += ...) autograd refuses
                        raise ValueError("taylor needs the gradient and autograd cannot compute it on this model: "
                                         f"{str(exc).splitlines()[0]}") from None
                self.g += g.double()
            else:
                with torch.no_grad():
                    _check_logits(model(x))
        finally:
            handle.remove()
            if leaf:
                weight.requires_grad_(was)
        if "a" not in seen:
            raise ValueError("the layer did not run in the model's forward pass")
        if "act" in self.need:
            self._add_act(_input_sq_sums(target, seen["a"].double()))
        if "xtx" in self.need:
            self._add_xtx(seen["a"])

    def result(self) -> dict:
        out = {"hess_error": self.hess_error}
        if self.g is not None:
            out["g"] = self.g
        if self.h is not None and "hess" in self.need:
            out["h"] = self.h
        if "act" in self.need:
            out["act_norm"] = _expand_act(self.target, self.act2.sqrt())
        if "xtx" in self.need:
            out["xtx"] = self.xtx
        return out


def _check_logits(out):
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
        raise ValueError("model: forward must return a logits tensor (N, C) (or (N, T, V) per token)")


def _unit_derivatives(head, z):
    """(s'(z), s''(z)) of each unit's element-wise map up to the final Linear; s'' None when 0."""
    if head.kind == "piecewise":
        u = head.gain * z + head.shift
        return head.gain * torch.where(u > 0, torch.ones_like(u), head.slope.expand_as(u)), None
    zz = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        u = zz
        for step in head.steps:  # the same maps as Head.deltas
            if step[0] == "affine":
                u = step[1] * u + step[2]
            elif step[0] == "leaky":
                u = torch.where(u > 0, u, step[1] * u)
            else:
                u = step[1](u)
        if not u.requires_grad:
            return torch.ones_like(z), None
        (fp,) = torch.autograd.grad(u.sum(), zz, create_graph=True)
        if not fp.requires_grad:
            return fp.detach(), None
        (fpp,) = torch.autograd.grad(fp.sum(), zz, allow_unused=True)
    return fp.detach(), (None if fpp is None else fpp.detach())


def _input_sq_sums(target, a):
    """Sum over samples (and positions) of each input feature squared: (J,) or (C*kh*kw,)."""
    if isinstance(target, nn.Linear):
        return (a * a).reshape(-1, a.shape[-1]).sum(0)
    # Conv2d: im2col features (c, p, q); padding as the layer does it (squaring commutes with padding)
    a2 = a * a
    if a2.dim() == 3:
        a2 = a2.unsqueeze(0)
    pad = target._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if target.padding_mode == "zeros" else target.padding_mode
        a2 = F.pad(a2, pad, mode=mode)
    cols = F.unfold(a2, target.kernel_size, dilation=target.dilation, padding=0, stride=target.stride)
    return cols.sum((0, 2))


def _expand_act(target, norm):
    """Broadcast the per-feature norms to the weight's shape."""
    if isinstance(target, nn.Linear):
        return norm[None, :].expand_as(target.weight).clone()
    o, cg, kh, kw = target.weight.shape
    g = target.groups
    per_group = norm.reshape(g, 1, cg, kh, kw).expand(g, o // g, cg, kh, kw)
    return per_group.reshape(o, cg, kh, kw).clone()

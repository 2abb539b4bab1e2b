"""Torch-Pruning importance objects: ``imp(group)`` gives one float64 score per channel of the
group's root (in the order of the root's indices), higher = more important = pruned later.

``ExactChannelImportance`` (alias ``ChannelImportance``): the EXACT loss change of removing
channel k from the whole group, as Torch-Pruning's ``group.prune()`` does physically:
``sum_n CE_n(model with channel k of the group removed) - CE_n(model)`` over ``data``.
Removing a channel from a group is the same as zeroing input channel k of every layer the group
prunes on its inputs (its consumers): nothing else of the pruned model changes. Two methods:

* the group is one Conv2d/Linear (the root) with per-channel layers after it (BatchNorm,
  activations, pooling, flatten) and its consumers: ``ablate(..., structure="out")`` (closed form or
  funnel, as fast as single weights);
* otherwise (a residual stream, a depthwise block, an SE gate): one forward per channel with the
  consumers' input channels zeroed, batched over channels ("replay").

``SummedWeightImportance``: the sum of the single-weight scores of the group's Conv2d/Linear weights
of each channel (``CHANNEL_SCORE_LABEL``: not the effect of removing the channel).

Torch-Pruning is not a dependency of the library (it is one of the tests): these classes read only
the group's items (``dep.target.module``, ``dep.target.type``, ``dep.handler``, ``idxs``,
``root_idxs``) and ``group._DG.is_out_channel_pruning_fn``.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .data import batches
from .model_copy import copy_model

EXACT_LABEL = ("exact: sum_n CE_n(channel k removed from every layer of its Torch-Pruning group) - CE_n(model) "
               "over data")
REPLAY_ROWS = 4096  # samples x channels per batched forward of the replay


class UnscorableGroupWarning(UserWarning):
    """A group the importance cannot score: Torch-Pruning leaves it unpruned."""


class UnscorableGroup(ValueError):
    """Raised by ``ExactChannelImportance.exact`` for a group it cannot score exactly."""


def _types():
    from torch_pruning.ops import OPTYPE

    passing = {OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.BN, OPTYPE.DEPTHWISE_CONV, OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE,
               OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.PRELU}
    return OPTYPE, passing


class GroupPlan:
    """What removing a channel of ``group`` changes: ``consumers`` ``{layer name: (K, width) bool}``
    (the input channels zeroed for each of the root's K channels) and whether the root alone is
    pruned on its outputs (``simple``: ``ablate(structure="out")`` gives the exact answer)."""

    def __init__(self, group, names: dict, outputs: set):
        OPTYPE, passing = _types()
        DG = group._DG
        root = group[0]
        self.root_module = root.dep.target.module
        self.root = names.get(id(self.root_module), root.dep.target.name)
        if not isinstance(self.root_module, (nn.Conv2d, nn.Linear)) or not DG.is_out_channel_pruning_fn(root.dep.handler):
            raise UnscorableGroup(f"the root {self.root!r} is not a Conv2d/Linear pruned on its outputs")
        self.channels = list(root.idxs)
        self.where = where = {r: i for i, r in enumerate(root.root_idxs if root.root_idxs is not None else root.idxs)}
        self.consumers, producers = {}, set()
        for item in group:
            dep, m, kind = item.dep, item.dep.target.module, item.dep.target.type
            label = names.get(id(m), dep.target.name)
            if kind not in passing:
                raise UnscorableGroup(f"{label!r} is a Torch-Pruning {kind.name} member (not a per-channel map, "
                                      "Conv2d or Linear): removing a channel there changes the others")
            if kind == OPTYPE.CONV and m.groups > 1:
                raise UnscorableGroup(f"{label!r} is a grouped convolution (groups={m.groups}): Torch-Pruning "
                                      "prunes it in every group at once")
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            if any(r is None or r not in where for r in roots):
                raise UnscorableGroup(f"{label!r}: indices that do not map back to a channel of {self.root!r}")
            if DG.is_out_channel_pruning_fn(dep.handler):
                if kind in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.PRELU):
                    if id(m) in outputs:
                        raise UnscorableGroup(f"{label!r} produces the model's output: removing its channel "
                                              "removes a logit (add it to ignored_layers)")
                    if kind != OPTYPE.BN and kind != OPTYPE.PRELU:
                        producers.add(id(m))
            elif kind in (OPTYPE.CONV, OPTYPE.LINEAR):
                width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                mask = self.consumers.setdefault(label, torch.zeros(len(where), width, dtype=torch.bool))
                mask[[where[r] for r in roots], list(item.idxs)] = True
        if not self.consumers:
            raise UnscorableGroup(f"no layer of the group of {self.root!r} reads the channels (nothing consumes them)")
        self.simple = producers == {id(self.root_module)}


def _output_modules(model: nn.Module, data) -> set:
    """ids of the modules whose output is the model's output (their channels are logits)."""
    x = next(iter(batches(data, 8, _device(model), _dtype(model))))[0][:2]
    seen, hooks = [], []
    for m in model.modules():
        hooks.append(m.register_forward_hook(lambda mod, args, out: seen.append((out, id(mod)))))
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return {mod for out, mod in seen if out is y}


def _device(model):
    return next(model.parameters()).device


def _dtype(model):
    return next(model.parameters()).dtype


def replay_delta_loss(model: nn.Module, consumers: dict, data, *, dtype=None, batch_size=None) -> torch.Tensor:
    """(K,) float64: ``sum_n CE_n - CE_n(model)`` with, for channel k, input channels ``mask[k]`` of
    every consumer layer zeroed (``consumers``: ``{name: (K, width) bool}``), by full forwards of a
    copy of the model in ``dtype`` (default the model's), batched over channels. The model is not touched."""
    run = copy_model(model, dtype or _dtype(model)).eval()
    mods = dict(run.named_modules())
    K = next(iter(consumers.values())).shape[0]
    keep = {}

    def pre_hook(name):
        def zero_inputs(module, args):
            if name not in keep:
                return None
            x, k = args[0], keep[name]
            xs = x.reshape(k.shape[0], -1, x.shape[1], x[0, 0].numel()) * k[:, None, :, None]
            return (xs.reshape(x.shape), *args[1:])
        return zero_inputs

    hooks = [mods[name].register_forward_pre_hook(pre_hook(name)) for name in consumers]
    total = torch.zeros(K, dtype=torch.float64)
    try:
        with torch.no_grad():
            for x, y in batches(data, batch_size, _device(model), _dtype(model)):
                x = x.to(_dtype(run)) if x.is_floating_point() else x
                keep.clear()
                ce0 = F.cross_entropy(run(x).double(), y, reduction="none")
                step = max(1, REPLAY_ROWS // x.shape[0])
                for s in range(0, K, step):
                    e = min(K, s + step)
                    for name, mask in consumers.items():
                        keep[name] = (~mask[s:e]).to(device=x.device, dtype=_dtype(run))
                    xr = x.repeat(e - s, *([1] * (x.dim() - 1)))
                    ce = F.cross_entropy(run(xr).double(), y.repeat(e - s), reduction="none")
                    total[s:e] += (ce.view(e - s, -1) - ce0).sum(1).cpu()
    finally:
        for h in hooks:
            h.remove()
    return total


class ExactChannelImportance:
    """Torch-Pruning importance: ``imp(group)`` -> float64 ``(len(group[0].idxs),)``, the exact
    ``delta_loss`` of removing each channel of the group's root from the whole group (see the
    module's docstring), made distinct by at most a few ulps so that Torch-Pruning's global mode
    (which prunes every channel at or below its threshold) prunes exactly the fraction asked even
    when channels tie (dead channels: exactly 0). Higher = keep. ``imp.exact(group)`` gives the
    scores untouched and raises ``UnscorableGroup`` where ``imp(group)`` warns.

    A group that cannot be scored exactly (a LayerNorm/GroupNorm member, a grouped convolution, a
    root that produces the logits, ...) gets ``None`` (Torch-Pruning leaves it unpruned) with an
    ``UnscorableGroupWarning`` naming the layer; ``imp.unscorable`` maps root layer -> reason.
    ``ablate_kwargs`` (precision, backend, batch_size, ...) go to ``ablate``; ``precision="float64"``
    also runs the replay in float64. ``imp.methods`` maps root layer -> "ablate" or "replay".
    """

    label = EXACT_LABEL

    def __init__(self, model: nn.Module, data, **ablate_kwargs):
        self.model, self.data, self.ablate_kwargs = model, data, ablate_kwargs
        self.unscorable: dict[str, str] = {}
        self.methods: dict[str, str] = {}
        self._issued: set[float] = set()
        self._outputs = None

    def reset(self) -> None:
        """Forget the scores handed out (the tie-break starts afresh) and the unscorable groups."""
        self._issued.clear()
        self.unscorable.clear()
        self.methods.clear()

    def plan(self, group) -> GroupPlan:
        if self._outputs is None:
            self._outputs = _output_modules(self.model, self.data)
        names = {id(m): n for n, m in self.model.named_modules()}
        return GroupPlan(group, names, self._outputs)

    def exact(self, group, channels=None) -> torch.Tensor:
        """The exact delta_loss of each root channel (float64, CPU, in the order of ``group[0].idxs``),
        or of the root channels ``channels`` only (a list of channel indices, in that order)."""
        from .api import ablate

        plan = self.plan(group)
        chosen = plan.channels if channels is None else [int(c) for c in channels]
        if any(c not in plan.where for c in chosen):
            raise ValueError(f"channels: {chosen} are not all channels of {plan.root!r}'s group "
                             f"(0..{max(plan.where)})")
        if plan.simple:
            kwargs = {"progress": False, **self.ablate_kwargs}
            try:
                res = ablate(self.model, plan.root, self.data, weights=torch.as_tensor(chosen, dtype=torch.long),
                             metrics=("loss",), structure="out", **kwargs)
            except (ValueError, TypeError) as exc:
                warnings.warn(f"ExactChannelImportance: {plan.root!r}: ablate could not score it ({exc}); "
                              "replaying instead", UnscorableGroupWarning, stacklevel=2)
            else:
                self.methods[plan.root] = "ablate"
                order = {int(u): i for i, u in enumerate(res.indices.reshape(-1).tolist())}
                return res.delta_loss.double().cpu()[[order[c] for c in chosen]]
        self.methods[plan.root] = "replay"
        dtype = torch.float64 if self.ablate_kwargs.get("precision") == "float64" else None
        rows = [plan.where[c] for c in chosen]
        return replay_delta_loss(self.model, {n: m[rows] for n, m in plan.consumers.items()}, self.data,
                                 dtype=dtype, batch_size=self.ablate_kwargs.get("batch_size"))

    def __call__(self, group, **_) -> torch.Tensor | None:
        try:
            scores = self.exact(group)
        except UnscorableGroup as exc:
            root = group[0].dep.target
            name = {id(m): n for n, m in self.model.named_modules()}.get(id(root.module), root.name)
            self.unscorable[name] = str(exc)
            warnings.warn(f"ExactChannelImportance: the group of {name!r} is not scored (Torch-Pruning leaves it "
                          f"unpruned): {exc}", UnscorableGroupWarning, stacklevel=2)
            return None
        return self._untie(scores)

    def _untie(self, scores: torch.Tensor) -> torch.Tensor:
        """Each score moved up by as few ulps as make it differ from every score handed out before."""
        out = scores.clone()
        for i, v in enumerate(out.tolist()):
            while v in self._issued:
                v = math.nextafter(v, math.inf)
            self._issued.add(v)
            out[i] = v
        return out


ChannelImportance = ExactChannelImportance


class SummedWeightImportance:
    """Torch-Pruning importance: ``imp(group)`` -> float64, per root channel the sum over the group's
    Conv2d/Linear members of their single-weight scores (``criterion``, "exact" by default) of the
    weights that channel removes (output filters/rows, input slices/columns; a Linear reading a
    flattened conv maps its columns back to the channel). ``label``: NOT the effect of removing the
    channel. Members the criterion cannot score are left out with an ``UnscorableGroupWarning``; a
    group with none gets ``None``. Scores are cached per layer until its weight changes."""

    def __init__(self, model: nn.Module, data, criterion="exact", **ablate_kwargs):
        from .prune import CHANNEL_SCORE_LABEL

        self.label = CHANNEL_SCORE_LABEL
        self.model, self.data, self.criterion, self.ablate_kwargs = model, data, criterion, ablate_kwargs
        self._cache: dict[tuple, torch.Tensor] = {}
        self.unscorable: dict[str, str] = {}

    def reset(self) -> None:
        self._cache.clear()
        self.unscorable.clear()

    def scores(self, module: nn.Module) -> torch.Tensor:
        from .prune import importance

        w = module.weight  # a replaced (structurally pruned) or updated weight is scored again
        key = (id(module), id(w), w._version, tuple(w.shape))
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != id(module)}
            self._cache[key] = importance(self.model, module, self.data, self.criterion, **self.ablate_kwargs)
        return self._cache[key]

    def _member(self, name, module, out: bool) -> torch.Tensor | None:
        """Per output (out) or input channel of ``module``: the sum of its weights' scores."""
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not out:
            self._skip(name, f"grouped convolution (groups={module.groups}): its input channels span filters")
            return None
        try:
            s = self.scores(module)
        except ValueError as exc:
            self._skip(name, str(exc))
            return None
        s = s if out else s.transpose(0, 1)
        return s.reshape(s.shape[0], -1).sum(1)

    def _skip(self, name, why):
        if name not in self.unscorable:
            self.unscorable[name] = why
            warnings.warn(f"SummedWeightImportance: {name!r} left out of its groups' scores: {why}",
                          UnscorableGroupWarning, stacklevel=3)

    def __call__(self, group, **_):
        names = {id(m): n for n, m in self.model.named_modules()}
        root = group[0]
        where = {r: i for i, r in enumerate(root.root_idxs if root.root_idxs is not None else root.idxs)}
        total, seen = torch.zeros(len(where), dtype=torch.float64), False
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            name = names.get(id(module), item.dep.target.name)
            per = self._member(name, module, group._DG.is_out_channel_pruning_fn(item.dep.handler))
            if per is None:
                continue
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            pos = torch.as_tensor([where[r] for r in roots], dtype=torch.long)
            total.index_add_(0, pos, per[torch.as_tensor(list(item.idxs), dtype=torch.long)])
            seen = True
        if not seen:
            warnings.warn(f"SummedWeightImportance: no member of the group of {names.get(id(root.dep.target.module))!r}"
                          " could be scored: Torch-Pruning leaves it unpruned", UnscorableGroupWarning, stacklevel=2)
            return None
        return total

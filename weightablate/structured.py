"""Structured ablation: a whole output unit/channel (structure="out") or a whole input
feature/channel (structure="in") of a Linear or Conv2d, scored exactly (README "Structured ablation").

"out", unit k: the channel is removed with everything that follows it per channel (bias, BatchNorm
channel, activation, pooling): every consumer of the channel sees zero from it. The per-channel
chain is walked on the traced graph from the target while each value has one user that maps each
channel on its own; its last node E is where the channel meets its consumers (the next
Linear/Conv, a residual add, the logits), and the change there is minus channel k of E's value.
    E is the final Linear's input  -> one scalar per sample, d_n = -E[n, k], scored with
                                      ops.score_deltas along the final Linear's column k
                                      ("closed_form" for a Linear target, "funnel" for a conv)
    E is the logits                -> d_n = -logits[n, k] along e_k ("closed_form")
    otherwise                      -> the change is replayed from E (weightablate.propagate): the
                                      funnel when it stays in channel k up to the final Linear,
                                      else "replay" to the logits.
"branch", unit k: as "out", where "out" refuses a channel that meets a residual add (the skip also
carries channel k there: removing it from this layer alone is not what a pruning library does, see
weightablate.tp_importance for the coupled group): the add sees zero from this branch's channel k.
"in", feature j: column j of a Linear's weight (input channel j of each filter of a Conv2d's group)
is zeroed in this layer only; the change of the layer's output is -W[:, j] a_j for every unit at
once (a grouped convolution of input channel j for a Conv2d), replayed to the logits ("replay").
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ops
from .capture import check_logits
from .closed_form import _moment_slots, _moments
from .funnel import funnel_plan
from .graph import capture_values, trace
from .plan import (ELEMENTWISE, ELEMENTWISE_FUNCS, ELEMENTWISE_METHOD_NAMES, IDENTITY, IDENTITY_METHODS, RELU_FUNCS,
                   logit_directions)
from .propagate import (ELEMENTWISE_METHODS, POOL_FUNCS, POOL_MODULES, Delta, Propagator, _pad, bn_gain,
                        max_numel)
from .replay import BYTES_PER_ENTRY, score_logit_deltas

STRUCTURES = ("weight", "out", "branch", "in")
OUT = ("out", "branch")  # whole output units
SCRATCH_PER_PAIR = 32  # bytes per (unit, sample) of the stage-2 kernels
CHECK_UNITS, CHECK_SAMPLES = 3, 4  # the self-check's units and samples

_CHANNEL_MODULES = (*IDENTITY, nn.ReLU, nn.LeakyReLU, nn.modules.batchnorm._BatchNorm, *ELEMENTWISE,
                    *POOL_MODULES, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_CHANNEL_FUNCS = RELU_FUNCS | ELEMENTWISE_FUNCS | POOL_FUNCS | {F.max_pool2d, F.adaptive_max_pool2d, torch.flatten}
_CHANNEL_METHODS = (IDENTITY_METHODS | ELEMENTWISE_METHODS | {"relu", "relu_", "flatten", "view", "reshape"}
                    | {m + tail for m in ELEMENTWISE_METHOD_NAMES for tail in ("", "_")})
_SCALAR_OPS = {operator.mul, operator.imul, operator.add, operator.iadd, operator.sub, operator.isub,
               operator.truediv, operator.itruediv, torch.mul, torch.add, torch.sub, torch.div,
               "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


def n_units(target: nn.Module, structure: str) -> int:
    """How many units ``structure`` indexes: output units/channels ("out"), input features/channels ("in")."""
    if structure in OUT:
        return target.weight.shape[0]
    return target.in_features if isinstance(target, nn.Linear) else target.in_channels


def unit_word(target: nn.Module, structure: str) -> str:
    """'output units', 'output channels', 'input features' or 'input channels'."""
    if structure in OUT:
        return "output units" if isinstance(target, nn.Linear) else "output channels"
    return "input features" if isinstance(target, nn.Linear) else "input channels"


def select_units(weights, target: nn.Module, structure: str, name: str, seed: int) -> torch.Tensor:
    """(K,) int64 unit indices: None = all, int K = K distinct units drawn with ``seed``, or indices."""
    from .selection import select_weights

    n = n_units(target, structure)
    if isinstance(weights, tuple):
        raise TypeError(f"weights: with structure={structure!r} it indexes {unit_word(target, structure)}: None, an "
                        "int K or a 1-D tensor of unit indices, not a (rows, cols) pair")
    if isinstance(weights, torch.Tensor) or isinstance(weights, (list, range)):
        t = torch.as_tensor(weights)
        if t.dim() == 1 and t.numel() and not t.dtype.is_floating_point and t.dtype != torch.bool \
                and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"weights: unit index out of range: layer {name!r} has {n} "
                             f"{unit_word(target, structure)} (valid indices 0..{n - 1})")
    if isinstance(weights, int) and not isinstance(weights, bool) and not 1 <= weights <= n:
        raise ValueError(f"weights={weights}: must be between 1 and the layer's {n} {unit_word(target, structure)}")
    return select_weights(weights, (n, 1), seed)


def channel_chain(graph, values: dict) -> list:
    """The target followed by the nodes that map its channels one by one, each the only user of the
    previous (and the previous its only changed input); the last node is where the channel meets
    its consumers."""
    dependent = set(graph.dependent)
    mods = dict(graph.module.named_modules())
    out = values[graph.target]
    N, C = out.shape[:2]
    chain = [graph.target]
    while chain[-1] is not graph.logits:
        cur = chain[-1]
        users = [u for u in cur.users if u in dependent]
        if len(users) != 1:
            break
        u = users[0]
        v = values.get(u)
        if u.all_input_nodes != [cur] or cur not in u.args or not isinstance(v, torch.Tensor) \
                or v.dim() < 2 or tuple(v.shape[:2]) != (N, C) or not _maps_channels(u, mods, values[cur], cur):
            break
        chain.append(u)
    return chain


def _numbers_only(n: fx.Node, cur: fx.Node) -> bool:
    """Every argument of ``n`` but ``cur`` is a number (or None, a bool): an element-wise map of cur."""
    rest = [a for a in list(n.args) + list(n.kwargs.values()) if a is not cur]
    return all(a is None or isinstance(a, (int, float, bool)) for a in rest)


def _maps_channels(n: fx.Node, mods: dict, before: torch.Tensor, cur: fx.Node) -> bool:
    """Whether node ``n`` maps each channel of its input ``cur`` on its own (the shape was checked):
    the same map spelled as a module, a function or a method, numbers on either side."""
    if n.op == "call_module":
        if isinstance(mods[n.target], nn.modules.batchnorm._BatchNorm):
            bn_gain(mods[n.target], n.target)  # batch statistics: samples not independent, a ValueError
        return isinstance(mods[n.target], _CHANNEL_MODULES) and not (n.args[1:] or n.kwargs) and (
            not isinstance(mods[n.target], nn.Flatten) or before[0].numel() == before.shape[1])
    f = n.target
    if f in (torch.flatten, "flatten", "view", "reshape"):
        return before[0].numel() == before.shape[1]  # one value per channel: the flatten keeps channel k at k
    if f in _SCALAR_OPS:  # h + 1, 1 - h, h.mul(2), torch.add(h, 1)
        return len(n.args) == 2 and not n.kwargs and _numbers_only(n, cur)
    if n.op == "call_function":
        return f in _CHANNEL_FUNCS and _numbers_only(n, cur)
    return n.op == "call_method" and f in _CHANNEL_METHODS and n.args[0] is cur and _numbers_only(n, cur)


_ADD_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub",
            "sub_"}


def _refuse_residual(name: str, end: fx.Node, users: list) -> None:
    """structure="out": a channel that meets another tensor in an add (a residual add, a skip) cannot
    be removed from this layer alone: the other operand carries channel k on."""
    for u in users:
        others = [a for a in u.all_input_nodes if a is not end]
        if u.target in _ADD_OPS and others:
            raise ValueError(
                f"structure='out': the output channels of layer {name!r} meet {others[0].name!r} in the add "
                f"{u.name!r} (a residual add): removing channel k from this layer alone is not what a pruning "
                "library does (Torch-Pruning removes it from every layer coupled through the add); for the "
                "coupled group use weightablate.prune.ExactChannelImportance, for this branch alone (the add sees "
                "zero from it, the skip keeps channel k) structure='branch'")


def _run_from(prop: Propagator, start, d: Delta, stop=None):
    """Propagator.run, starting from the change ``d`` of node ``start`` (every dependent node after
    it depends on the target only through it)."""
    g = prop.g
    env = {start: d}
    uses = g.user_count()
    after = g.dependent[g.dependent.index(start) + 1:]
    for n in after:
        if n is stop:
            return env.get(n.args[0])
        env[n] = prop.apply(n, env)
        for a in n.all_input_nodes:
            uses[a] -= 1
            if uses[a] == 0 and a in env and a is not g.logits:
                del env[a]
    if start is g.logits:
        return d.dense()
    return env[g.logits].dense()


class Structured:
    """A sweep method (prepare / chunk_size / score) for whole units of the target."""

    def __init__(self, model, name, target, structure, units, backend, mode, want_flips, by_class, graph=None,
                 x=None):
        """``graph``: the traced model (weightablate.graph.trace), traced here on the samples ``x`` when
        None. The method is planned on the first batch's values (``kind``, ``description`` are set by
        the first prepare)."""
        self.name, self.target, self.structure = name, target, structure
        self.backend, self.mode, self.want_flips, self.by_class = backend, mode, want_flips, by_class
        self.graph = graph if graph is not None else trace(model, name, target, "weight", x[:2])
        self.units = units.to(target.weight.device)
        self.prop = Propagator(self.graph, "weight", torch.promote_types(target.weight.dtype, torch.float32))
        self.values, self.per_sample, self.kind = None, 1, None

    def _plan(self, values: dict) -> None:
        graph, name, target, structure = self.graph, self.name, self.target, self.structure
        device = target.weight.device
        mods = dict(graph.module.named_modules())
        x = values[graph.target.args[0]] if graph.target.args else None
        if isinstance(target, nn.Linear) and (not isinstance(x, torch.Tensor) or x.dim() != 2):
            raise ValueError(f"layer {name!r}: structure={structure!r} needs (N, features) inputs to a Linear target")
        self.head_rows, self.final, self.scalar = None, None, False
        self.moment_slot = self.moments = None
        if structure == "in":
            self.end, self.kind = graph.target, "replay"
            self.description = (f"{unit_word(target, 'in')} of {name!r} zeroed in this layer only: the change of "
                                f"every unit replayed through the {len(graph.dependent) - 1} graph nodes after it")
            return
        chain = channel_chain(graph, values)
        self.end = end = chain[-1]
        where = (f"{'output unit' if isinstance(target, nn.Linear) else 'output channel'} k of {name!r} removed "
                 f"with {' -> '.join(n.name for n in chain[1:]) or 'nothing after it'}; its consumers see zero "
                 f"from it at {end.name!r}")
        users = [u for u in end.users if u in set(graph.dependent)]
        if structure == "out":
            _refuse_residual(name, end, users)
        logits = graph.logits
        if end is logits:
            self.kind, self.description = "closed_form", where + ": the logit itself becomes 0"
            self.scalar = True
        elif users == [logits] and logits.op == "call_module" and isinstance(mods[logits.target], nn.Linear) \
                and logits.args == (end,) and not logits.kwargs and values[end].dim() == 2:
            self.final = logits
            self.head_rows = logit_directions(mods[logits.target])
            self.kind = "closed_form" if isinstance(target, nn.Linear) else "funnel"
            self.scalar = True
            self.description = where + f": one scalar per sample along {logits.target!r}'s column k"
        else:
            final, why = funnel_plan(graph, values)
            if final is not None:
                self.final, self.kind = final, "funnel"
                self.head_rows = logit_directions(mods[final.target])
                self.description = where + f"; the change stays in channel k up to {final.target!r}"
            else:
                self.kind = "replay"
                self.description = where + f"; replayed from there to the logits (not the funnel: {why})"
        self.moment_slot = None
        if self.head_rows is not None:
            # every unit is scored on every sample: the D moment GEMMs pay off from one entry per unit
            self.moment_slot = _moment_slots(self.units, *self.head_rows.shape, self.backend, self.mode, device,
                                             min_weights=1)
        self.moments = None

    # --- the sweep's method interface ----------------------------------------------------------
    def prepare(self, x, y) -> torch.Tensor:
        values = capture_values(self.graph, x)
        logits = check_logits(values[self.graph.logits])
        if self.kind is None:
            self._plan(values)
        self.prop.set_batch(values)
        self.values = values
        self.per_sample = max(self.per_sample, max_numel(values, self.graph.dependent))
        self.moments = None
        return logits

    def chunk_size(self, n: int, max_memory: int) -> int:
        if self.scalar:
            return max(1, max_memory // (4 * SCRATCH_PER_PAIR * max(n, 1)))
        return max(1, max_memory // (BYTES_PER_ENTRY * self.per_sample * max(n, 1)))

    def score(self, batch, sl: slice):
        units = self.units[sl]
        if self.structure == "in":
            dl = self.prop.run(self.in_delta(units)).double()
            return score_logit_deltas(dl, batch, self.want_flips, self.by_class)
        if self.scalar:
            d = -self.values[self.end][:, units].t().double().contiguous()
        else:
            delta = _run_from(self.prop, self.end, self.out_delta(units), stop=self.final)
            if self.final is None:
                return score_logit_deltas(delta.double(), batch, self.want_flips, self.by_class)
            if delta.idx is None or delta.t.dim() != 3 or delta.t.shape[2] != 1:
                raise RuntimeError("structured funnel: the change did not stay in one channel (a bug: please report)")
            d = delta.t[:, :, 0].double().contiguous()
        if self.head_rows is not None and self.moments is None and self.moment_slot is not None:
            self.moments = _moments(self.head_rows, self.moment_slot, batch.probs)
        slot = self.moment_slot if self.moments is not None else None
        return ops.score_deltas(self.backend, d, units, self.head_rows, batch.probs, batch.logits, batch.labels,
                                self.moments, slot, self.want_flips, self.by_class)

    # --- the changes ---------------------------------------------------------------------------
    def out_delta(self, units: torch.Tensor) -> Delta:
        """Minus channel k of E's value, as a one-channel block per unit: (K, N, 1, *rest)."""
        v = self.prop.base(self.end)
        t = -v[:, units].transpose(0, 1).unsqueeze(2)
        return Delta(t, units, v.shape[1])

    def in_delta(self, js: torch.Tensor) -> Delta:
        """The change of the target's output when input feature/channel j is zeroed in its weight."""
        m = self.target
        W = self.prop.weight64(m)
        x = self.prop.base(self.graph.target.args[0])
        K, N = js.numel(), x.shape[0]
        if isinstance(m, nn.Linear):  # -W[i, j] a_nj for every unit i: (K, N, O)
            return Delta(-(x[:, js].t()[:, :, None] * W[:, js].t()[:, None, :]), None, W.shape[0])
        O, Cg, kh, kw = W.shape
        G = m.groups
        Og = O // G
        g, c = js // Cg, js % Cg
        inp = _pad(m, x)[:, js]  # (N, K, Hp, Wp): input channel j of each ablation
        Wk = W.reshape(G, Og, Cg, kh, kw)[g, :, c]  # (K, Og, kh, kw): the filters' slices that read it
        out = F.conv2d(inp, Wk.reshape(K * Og, 1, kh, kw), None, m.stride, 0, m.dilation, K)
        out = -out.reshape(N, K, Og, *out.shape[2:]).transpose(0, 1)
        return Delta(out, g if G > 1 else None, O)


# --- the float64 reference: a full forward per unit ----------------------------------------------
class _Removed(fx.Interpreter):
    """The traced model with unit ``k`` removed: channel k of node ``end`` zeroed ("out"), or input
    feature k zeroed in the target's weight ("in"); the model's own weights are not touched."""

    def __init__(self, graph, target, structure, end):
        super().__init__(graph.module)
        self.g, self.target, self.structure, self.end, self.k = graph, target, structure, end, None

    def run_node(self, n):
        if self.structure == "in" and n is self.g.target:
            m, x = self.target, self.env[n.args[0]]
            W = m.weight.detach().clone()
            if isinstance(m, nn.Linear):
                W[:, self.k] = 0
                return F.linear(x, W, m.bias)
            Cg = W.shape[1]
            Og = W.shape[0] // m.groups
            g = self.k // Cg
            W[g * Og:(g + 1) * Og, self.k % Cg] = 0
            return m._conv_forward(x, W, m.bias)
        out = super().run_node(n)
        if self.structure in OUT and n is self.end:
            out = out.clone()
            out[:, self.k] = 0
        return out


class _Keep(fx.Interpreter):
    """A forward that keeps a copy of every node's value."""

    def run_node(self, n):
        out = super().run_node(n)
        self.kept[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def naive_structured(model, name, target, structure, units, x, y, end_name=None) -> dict:
    """Per unit: delta_loss, delta_kl (float64) and flips from a forward of the traced model with the
    unit removed, the losses subtracted per sample (the self-check's reference). The nodes that do
    not depend on the layer keep their values from the base forward (the same numbers); every node
    after it is evaluated again. ``end_name``: the node where the channel meets its consumers
    ("out"; found from the chain when None)."""
    graph = trace(model, name, target, "weight", x[:2])
    end = graph.target
    if structure in OUT:
        found = [n for n in graph.nodes if n.name == end_name]
        end = found[0] if found else channel_chain(graph, capture_values(graph, x[:2]))[-1]
    dependent = set(graph.dependent)
    with torch.no_grad():
        keep = _Keep(graph.module)
        keep.kept = {}
        base = keep.run(x)
        prefix = {n: v for n, v in keep.kept.items() if n not in dependent and n.op != "output"}
        read = {a for n in graph.nodes if n in dependent or n.op == "output" for a in n.all_input_nodes}
        ce0 = F.cross_entropy(base, y, reduction="none")
        logp0 = F.log_softmax(base, 1)
        interp = _Removed(graph, target, structure, end)
        out = {"delta_loss": [], "delta_kl": [], "abs_sum": [], "round": [], "flips": []}
        eps = torch.finfo(base.dtype).eps
        for k in units.tolist():
            interp.k = k
            # a fresh copy of what the later nodes read (an in-place op there must not touch the base)
            env = {n: v.clone() if n in read and isinstance(v, torch.Tensor) else v for n, v in prefix.items()}
            logits = interp.run(x, initial_env=env)
            ce = F.cross_entropy(logits, y, reduction="none")
            out["delta_loss"].append((ce - ce0).sum().item())
            out["abs_sum"].append((ce - ce0).abs().sum().item())
            # the reference's own rounding: a few ulps of the logits and losses it subtracts
            scale = logits.abs().amax(1) + base.abs().amax(1) + ce.abs() + ce0.abs()
            out["round"].append(4 * eps * scale.sum().item())
            out["delta_kl"].append((logp0.exp() * (logp0 - F.log_softmax(logits, 1))).sum().item())
            out["flips"].append(int((logits.argmax(1) != base.argmax(1)).sum()))
    return {k: torch.tensor(v, dtype=torch.float64 if k != "flips" else torch.int64) for k, v in out.items()}


def self_check(run, name, target, structure, units, x, y, score, seed, end_name=None) -> str:
    """Score up to CHECK_UNITS units on the first CHECK_SAMPLES samples with ``score(units, x, y)`` and
    with the float64 full-forward reference; raise VerificationError beyond the bound (the
    single-weight check's). Few samples: a float64 forward of a CNN costs several float32 ones.
    ``end_name``: the node name where the scored channel meets its consumers, or a function giving it."""
    import time

    from .model_copy import copy_model
    from .verify import BOUNDS, VerificationError

    started = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    pick = units.cpu()[torch.randperm(units.numel(), generator=g)[:CHECK_UNITS]]
    x, y = x[:CHECK_SAMPLES], y[:CHECK_SAMPLES]
    got = score(pick, x, y)
    run64 = run if target.weight.dtype == torch.float64 else copy_model(run, torch.float64)
    target64 = run64.get_submodule(name)
    x64 = x.double() if x.is_floating_point() else x
    end_name = end_name() if callable(end_name) else end_name  # known once ``score`` has planned
    ref = naive_structured(run64, name, target64, structure, pick, x64, y.to(x.device), end_name)
    rtol, atol = BOUNDS[torch.float64 if target.weight.dtype == torch.float64 else torch.float32]
    for key in ("delta_loss", "delta_kl"):
        have, want = got[key].cpu().double(), ref[key]
        allowed = rtol * want.abs() + atol * (ref["abs_sum"] + ref["delta_kl"].abs()) + ref["round"] + 1e-300
        bad = ~((have - want).abs() <= allowed)
        if bad.any():
            k = int(bad.nonzero()[0, 0])
            raise VerificationError(
                f"ablate: self-check failed: structure={structure!r} gives {key}={have[k].item():.10g} for unit "
                f"{int(pick[k])} of {name!r} on the first {len(y)} samples, the float64 full forward with the unit "
                f"removed {want[k].item():.10g} (allowed {allowed[k].item():.3g}): please report it; verify=False "
                "skips this check (not advised)")
    return (f"{len(pick)} units x {len(y)} samples agreed with the float64 full forward with the unit removed in "
            f"{time.perf_counter() - started:.2f} s")


def unit_norms(target: nn.Module, structure: str, units: torch.Tensor) -> torch.Tensor:
    """(K,) float64 L2 norm of the weights each unit removes: its row/filter ("out", bias excluded) or
    its column, over the filters of its group ("in")."""
    W = target.weight.detach().double()
    if structure in OUT:
        return W.reshape(W.shape[0], -1).norm(dim=1)[units.to(W.device)].cpu()
    if isinstance(target, nn.Linear):
        return W.norm(dim=0)[units.to(W.device)].cpu()
    G, (O, Cg) = target.groups, W.shape[:2]
    per_input = W.reshape(G, O // G, Cg, -1).pow(2).sum((1, 3)).reshape(G * Cg).sqrt()  # input channel g*Cg + c
    return per_input[units.to(W.device)].cpu()

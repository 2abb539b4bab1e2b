"""The channel funnel (docs/DESIGN.md): a target whose changed channel reaches the final Linear through
per-channel maps only (BatchNorm in eval, element-wise activations, a residual add of values that
do not depend on the target, global average pooling, flatten) moves the logits along one column
of the final Linear: one float64 scalar d per (ablation, sample), then the closed form's stage-2
kernels (ops.score_deltas)."""
from __future__ import annotations


import torch
import torch.fx as fx
from torch import nn

from . import ops
from .closed_form import _moment_slots, _moments
from .dataflow import where
from .plan import ELEMENTWISE, IDENTITY, logit_directions
from .propagate import (ADD, ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS, FLATTEN_FUNCS, FLATTEN_METHODS,
                        IDENTITY_METHODS, POOL_FUNCS, POOL_MODULES, RELU_FUNCS, SUB)
from .replay import BYTES_PER_ENTRY, Replay

SCRATCH_PER_PAIR = 32  # bytes per (weight, sample) of the stage-2 kernels


def _per_channel(n, mods, dependent) -> str | None:
    """None when node ``n`` maps each channel on its own (and reads one changed input), else why not."""
    deps = [a for a in n.all_input_nodes if a in dependent]
    if len(deps) != 1:
        return f"node {n.name!r} combines {len(deps)} values that depend on the target"
    extra = [a for a in list(n.args[1:]) + list(n.kwargs.values()) if isinstance(a, fx.Node)]
    if extra and not (n.target in ADD or n.target in SUB or n.target in ("add", "add_", "sub", "sub_")):
        return f"node {n.name!r} takes a tensor argument ({extra[0].name!r}) besides the changed channel"
    if n.op == "call_module":
        m = mods[n.target]
        ok = (IDENTITY, nn.ReLU, nn.LeakyReLU, nn.modules.batchnorm._BatchNorm, nn.Flatten, *ELEMENTWISE)
        if isinstance(m, ok):
            return None
        if isinstance(m, POOL_MODULES):
            return None  # a pool that does not end at one value per channel fails the final shape check
        return f"module {n.target!r} ({type(m).__name__}) mixes channels"
    if n.op == "call_function":
        f = n.target
        if f in RELU_FUNCS or f in ELEMENTWISE_FUNCS or f in POOL_FUNCS or f in FLATTEN_FUNCS:
            return None
        if f in ADD or f in SUB or f is torch.mean:
            return None
        return f"function {getattr(f, '__name__', f)} after the target"
    if n.op == "call_method":
        name = n.target
        if name in IDENTITY_METHODS or name in ELEMENTWISE_METHODS or name in FLATTEN_METHODS \
                or name in ("relu", "relu_", "add", "add_", "mean"):
            return None
        return f"method .{name}() after the target"
    return f"node {n.name!r} ({n.op})"


def funnel_plan(graph, values: dict) -> tuple[object, str | None]:
    """(the final Linear's node, None) when the funnel applies, else (None, the reason)."""
    mods = dict(graph.module.named_modules())
    final = graph.logits
    if final.op != "call_module" or not isinstance(mods[final.target], nn.Linear):
        return None, "the model's output is not produced by an nn.Linear"
    if final not in graph.dependent or final.args[0] not in graph.dependent:
        return None, "the final Linear does not read the target's channels"
    dependent = set(graph.dependent)
    for n in graph.dependent[1:-1]:
        why = _per_channel(n, mods, dependent)
        if why is None and (n.target in ADD or n.target in SUB or n.target in ("add", "add_", "sub", "sub_")):
            changed = next(a for a in n.all_input_nodes if a in dependent)
            if len(n.args) != 2 or n.kwargs or values[changed].shape != values[n].shape:
                why = (f"node {n.name!r}{where(n)} broadcasts the change or scales it (alpha=): it does not stay "
                       "in one channel")
        if why is None and n.target in ("mean", torch.mean):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [1])
            if any(d % values[n.args[0]].dim() in (0, 1) for d in dims):
                why = f"node {n.name!r} averages over channels"
        if why is not None:
            return None, why
    n_out = values[graph.target].shape[1]
    feats = values[final.args[0]]
    if feats.dim() != 2 or feats.shape[1] != n_out:
        return None, (f"the final Linear reads {tuple(feats.shape[1:])} features, not one per channel of the "
                      f"target ({n_out}): no global pooling")
    return final, None


class Funnel(Replay):
    """A Replay restricted to per-channel maps, ending in one scalar per (ablation, sample)."""

    def __init__(self, graph, final, target, param, flat, backend, mode, want_flips, by_class, why):
        super().__init__(graph, target, param, flat, want_flips, by_class, why)
        self.final, self.backend, self.mode = final, backend, mode
        self.head_rows = logit_directions(graph.module.get_submodule(final.target))
        w = getattr(target, param)
        per = w[0].numel() if param == "weight" else 1
        self.units = self.flat // per  # the output channel each entry feeds
        self.moment_slot = _moment_slots(self.units, *self.head_rows.shape, backend, mode, self.flat.device)
        self.moments = None

    @property
    def kind(self) -> str:
        return "funnel"

    @property
    def description(self) -> str:
        chain = " -> ".join(n.name for n in self.graph.dependent)
        return f"channel funnel {chain}: one scalar per sample along {self.final.target!r}'s column" + self.why

    def prepare(self, x, y) -> torch.Tensor:
        logits = self._prepare(x)
        self.moments = None
        return logits

    def chunk_size(self, n: int, max_memory: int) -> int:
        per_channel = max(1, self.per_sample // max(1, self.head_rows.shape[0]))
        return max(1, max_memory // ((BYTES_PER_ENTRY * per_channel + SCRATCH_PER_PAIR) * max(n, 1)))

    def score(self, batch, sl: slice):
        d0 = self.prop.target_delta(self.flat[sl], self.vals[sl])
        delta = self.prop.run(d0, stop=self.final)
        if delta.idx is None or delta.t.shape[2] != 1:
            raise RuntimeError("funnel: the change did not stay in one channel (a bug: please report)")
        d = delta.t[:, :, 0].double().contiguous()
        if self.moments is None and self.moment_slot is not None:
            self.moments = _moments(self.head_rows, self.moment_slot, batch.probs)
        return ops.score_deltas(self.backend, d, delta.idx, self.head_rows, batch.probs, batch.logits, batch.labels,
                                self.moments, self.moment_slot if self.moments is not None else None,
                                self.want_flips, self.by_class)

"""Propagate the *change* of the target layer's output through the rest of the graph for a chunk of
K ablations at once (the replay and funnel methods).

Linear maps, BatchNorm, ReLU and max-pool take the changes in the dtype of the captured values
(float32 for a float32 model at precision="model", float64 at precision="float64"): each rounds
relative to the change itself, never a large base value (no cancellation). Other element-wise
maps, the generic path and the scoring of the logits' change run in float64.

A change is a ``Delta``: either dense, ``t`` of shape (K, N, *node_shape[1:]), or confined to one
block of ``B`` consecutive entries of the node's dim 1 (its channels or features) per ablation,
``t`` of shape (K, N, B, *rest) with the block index ``idx`` (K,). Zeroing a Conv2d weight changes
one output channel: a block of one channel, which stays a block through per-channel maps and
becomes a block of B*H*W columns after a flatten, so the next Linear or Conv only needs those
columns (a low-rank product, not a full one).

Exact forms, never the difference of two evaluations where one exists:
  Linear/Conv/pools/flatten/reshape/cat   linear: map the change itself (bias dropped)
  BatchNorm (eval)                        per-channel gain times the change
  ReLU/LeakyReLU                          piecewise: the change itself where both sides agree
  MaxPool2d                               u[new argmax] - u[old argmax] + change[new argmax]
  add/sub/mul                             sums of changes; a*db + da*b + da*db for products
Anything else (GELU, LayerNorm, softmax, unknown functions): f(base + change) - f(base) evaluated
in float64 (a float64 copy of the module), which loses ~1e-16 of |f| to rounding: documented as
the one place where two evaluations are subtracted, in float64.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dataflow import where
from .plan import ELEMENTWISE, ELEMENTWISE_FUNCS, IDENTITY, IDENTITY_METHODS, RELU_FUNCS

ELEMENTWISE_METHODS = {"sigmoid", "tanh", "sigmoid_", "tanh_"}
POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
POOL_FUNCS = {F.avg_pool2d, F.adaptive_avg_pool2d, F.avg_pool1d, F.adaptive_avg_pool1d}
ADD = {operator.add, operator.iadd, torch.add}
SUB = {operator.sub, operator.isub, torch.sub}
MUL = {operator.mul, operator.imul, torch.mul}
FLATTEN_FUNCS = {torch.flatten, torch.reshape}
FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass
class Delta:
    t: torch.Tensor
    idx: torch.Tensor | None  # (K,) block index along the node's dim 1, None when dense
    size: int  # the node's dim-1 size
    absolute: bool = False  # t holds the new values, not changes (a bool or integer node: h > 0, argmax)

    @property
    def k(self) -> int:
        return self.t.shape[0]

    def dense(self) -> torch.Tensor:
        if self.idx is None:
            return self.t
        K, N, B = self.t.shape[:3]
        rest = self.t.shape[3:]
        full = self.t.new_zeros(K, N, self.size // B, B, *rest)
        full[torch.arange(K, device=self.t.device), :, self.idx] = self.t
        return full.reshape(K, N, self.size, *rest)


@dataclass
class Parts:
    """The changes of a node that returns a tuple (a Delta or None per item); only [i] reads it."""
    items: list
    k: int
    absolute: bool = False


def merge(t):
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def unmerge(t, k):
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


def leaky_delta(u, t, slope):
    """leaky(u + t) - leaky(u), exact where both sides are on one piece."""
    up = u + t
    on, on_p = u > 0, up > 0
    if slope == 0.0:
        return torch.where(on_p, torch.where(on, t, up), torch.where(on, -u, 0.0))
    return torch.where(on_p, torch.where(on, t, up - slope * u), torch.where(on, slope * up - u, slope * t))


def bn_gain(m: nn.Module, name: str) -> torch.Tensor:
    if not m.track_running_stats or m.running_mean is None:
        raise ValueError(f"module {name!r} ({type(m).__name__}) uses batch statistics in eval mode: the samples "
                         "of a batch are not independent, so single-weight ablation is not defined per sample")
    inv = torch.rsqrt(m.running_var.double() + m.eps)
    return m.weight.detach().double() * inv if m.affine else inv


class Propagator:
    """Float64 replay of the nodes after the target, on changes, for one captured batch at a time."""

    def __init__(self, graph, param: str, dtype=torch.float64):
        self.g, self.param, self.dtype = graph, param, dtype
        self.mods = dict(graph.module.named_modules())
        self.target = self.mods[graph.target.target]
        self._w64, self._m64 = {}, {}
        self.values, self.b64, self.out64 = {}, {}, {}

    # --- per batch -------------------------------------------------------------------------
    def set_batch(self, values: dict) -> None:
        self.values, self.b64, self.out64 = values, {}, {}

    def base(self, node, dtype=None):
        """The node's base value, in ``dtype`` (default: the propagation dtype) if floating."""
        key = (node, dtype or self.dtype)
        if key not in self.b64:
            v = self.values[node]
            floating = isinstance(v, torch.Tensor) and v.is_floating_point()
            self.b64[key] = v.to(key[1]) if floating else v
        return self.b64[key]

    def weight64(self, m: nn.Module) -> torch.Tensor:
        key = id(m)
        if key not in self._w64:
            self._w64[key] = m.weight.detach().to(self.dtype)
        return self._w64[key]

    def module64(self, name: str) -> nn.Module:
        if name not in self._m64:
            m = self.mods[name]
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                bn_gain(m, name)  # raises for batch statistics
            m64 = copy.deepcopy(m).double()
            for sub in m64.modules():
                if getattr(sub, "inplace", False):
                    sub.inplace = False  # the base values it reads are shared
            self._m64[name] = m64
        return self._m64[name]

    # --- the target's own change -------------------------------------------------------------
    def target_delta(self, flat: torch.Tensor, vals: torch.Tensor) -> Delta:
        """The change of the target's output when entry ``flat[k]`` (of weight or bias, value
        ``vals[k]``, float64) is zeroed, for each k."""
        m, node = self.target, self.g.target
        vals = vals.to(self.dtype)
        out = self.values[node]
        K, N = flat.numel(), out.shape[0]
        if isinstance(m, nn.Linear) and out.dim() > 2:
            return self.token_delta(flat, vals, out)
        if self.param == "bias":
            rest = out.shape[2:]
            t = (-vals).view(K, 1, 1, *[1] * len(rest)).expand(K, N, 1, *rest)
            return Delta(t, flat, out.shape[1])
        x = self.base(node.args[0])
        if isinstance(m, nn.Linear):
            J = m.in_features
            o, j = flat // J, flat % J
            t = -(vals[:, None] * x[:, j].t())  # a product of two float32 values: exact in float64
            return Delta(t[:, :, None], o, out.shape[1])
        O, Cg, kh, kw = m.weight.shape
        per = Cg * kh * kw
        o, r = flat // per, flat % per
        c, p, q = r // (kh * kw), (r // kw) % kh, r % kw
        ch = (o // (O // m.groups)) * Cg + c
        xp = _pad(m, x)
        H, W = out.shape[2:]
        (s0, s1), (d0, d1) = m.stride, m.dilation
        ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        Y = p[:, None] * d0 + s0 * ar_h  # (K, H)
        X = q[:, None] * d1 + s1 * ar_w  # (K, W)
        patch = xp[:, ch[:, None, None], Y[:, :, None], X[:, None, :]]  # (N, K, H, W)
        t = -(vals[:, None, None, None] * patch.transpose(0, 1))
        return Delta(t[:, :, None], o, O)

    def token_delta(self, flat, vals, out) -> Delta:
        """A Linear on inputs (N, ..., J) (tokens): zeroing W[o, j] changes unit o at every token by
        -W[o, j] x[..., j]; dense over the last axis (the units), zero but at o."""
        K = flat.numel()
        t = out.new_zeros(K, *out.shape, dtype=self.dtype)
        ar = torch.arange(K, device=out.device)
        if self.param == "bias":
            t[ar, ..., flat] = -vals.view(K, *[1] * (out.dim() - 1))
            return Delta(t, None, self.size_of(self.g.target))
        x = self.base(self.g.target.args[0])
        J = self.target.in_features
        o, j = flat // J, flat % J
        # a product of two values of the captured dtype: exact in float64
        t[ar, ..., o] = -(vals.view(K, *[1] * (out.dim() - 1)) * x[..., j].movedim(-1, 0))
        return Delta(t, None, self.size_of(self.g.target))

    # --- the rest of the graph ----------------------------------------------------------------
    def run(self, d0: Delta, stop=None):
        """The change at the logits (K, N, C) dense, or the Delta at ``stop``'s input."""
        env = {self.g.target: d0}
        uses = self.g.user_count()
        for n in self.g.dependent[1:]:
            if n is stop:
                return env.get(n.args[0])
            env[n] = self.apply(n, env)
            for a in n.all_input_nodes:
                uses[a] -= 1
                if uses[a] == 0 and a in env and a is not self.g.logits:
                    del env[a]
        d = env.get(self.g.logits)
        if d is None:
            logits = self.values[self.g.logits]
            return torch.zeros(d0.k, *logits.shape, dtype=torch.float64, device=logits.device)
        return d.dense()

    def apply(self, n: fx.Node, env: dict) -> Delta:
        r = None
        x = n.args[0] if n.args else None
        if isinstance(env.get(x), Parts):  # out[i] of a module that returns a tuple
            d = env[x].items[n.args[1]]
            if d is None:
                raise ValueError(f"replay: node {n.name!r}{where(n)} reads item {n.args[1]} of {x.name!r}, which "
                                 "is not a tensor")
            return d
        if any(env[a].absolute for a in n.all_input_nodes if a in env):
            pass  # new values of a bool/integer input: only the generic path reads them
        elif n.op == "call_module":
            x = n.args[0] if n.args else None
            if len(n.args) == 1 and not n.kwargs and x in env:
                r = self.module_delta(self.mods[n.target], n, x, env[x])
        elif n.op in ("call_function", "call_method"):
            r = self.function_delta(n, env)
        if r is None:
            r = self.generic(n, env)
        return r

    def size_of(self, n) -> int:
        v = self.values[n]
        return v.shape[1] if v.dim() > 1 else 1

    def block_base(self, x, d: Delta, dtype=None) -> torch.Tensor:
        """The base value of ``x`` where ``d`` lives: (K, N, B, *rest)."""
        u = self.base(x, dtype)
        if d.idx is None:
            return u.unsqueeze(0).expand(d.k, *u.shape)
        B = d.t.shape[2]
        return u.reshape(u.shape[0], d.size // B, B, *u.shape[2:])[:, d.idx].transpose(0, 1)

    def elementwise(self, x, d: Delta, fn) -> Delta:
        """f(u + t) - f(u) in float64 where the change lives (it stays there)."""
        u = self.block_base(x, d, torch.float64)
        return Delta((fn(u + d.t.double()) - fn(u)).to(self.dtype), d.idx, d.size)

    def module_delta(self, m, n, x, d: Delta):
        if isinstance(m, IDENTITY):
            return d
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            slope = float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else 0.0
            return Delta(leaky_delta(self.block_base(x, d), d.t, slope), d.idx, d.size)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return _scale(d, bn_gain(m, n.target))
        if isinstance(m, nn.Linear):
            return self.linear(d, self.weight64(m), n)
        if isinstance(m, nn.Conv2d):
            return self.conv(m, d, n)
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return self.maxpool(m, x, d)
        if isinstance(m, POOL_MODULES):
            return Delta(unmerge(m(merge(d.t)), d.k), d.idx, d.size)
        if isinstance(m, nn.Flatten):
            return self.flatten(x, n, d)
        if isinstance(m, ELEMENTWISE):
            return self.elementwise(x, d, self.module64(n.target))
        return None

    def function_delta(self, n, env):
        f, args = n.target, n.args
        deps = [a for a in n.all_input_nodes if a in env]
        if len(deps) == 0:
            return None
        x = args[0] if args else None
        first = x in env and deps == [x]
        if n.op == "call_function":
            if f in RELU_FUNCS and first:
                return Delta(leaky_delta(self.block_base(x, env[x]), env[x].t, 0.0), env[x].idx, env[x].size)
            if f in ELEMENTWISE_FUNCS and first:
                rest = [self._const(a, torch.float64) for a in args[1:] if not isinstance(a, bool)]  # no inplace
                kw = {k: self._const(v, torch.float64) for k, v in n.kwargs.items() if k != "inplace"}
                d = env[x]
                if any(isinstance(a, fx.Node) for a in list(args[1:]) + list(n.kwargs.values())):
                    d = Delta(d.dense(), None, d.size)  # a tensor argument (a per-unit clamp) has the full shape
                return self.elementwise(x, d, lambda u: f(u, *rest, **kw))
            if f in POOL_FUNCS and first:
                d = env[x]
                rest = [self._const(a) for a in args[1:]]
                return Delta(unmerge(f(merge(d.t), *rest, **n.kwargs), d.k), d.idx, d.size)
            if f is torch.mean and first:
                return self.mean(n, env[x])
            if f in FLATTEN_FUNCS and first:
                return self.flatten(x, n, env[x])
            if (f in ADD or f in SUB) and len(args) == 2 and not n.kwargs:
                return self.add(n, args, env, f in SUB)
            if f in MUL and len(args) == 2 and not n.kwargs:
                return self.mul(n, args, env)
            if f is torch.cat:
                dim = n.kwargs.get("dim", args[1] if len(args) > 1 else 0)
                return None if dim % self.values[n].dim() == 0 else self.linear_fn(n, env)
            if f is operator.getitem and first and _keeps_batch_index(args[1]):
                return self.linear_fn(n, env)
            return None
        name = n.target
        if name in IDENTITY_METHODS and first:
            return env[x]
        if name in ("relu", "relu_") and first and len(args) == 1:
            return Delta(leaky_delta(self.block_base(x, env[x]), env[x].t, 0.0), env[x].idx, env[x].size)
        if name in ELEMENTWISE_METHODS and first and len(args) == 1:
            fn = getattr(torch, name.rstrip("_"))
            return self.elementwise(x, env[x], fn)
        if name in FLATTEN_METHODS and first:
            return self.flatten(x, n, env[x])
        if name in ("add", "add_", "sub", "sub_") and len(args) == 2 and not n.kwargs:
            return self.add(n, args, env, name.startswith("sub"))
        if name in ("mul", "mul_") and len(args) == 2 and not n.kwargs:
            return self.mul(n, args, env)
        if name == "mean" and first:
            return self.mean(n, env[x])
        if name in MOVE_METHODS and first and _keeps_batch_axis(n, self.values[x].dim()):
            return self.linear_fn(n, env)
        return None

    def _const(self, a, dtype=None):
        return self.base(a, dtype) if isinstance(a, fx.Node) else a

    # --- linear maps -------------------------------------------------------------------------
    def linear(self, d: Delta, W: torch.Tensor, n) -> Delta:
        if d.idx is not None and d.t.dim() == 3:  # only the columns the block feeds
            B = d.t.shape[2]
            Wb = W.reshape(W.shape[0], d.size // B, B)[:, d.idx]  # (O, K, B)
            return Delta(torch.einsum("knb,okb->kno", d.t, Wb), None, self.size_of(n))
        return Delta(d.dense() @ W.t(), None, self.size_of(n))

    def conv(self, m: nn.Conv2d, d: Delta, n) -> Delta:
        W = self.weight64(m)
        K = d.k
        O, Cg, kh, kw = W.shape
        G = m.groups
        if d.idx is not None and m.padding_mode == "zeros" and Cg % d.t.shape[2] == 0:
            # only the filters' slices that read the changed block: one grouped conv, K groups
            B = d.t.shape[2]
            first = d.idx * B
            gi, off = first // Cg, (first % Cg) // B
            Og = O // G
            Wk = W.reshape(G, Og, Cg // B, B, kh, kw)[gi, :, off]  # (K, Og, B, kh, kw)
            N = d.t.shape[1]
            inp = d.t.transpose(0, 1).reshape(N, K * B, *d.t.shape[3:])
            out = F.conv2d(inp, Wk.reshape(K * Og, B, kh, kw), None, m.stride, m.padding, m.dilation, K)
            out = out.reshape(N, K, Og, *out.shape[2:]).transpose(0, 1)
            if G == 1:
                return Delta(out, None, O)
            return Delta(out, gi, O)
        out = m._conv_forward(merge(d.dense()), W, None)
        return Delta(unmerge(out, K), None, O)

    def flatten(self, x, n, d: Delta) -> Delta:
        out = self.values[n]
        inp = self.values[x]
        N = inp.shape[0]
        if out.dim() == 2 and out.shape[0] == N and out.shape[1] == inp[0].numel():
            if d.idx is None:
                return Delta(d.t.reshape(d.k, N, -1), None, out.shape[1])
            B = d.t.shape[2]
            per = inp[0].numel() // d.size  # entries per dim-1 slot
            return Delta(d.t.reshape(d.k, N, B * per), d.idx, out.shape[1])
        if out.shape[0] == N:
            return Delta(d.dense().reshape(d.k, *out.shape), None, self.size_of(n))
        return None

    def mean(self, n, d: Delta):
        x = n.args[0]
        nd = self.values[x].dim()
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [a % nd for a in dims]
        if 0 in dims:
            return None
        keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        t = merge(d.t).mean(dims, keepdim=keep)
        if 1 in dims:
            return Delta(unmerge(merge(d.dense()).mean(dims, keepdim=keep), d.k), None, self.size_of(n))
        return Delta(unmerge(t, d.k), d.idx, d.size)

    def add(self, n, args, env, negate_second: bool):
        a, b = args
        da, db = env.get(a) if isinstance(a, fx.Node) else None, env.get(b) if isinstance(b, fx.Node) else None
        out_shape = self.values[n].shape
        for x, d in ((a, da), (b, db)):
            if d is not None and self.values[x].shape != out_shape:
                return None  # broadcasting the change: the generic path
        if db is None:
            return da
        if negate_second:
            db = Delta(-db.t, db.idx, db.size)
        if da is None:
            return db
        if da.idx is not None and db.idx is not None and da.t.shape == db.t.shape and torch.equal(da.idx, db.idx):
            return Delta(da.t + db.t, da.idx, da.size)
        return Delta(da.dense() + db.dense(), None, da.size)

    def mul(self, n, args, env):
        a, b = args
        da, db = (env.get(v) if isinstance(v, fx.Node) else None for v in (a, b))
        out_shape = self.values[n].shape
        if da is not None and db is not None:
            if self.values[a].shape != out_shape or self.values[b].shape != out_shape:
                return None
            ua, ub = self.base(a)[None], self.base(b)[None]
            ta, tb = da.dense(), db.dense()
            return Delta(ua * tb + ta * ub + ta * tb, None, self.size_of(n))
        d, other = (da, b) if da is not None else (db, a)
        src = a if da is not None else b
        if self.values[src].shape != out_shape:
            return None
        if not isinstance(other, fx.Node):
            return Delta(d.t * other, d.idx, d.size)
        return Delta(d.dense() * self.base(other), None, self.size_of(n))

    def linear_fn(self, n, env):
        """A function linear in its tensor inputs that keeps the batch axis first (cat, slicing,
        permute, ...): apply it to the changes, zeros for the other batch tensors."""
        K = next(env[a].k for a in n.all_input_nodes if a in env)

        def conv(a):
            if isinstance(a, fx.Node):
                if a in env:
                    return merge(env[a].dense())
                v = self.base(a)
                if a in self.g.batched and isinstance(v, torch.Tensor):
                    return v.new_zeros(K * v.shape[0], *v.shape[1:])
                return v
            return a

        args = fx.node.map_aggregate(n.args, conv)
        kwargs = fx.node.map_aggregate(n.kwargs, conv)
        out = self._call(n, args, kwargs)
        base = self.values[n]
        if not isinstance(out, torch.Tensor) or out.shape != (K * base.shape[0], *base.shape[1:]):
            return None
        return Delta(unmerge(out, K), None, self.size_of(n))

    def maxpool(self, m: nn.MaxPool2d, x, d: Delta) -> Delta:
        u = merge(self.block_base(x, d))
        t = merge(d.t)
        kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                  ceil_mode=m.ceil_mode, return_indices=True)
        _, i0 = F.max_pool2d(u, **kw)
        _, i1 = F.max_pool2d(u + t, **kw)
        uf, tf = u.flatten(2), t.flatten(2)

        def at(a, i):
            return a.gather(2, i.flatten(2)).view_as(i).to(a.dtype)

        out = (at(uf, i1) - at(uf, i0)) + at(tf, i1)  # exactly t[argmax] where the argmax stays
        return Delta(unmerge(out, d.k), d.idx, d.size)

    # --- anything else -----------------------------------------------------------------------
    def generic(self, n, env) -> Delta:
        """f(base + change) - f(base) in float64, the K ablations stacked along the batch axis."""
        K = next(env[a].k for a in n.all_input_nodes if a in env)
        f64 = torch.float64

        def new(a):
            if isinstance(a, fx.Node):
                v = self.base(a, f64)
                if a in env and env[a].absolute:
                    return merge(env[a].t)
                if a in env:
                    return merge(v.unsqueeze(0) + env[a].dense().double())
                if a in self.g.batched and isinstance(v, torch.Tensor) and v.dim() > 0:
                    return merge(v.unsqueeze(0).expand(K, *v.shape))
                return v
            return a

        def old(a):
            v = self.base(a, f64) if isinstance(a, fx.Node) else a
            return v.clone() if isinstance(v, torch.Tensor) else v  # an in-place op must not touch the cache

        seq_first = [s for s in self.mods[n.target].modules() if getattr(s, "batch_first", True) is False] \
            if n.op == "call_module" else []
        if seq_first:  # nn.MultiheadAttention, nn.LSTM, ... (or a module holding one)
            raise ValueError(f"replay: module {n.target!r} ({type(self.mods[n.target]).__name__}){where(n)} has "
                             f"a {type(seq_first[0]).__name__} with batch_first=False: the first axis of its inputs "
                             "is not the batch, so the ablations cannot be stacked along it; build it with "
                             "batch_first=True")
        try:
            out = self._call(n, fx.node.map_aggregate(n.args, new), fx.node.map_aggregate(n.kwargs, new))
        except RuntimeError as exc:  # an argument tied to the batch size that is not stacked with it
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"replay: node {n.name!r} ({n.op} {_name(n.target)}){where(n)} fails with the {K} "
                             f"ablations stacked along the batch axis ({msg}): one of its arguments has a first "
                             "axis tied to the batch size without being the batch (e.g. a 3-D attn_mask of shape "
                             "(N * heads, T, T)); pass a mask that broadcasts over the batch, or a key_padding_mask "
                             "(N, T), or use backend='naive' (exact, slow)") from None
        if n not in self.out64:
            self.out64[n] = self._call(n, fx.node.map_aggregate(n.args, old), fx.node.map_aggregate(n.kwargs, old))
        base = self.out64[n]
        if isinstance(out, tuple) and isinstance(base, tuple) and len(out) == len(base) and all(
                u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                for u in n.users):
            # a module returning a tuple (MultiheadAttention: output, weights) read by [i]: one change each
            return Parts([self._change(n, o, b, K) if isinstance(o, torch.Tensor) else None
                          for o, b in zip(out, base)], K)
        return self._change(n, out, base, K)

    def _change(self, n, out, base, K) -> Delta:
        """The Delta of node n from its new values (K*N, ...) and base values (N, ...)."""
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"replay: node {n.name!r} ({n.op} {_name(n.target)}){where(n)} returns a "
                             f"{type(out).__name__}, not one tensor, from values that depend on the target; "
                             "weightablate follows single-tensor ops only (take [0] of a module's tuple in forward "
                             "after a module it can trace)")
        if base.dim() == 0 or out.shape[0] != K * base.shape[0]:
            raise ValueError(f"replay: node {n.name!r} ({n.op} {_name(n.target)}){where(n)} does not keep the batch "
                             "as its first axis (it reduces or mixes samples, or puts another axis first), so the "
                             "ablations cannot be stacked along it")
        if not base.is_floating_point():  # a comparison, argmax, ...: carry the new values themselves
            return Delta(unmerge(out, K), None, self.size_of(n), absolute=True)
        new = unmerge(out, K)
        change = new - base
        if not self._finite(n, base):  # where both are the same -inf (a masked score) the change is 0, not NaN
            change = torch.where(new == base, 0.0, change)
        return Delta(change.to(self.dtype), None, base.shape[1] if base.dim() > 1 else 1)

    def _finite(self, n, base) -> bool:
        key = ("finite", n)
        if key not in self.out64:
            self.out64[key] = bool(torch.isfinite(base).all())
        return self.out64[key]

    def _call(self, n, args, kwargs):
        if n.op == "call_module":
            return self.module64(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)


MOVE_METHODS = {"permute", "transpose", "unsqueeze", "squeeze"}


def _keeps_batch_index(index) -> bool:
    """An index that takes the whole batch axis: x[:, ...]."""
    first = index[0] if isinstance(index, tuple) and index else index
    return isinstance(first, slice) and first == slice(None)


def _keeps_batch_axis(n, ndim: int) -> bool:
    """permute/transpose/unsqueeze/squeeze calls that leave the batch axis first."""
    dims = [a for a in n.args[1:]] + list(n.kwargs.values())
    if n.target == "permute":
        order = dims[0] if dims and isinstance(dims[0], (list, tuple)) else dims
        return bool(order) and isinstance(order[0], int) and order[0] % ndim == 0
    if not dims or not all(isinstance(d, int) for d in dims):
        return False
    size = ndim + 1 if n.target == "unsqueeze" else ndim
    return all(d % size != 0 for d in dims)


def _name(target) -> str:
    return getattr(target, "__name__", str(target))


def _scale(d: Delta, gain: torch.Tensor) -> Delta:
    """Multiply a change by a per-channel gain (dim 1 of the node)."""
    extra = d.t.dim() - 3
    gain = gain.to(d.t.dtype)
    if d.idx is None:
        return Delta(d.t * gain.view(1, 1, -1, *[1] * extra), None, d.size)
    B = d.t.shape[2]
    g = gain.reshape(d.size // B, B)[d.idx]  # (K, B)
    return Delta(d.t * g.view(d.k, 1, B, *[1] * extra), d.idx, d.size)


def _pad(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input with its padding applied (any padding mode)."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return x
        pads = []
        for d, k in zip(reversed(m.dilation), reversed(m.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for p in reversed(m.padding) for _ in range(2)]
    if not any(pads):
        return x
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, pads, mode=mode)


def max_numel(values: dict, nodes) -> int:
    """The largest per-sample size among ``nodes``' base values."""
    best = 1
    for n in nodes:
        v = values.get(n)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 0:
            best = max(best, math.prod(v.shape[1:]))
    return best

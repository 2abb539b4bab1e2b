"""What the traced graph must prove before any exact method runs on it.

1. The target's parameter is used only by the target's own call: a tied or functionally reused
   weight (``b.weight = a.weight``, ``F.linear(h, self.fc.weight)``) changes two places at once.
2. No hook or parametrization changes what the target, or a module after it, computes: the
   methods replay modules without their hooks.
3. In-place ops are followed: a value read after an in-place op that changed it must be read as
   the op's result. Reads of the value itself are redirected to the op (the graph becomes pure
   dataflow, which is what the methods assume); a read of another alias of it (a view taken
   before the op: known view ops, and any two values that shared memory in one forward on a few
   samples), an in-place op on the model's input, parameters or buffers, is refused, naming the
   line of forward.
"""
from __future__ import annotations

import inspect
import linecache
import operator
import os

import torch
import torch.fx as fx
from torch import nn

SKIP_FRAMES = (os.path.dirname(torch.__file__), os.path.dirname(__file__))  # torch's and this package's frames

INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                     operator.ilshift, operator.irshift}
# methods ending in "_" that do not change values
_NOT_MUTATING = {"requires_grad_", "share_memory_", "retain_grad_"}
# ops whose result may share memory with their first argument
VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
                "transpose", "t", "permute", "expand", "expand_as", "narrow", "select", "unfold", "contiguous",
                "detach", "as_strided", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "split",
                "chunk", "unbind", "real", "imag", "to", "type_as", "float", "double", "half", "bfloat16",
                "view_as_real", "view_as_complex", "__getitem__"}
VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
                  torch.permute, torch.narrow, torch.select, torch.t, torch.split, torch.chunk, torch.unbind,
                  torch.movedim, torch.swapaxes, torch.detach, torch.diagonal, torch.as_strided}
VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.FeatureAlphaDropout)


def where(node: fx.Node) -> str:
    """Where the user's forward created ``node``: ' (file:line: `code`)', or '' when unknown."""
    found = node.meta.get("user_frame")
    if found is None:
        return ""
    code = linecache.getline(*found).strip()
    return f" ({os.path.basename(found[0])}:{found[1]}" + (f": `{code}`)" if code else ")")


def describe(node: fx.Node) -> str:
    """'module 'fc2' (Linear) (file:line: `code`)', 'function 'add' (...)', 'method 'mul_' (...)'."""
    if node.op == "call_module":
        m = node.graph.owning_module.get_submodule(node.target)
        return f"module {node.target!r} ({type(m).__name__}){where(node)}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    kind = {"call_function": "function", "call_method": "method"}.get(node.op, node.op)
    return f"{kind} {target!r}{where(node)}"


def _storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.numel() else None


def _fetch(gm: fx.GraphModule, path: str):
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check_shared(gm: fx.GraphModule, node: fx.Node, name: str, target: nn.Module, param: str) -> None:
    """Refuse a target whose ablated parameter is read anywhere but by the target's own call."""
    mine = _storage(getattr(target, param))
    if mine is None:
        return
    for n in gm.graph.nodes:
        if n is node:
            continue
        if n.op == "get_attr" and _storage(_fetch(gm, n.target)) == mine:
            raise ValueError(f"layer {name!r}: its {param} is also read directly by forward{where(n)}: zeroing "
                             "one entry changes that use too, which no exact method here follows; use "
                             "backend='naive' (exact, slow)")
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if m is target:
                continue
            for t_name, t in list(m.named_parameters()) + list(m.named_buffers()):
                if _storage(t) == mine:
                    raise ValueError(f"layer {name!r}: its {param} is shared with module {n.target!r} ({t_name}, "
                                     f"tied weights){where(n)}: zeroing one entry changes both, which no exact "
                                     "method here follows; use backend='naive' (exact, slow)")


def _inplace_flag(fn, args, kwargs) -> bool:
    """``inplace=True`` given to a function that has that parameter (F.relu(x, True), F.dropout(..., inplace=True))."""
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    if "inplace" not in sig.parameters:
        return False
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return False
    return bool(bound.arguments.get("inplace", False))


def mutated(n: fx.Node, gm: fx.GraphModule):
    """The node whose value ``n`` changes in place, or None."""
    if isinstance(n.kwargs.get("out"), fx.Node):
        return n.kwargs["out"]  # torch.mul(a, b, out=a)
    if not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.op == "call_method":
        name = n.target
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
            return n.args[0]
        return None
    if n.op == "call_function":
        f = n.target
        if f in INPLACE_FUNCTIONS or f is setitem:
            return n.args[0]
        fname, module = getattr(f, "__name__", ""), getattr(f, "__module__", "") or ""
        if fname.endswith("_") and not fname.startswith("_") and module.startswith("torch"):
            return n.args[0]  # torch.relu_, F.relu_, torch.sigmoid_, ...
        if _inplace_flag(f, n.args, n.kwargs):
            return n.args[0]
        return None
    if n.op == "call_module":
        return n.args[0] if getattr(gm.get_submodule(n.target), "inplace", False) is True else None
    return None


def _aliases_first_arg(n: fx.Node, gm: fx.GraphModule) -> bool:
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_method":
        return n.target in VIEW_METHODS
    if n.op == "call_function":
        return n.target in VIEW_FUNCTIONS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), VIEW_MODULES)
    return False


def setitem(x: torch.Tensor, index, value) -> torch.Tensor:
    """``x[index] = value`` in place, as forward does, returning x (so later reads can name it)."""
    x[index] = value
    return x


class _Storages(fx.Interpreter):
    """One forward that records which storages each node's value lives in (values kept alive, so
    no storage is freed and reused in between)."""

    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)
        self.ptrs = {}

    def run_node(self, n):
        out = super().run_node(n)
        values = out if isinstance(out, (tuple, list)) else [out]
        self.ptrs[n] = {t.untyped_storage().data_ptr() for t in values if isinstance(t, torch.Tensor) and t.numel()}
        return out


def _groups(nodes, gm, ptrs: dict | None):
    """root(n): alias groups of the nodes, from the known view ops and, when ``ptrs`` is given, from
    the storages the values really shared in one forward (any op that returned a view)."""
    parent = {n: n for n in nodes}

    def root(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    owner = {}
    for n in nodes:
        written = mutated(n, gm)
        if written is not None or _aliases_first_arg(n, gm):
            parent[root(n)] = root(n.args[0] if written is None else written)
        for ptr in (ptrs or {}).get(n, ()):
            if ptr in owner:
                parent[root(n)] = root(owner[ptr])
            else:
                owner[ptr] = n
    return root


def _refuse_outside_writes(writes, nodes, root) -> None:
    for n, x in writes:
        for member in nodes:
            if root(member) is root(x) and member.op in ("placeholder", "get_attr"):
                what = "the model's input" if member.op == "placeholder" else f"{member.target!r} of the model"
                raise ValueError(f"model: forward changes {what} in place: {describe(n)}; every forward then "
                                 "sees other values, so a weight's effect is not defined (copy it first: "
                                 "x = x.clone())")


def functionalize(gm: fx.GraphModule, name: str, x: torch.Tensor) -> None:
    """Make every read after an in-place op read the op's result, or raise naming what cannot be.
    ``x``: a few samples, run once (on a copy) to see which values really share memory."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is operator.setitem:
            n.target = setitem
    nodes = list(gm.graph.nodes)
    order = {n: k for k, n in enumerate(nodes)}
    writes = [(n, w) for n in nodes if (w := mutated(n, gm)) is not None]
    if not writes:
        return
    _refuse_outside_writes(writes, nodes, _groups(nodes, gm, None))  # before anything runs on the input
    storages = _Storages(gm)
    with torch.no_grad():
        storages.run(x.clone())
    root = _groups(nodes, gm, storages.ptrs)
    _refuse_outside_writes(writes, nodes, root)
    for n, x in writes:
        for user in list(x.users):  # later reads of the value itself read the op's result
            if user is not n and order[user] > order[n]:
                user.replace_input_with(x, n)
        for member in nodes:
            if member is x or member is n or root(member) is not root(x) or order[member] > order[n]:
                continue
            stale = [u for u in member.users if order[u] > order[n] and u is not n]
            if stale:
                raise ValueError(f"layer {name!r}: {describe(stale[0])} reads {member.name!r}, which the in-place "
                                 f"op {describe(n)} changed through another view of the same memory; write the "
                                 "in-place op out of place (y = x * 2 instead of x.mul_(2))")
    gm.graph.lint()
    gm.recompile()


def _after(node: fx.Node) -> set:
    """The nodes whose value depends on ``node``'s (itself included)."""
    seen, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def check_hooks(gm: fx.GraphModule, node: fx.Node, name: str, target: nn.Module, param: str) -> None:
    """Refuse hooks and parametrizations that change what the target or a module after it computes:
    the methods replay modules without them (torch.nn.utils.prune's hooks only recompute the weight)."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as tprune
    from torch.nn.modules import module as module_globals

    if parametrize.is_parametrized(target, param):
        raise ValueError(f"layer {name!r}: its {param} is computed by a parametrization (weight_norm, "
                         "spectral_norm, ...): zeroing one entry of what it computes from is not zeroing one "
                         f"weight; use torch.nn.utils.parametrize.remove_parametrizations({name}, {param!r}) on a "
                         "copy first")
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        raise ValueError("model: global forward hooks are registered (torch.nn.modules.module."
                         "register_module_forward_hook): they can change what modules compute, which the methods "
                         "replay without them; remove them during ablate")
    for n in _after(node):
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        hooks = [h for h in m._forward_pre_hooks.values() if not isinstance(h, tprune.BasePruningMethod)]
        hooks += list(m._forward_hooks.values())
        if hooks:
            what = getattr(hooks[0], "__name__", type(hooks[0]).__name__)
            raise ValueError(f"module {n.target!r} has a forward hook ({what}): a hook can change what the module "
                             "computes, and the methods replay it without hooks; remove it during ablate "
                             "(handle.remove()), or use backend='naive'")


def check_per_sample(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """The logits of each sample must be a deterministic function of that sample alone: a random
    forward (dropout left on) or one that mixes samples (a mean over the batch axis, cdist, batch
    statistics) has no per-sample effect of a weight to compute."""
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is None and not isinstance(
                m, nn.modules.instancenorm._InstanceNorm):
            raise ValueError(f"module {n.target!r} ({type(m).__name__}) uses batch statistics in eval mode: the "
                             "samples of a batch are not independent, so single-weight ablation is not defined per "
                             "sample")
    with torch.no_grad():
        out = gm(x.clone())
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() != 2:
            return  # the caller says what a forward must return
        scale = 1e-4 * (out.abs().max().item() + 1.0)
        if not torch.allclose(gm(x.clone()), out, rtol=0, atol=scale):
            raise ValueError("model: two forwards on the same inputs gave different logits (dropout or another "
                             "random op left on in eval mode, e.g. F.dropout(h, p) without "
                             "training=self.training): the effect of a weight is not defined")
        if x.shape[0] > 1:
            alone = torch.cat([gm(x[i:i + 1].clone()) for i in range(x.shape[0])])
            if alone.shape == out.shape and not torch.allclose(alone, out, rtol=0, atol=scale):
                raise ValueError("model: the logits of a sample depend on the other samples of its batch (a mean "
                                 "over the batch axis, cdist, batch statistics): the effect of a weight per sample "
                                 "is not defined, so no exact method applies")


def check_dataflow(gm: fx.GraphModule, node: fx.Node, name: str, target: nn.Module, param: str,
                   x: torch.Tensor) -> None:
    check_shared(gm, node, name, target, param)
    check_hooks(gm, node, name, target, param)
    functionalize(gm, name, x)
    check_per_sample(gm, x)

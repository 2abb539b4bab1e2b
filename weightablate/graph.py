"""The model as a torch.fx graph: which nodes depend on the target layer's output, and one forward
per batch that keeps the values those nodes need (the closed form, the funnel and replay are all
chosen from this graph, weightablate.dispatch).

The graph is the model's *real* dataflow, checked before any method is chosen (weightablate.dataflow):
modules are leaves only when their forward is a torch.nn forward (a subclass with its own forward
is traced through), in-place Python operators (``+=``, ``/=``, ``x[i] = v``) are recorded as the
in-place ops they are, and the target's parameters may not be used anywhere else."""
from __future__ import annotations

import linecache
import operator
import os
import sys
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .dataflow import SKIP_FRAMES, check_dataflow, where
from .twins import Refused, twin

# Nodes whose value is metadata of a tensor (its shape), not a function of its values: they do
# not carry a change of the target's output.
_STATIC_METHODS = {"size", "dim", "numel", "__len__", "stride", "element_size", "is_contiguous"}
_STATIC_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse", "names"}


def _is_static(node: fx.Node, static: set) -> bool:
    if node.op == "call_method" and (node.target in _STATIC_METHODS or (node.target == "type" and len(node.args) == 1
                                                                          and not node.kwargs)):
        return True  # x.type() with no dtype is its name; x.type(dtype) is a tensor
    if node.op == "call_function" and node.target is len:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _STATIC_ATTRIBUTES:
        return True  # x.shape; but x.T, x.mT, x.data are values
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] in static:
        return True
    return False


def _where(exc: BaseException) -> str:
    """The last frame of the user's code in an exception's traceback: ' at file:line: `code`'."""
    tb, found, inner = exc.__traceback__, None, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith(SKIP_FRAMES):
            found, inner = (name, tb.tb_lineno), None
        elif found is not None and "/torch/nn/" in name:
            inner = (name, tb.tb_lineno)  # the torch.nn module's own forward that fx could not follow
        tb = tb.tb_next
    if found is None:
        return ""
    line = linecache.getline(*found).strip()
    at = f" at {os.path.basename(found[0])}:{found[1]}" + (f": `{line}`" if line else "")
    if inner is not None:
        code = linecache.getline(*inner).strip()
        at += f", inside torch's {os.path.basename(inner[0])}:{inner[1]}" + (f": `{code}`" if code else "")
    return at


def torch_base(cls: type) -> type | None:
    """The torch.nn class whose forward ``cls`` runs: itself, or the torch.nn class it derives
    from when it does not define a forward of its own; None for any other forward."""
    for base in cls.__mro__:
        if base.__module__.startswith(("torch.nn.", "torch.ao.nn.")) and base is not nn.Module:
            return base if cls.forward is base.forward else None
    return None


class _Proxy(fx.Proxy):
    """fx.Proxy recording ``x += y``, ``x /= y``, ... as the in-place operators they are (fx's own
    Proxy records them as ``x = x + y``, which drops the mutation of aliases of x) and
    ``x[i] = v`` as operator.setitem (fx's refuses it)."""

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _inplace(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


INPLACE_OPERATORS = {operator.iadd: "__iadd__", operator.isub: "__isub__", operator.imul: "__imul__",
                     operator.itruediv: "__itruediv__", operator.ifloordiv: "__ifloordiv__",
                     operator.imod: "__imod__", operator.ipow: "__ipow__", operator.imatmul: "__imatmul__",
                     operator.iand: "__iand__", operator.ior: "__ior__", operator.ixor: "__ixor__",
                     operator.ilshift: "__ilshift__", operator.irshift: "__irshift__"}
for _op, _name in INPLACE_OPERATORS.items():
    setattr(_Proxy, _name, _inplace(_op))


class _Tracer(fx.Tracer):
    """Leaves are the modules whose forward is torch.nn's (subclasses that keep it included);
    anything with a forward of its own is traced through, so the graph shows what it computes."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.target = target
        self.proxy_buffer_attributes = True  # a buffer sliced by a traced size (mask[:T, :T]) is a graph node

    def create_node(self, *args, **kwargs) -> fx.Node:
        # where forward created the node, for messages (fx's record_stack_traces imports torch._dynamo,
        # whose threads can abort a torchrun process at exit)
        node = super().create_node(*args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(SKIP_FRAMES):
            frame = frame.f_back
        if frame is not None:
            node.meta["user_frame"] = (frame.f_code.co_filename, frame.f_lineno)
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if m is not self.target and any(sub is self.target for sub in m.modules()):
            return False  # a torch.nn container of the target (TransformerEncoderLayer.linear1): open it
        return not isinstance(m, nn.Sequential) and torch_base(type(m)) is not None

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if not self.is_leaf_module(m, self.path_of_module(m)):
            mine = twin(m, torch_base(type(m)))  # a torch.nn forward fx cannot trace (weightablate.twins)
            if mine is not None and (m._forward_hooks or m._forward_pre_hooks):
                raise Refused(f"module {self.path_of_module(m)!r} ({type(m).__name__}) holds the target and has a "
                              "forward hook, which its traced twin does not run (a hook can change what it "
                              "computes); remove it during ablate (handle.remove()), or use backend='naive'")
            forward = mine or forward
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


@dataclass
class Graph:
    """A traced model and the target's place in it."""
    module: fx.GraphModule
    target: fx.Node
    nodes: list  # every node, in execution order
    dependent: list  # nodes whose value changes with the target's output (target first), in order
    needed: set  # nodes whose base value the methods read
    batched: set  # nodes whose value has the batch as first axis (depend on the inputs)
    logits: fx.Node  # the node the model returns

    def user_count(self) -> dict:
        """How many dependent nodes read each node (to free deltas after their last use)."""
        count = {}
        for n in self.dependent:
            for a in n.all_input_nodes:
                count[a] = count.get(a, 0) + 1
        return count


def trace(model: nn.Module, name: str, target: nn.Module | None, param: str, x: torch.Tensor) -> Graph:
    """Trace ``model`` and check its dataflow around the target (weightablate.dataflow); a model
    that cannot be traced, or whose dataflow no exact method can follow, raises ValueError naming
    the construct. ``x``: a few samples (the first batch's), run to see which values share memory."""
    target = model.get_submodule(name) if target is None else target
    tracer = _Tracer(target)
    try:
        graph = tracer.trace(model)
    except Refused as exc:  # a twin's own message: it names the construct and a workaround
        raise ValueError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; all mean "not traceable"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model: torch.fx cannot trace its forward{_where(exc)} ({type(exc).__name__}: {msg}); "
                         "weightablate reads the model's dataflow from the traced graph, so its forward must "
                         "be free of data-dependent control flow (an if/for on tensor values); backend='naive' "
                         "(zero, evaluate, restore; exact but slow) needs no tracing") from None
    gm = fx.GraphModule(tracer.root, graph)
    nodes = list(gm.graph.nodes)
    hits = [n for n in nodes if n.op == "call_module" and gm.get_submodule(n.target) is target]
    if not hits:
        base = next((b for b in type(target).__mro__ if b in (nn.Linear, nn.Conv2d)), None)
        if base is not None and torch_base(type(target)) is None:
            code = getattr(type(target).forward, "__code__", None)
            at = f" ({os.path.basename(code.co_filename)}:{code.co_firstlineno})" if code else ""
            raise ValueError(f"layer {name!r} is a {type(target).__name__} whose forward{at} is its own, not "
                             f"{base.__name__}'s: what it computes from its weight is not known to be a "
                             f"{base.__name__} (a mask, a normalised weight?), so no exact method applies; "
                             "use backend='naive' (exact, slow), or torch.nn.utils.prune for masks")
        reads = [n for n in nodes if n.op == "get_attr" and _owner(model, n.target) is target]
        if reads:
            raise ValueError(f"layer {name!r} is not called as a module: forward reads its "
                             f"{reads[0].target.rpartition('.')[2]}{where(reads[0])}; weightablate ablates layers "
                             "that forward calls (self.fc(h)); backend='naive' zeros the entry wherever it is read")
        raise ValueError(f"layer {name!r} does not run in the model's forward")
    if len(hits) > 1:
        raise ValueError(f"layer {name!r} runs {len(hits)} times per forward pass{where(hits[1])}: zeroing one "
                         "weight then changes every call, which no exact method here follows; use "
                         "backend='naive' (exact, slow)")
    node = hits[0]
    if not node.args and "input" in node.kwargs:  # self.fc(input=h): the same call
        node.args, node.kwargs = (node.kwargs["input"],), {k: v for k, v in node.kwargs.items() if k != "input"}
    check_dataflow(gm, node, name, target, param, x)
    nodes = list(gm.graph.nodes)
    out = next(n for n in nodes if n.op == "output")
    logits = out.args[0]
    if not isinstance(logits, fx.Node):
        raise TypeError(f"model: forward must return a logits tensor (N, C), got {type(logits).__name__}")
    static, dep, batched = set(), {node}, set()
    for n in nodes:
        if _is_static(n, static):
            static.add(n)
            continue
        ins = n.all_input_nodes
        if n.op == "placeholder" or any(a in batched for a in ins):
            batched.add(n)
        if n is not node and n.op != "output" and any(a in dep for a in ins):
            dep.add(n)
    reaches, stack = {logits}, [logits]  # nodes the logits read, directly or not
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in reaches:
                reaches.add(a)
                stack.append(a)
    dependent = [n for n in nodes if n in dep and (n is node or n in reaches)]
    needed = set(dependent) | {a for n in dependent for a in n.all_input_nodes} | {logits}
    return Graph(gm, node, nodes, dependent, needed, batched, logits)


def _owner(model: nn.Module, path: str):
    """The module holding attribute ``path`` ("fc1.weight" -> fc1), or None."""
    try:
        return model.get_submodule(path.rpartition(".")[0])
    except AttributeError:
        return None


class _Capture(fx.Interpreter):
    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            # clone: an in-place op later in forward would overwrite the value
            self.values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def capture_values(graph: Graph, x: torch.Tensor) -> dict:
    """One forward of the traced model under no_grad; the base value of every needed node."""
    cap = _Capture(graph.module, graph.needed)
    with torch.no_grad():
        cap.run(x)
    return cap.values

"""The model as a torch.fx graph: which nodes depend on the target layer's output, and one forward
per batch that keeps the values those nodes need (the funnel and replay methods work on these)."""
from __future__ import annotations

import operator
import os
import traceback
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

# Nodes whose value is metadata of a tensor (its shape), not a function of its values: they do
# not carry a change of the target's output.
_STATIC_METHODS = {"size", "dim", "numel", "type", "__len__"}
_STATIC_FUNCTIONS = {getattr, len}


def _is_static(node: fx.Node, static: set) -> bool:
    if node.op == "call_method" and node.target in _STATIC_METHODS:
        return True
    if node.op == "call_function" and node.target in _STATIC_FUNCTIONS:
        return True
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] in static:
        return True
    return False


def _where(exc: BaseException) -> str:
    """The last frame of the user's code in an exception's traceback: 'file:line: code'."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
              and "weightablate" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}: `{(f.line or '').strip()}`"


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


def trace(model: nn.Module, name: str) -> Graph:
    """Trace ``model`` with torch.fx; a model that cannot be traced raises ValueError naming the construct."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; all mean "not traceable"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model: torch.fx cannot trace its forward{_where(exc)} ({type(exc).__name__}: {msg}); "
                         "the replay path needs a forward without data-dependent control flow (an if/for on "
                         "tensor values); a Linear target with a closed-form head does not need tracing") from None
    nodes = list(gm.graph.nodes)
    hits = [n for n in nodes if n.op == "call_module" and n.target == name]
    if not hits:
        raise ValueError(f"layer {name!r} is not called in the traced forward of the model")
    if len(hits) > 1:
        raise ValueError(f"layer {name!r} runs more than once per forward pass (shared weights): "
                         "zeroing one weight is then not a rank-one change")
    target = hits[0]
    out = next(n for n in nodes if n.op == "output")
    logits = out.args[0]
    if not isinstance(logits, fx.Node):
        raise TypeError(f"model: forward must return a logits tensor (N, C), got {type(logits).__name__}")
    static, dep, batched = set(), {target}, set()
    for n in nodes:
        if _is_static(n, static):
            static.add(n)
            continue
        ins = n.all_input_nodes
        if n.op == "placeholder" or any(a in batched for a in ins):
            batched.add(n)
        if n is not target and n.op != "output" and any(a in dep for a in ins):
            dep.add(n)
    dependent = [n for n in nodes if n in dep]
    needed = set(dependent) | {a for n in dependent for a in n.all_input_nodes} | {logits}
    return Graph(gm, target, nodes, dependent, needed, batched, logits)


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

"""Graph-level helpers every pass shares: copy, sizes (static or symbolic), graph inputs."""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher

from .. import ops
from ..torch_compat import FAKE_PROP_NEEDS_PYTHON_DISPATCHER
from .sites import Site, recorded, value

Size = "int | sympy.Expr"  # a size the pass compares without guarding: an int or a symbol's expression
SizeArg = "int | fx.Node"  # a size as a node argument: an int, or a node that computes it


class Unsupported(Exception):
    """A block the pass cannot rewrite (an op no dimension rule covers, a size no input carries):
    the site stays dense, with this as the reason. Here, not in dims.py, so that dims can use
    these helpers without an import cycle; dims re-exports it."""


def static(size) -> Size:
    """An int, or (for a dynamic dim) the expression of its symbol. Comparing these never asks
    Dynamo's shape environment anything, so the pass adds no guard."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def hint(size) -> int:
    """The size of the example Dynamo traced with (for a dynamic dim: its symbol's hint)."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def shape_of(node: fx.Node) -> tuple:
    v = value(node)
    if v is None:
        raise Unsupported(f"{node.name} has no shape")
    return tuple(static(s) for s in v.shape)


@dataclass
class GraphInputs:
    """Per-graph nodes every site shares."""
    valid: fx.Node | None  # (B, L) bool: real tokens
    batch: Size
    seq_len: Size
    batch_arg: SizeArg  # the same sizes as node arguments
    seq_arg: SizeArg
    seq_source: tuple[int, int | None] | int  # where a call finds L: (input index, dim) or the int
    seq_example: "int | torch.SymInt"  # L as Dynamo recorded it (the rows of per-position slots)
    example: tuple[int, int] = (0, 0)  # B and L of the example Dynamo traced with (a dynamic graph's hints)


def call(g: fx.Graph, fn, *args, name: str, **kwargs) -> fx.Node:
    node = g.call_function(fn, args, kwargs)
    node.name = g._graph_namespace.create_name(name, None)
    return node


def mul(g: fx.Graph, a: SizeArg, b: SizeArg, name: str) -> SizeArg:
    """a * b as an argument: an int when both are ints, else a node."""
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    return call(g, operator.mul, a, b, name=name)


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite: Dynamo reads its own graph again after the backend returns."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


def input_device(example_inputs: list) -> torch.device:
    """The device a graph runs on: that of its first tensor input."""
    return next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


def real_tensors(gm: fx.GraphModule, example_inputs: list,
                 memo: dict | None = None) -> Callable[[fx.Node], torch.Tensor | None]:
    """A graph node -> the real tensor behind it (a placeholder's example input, a get_attr's
    attribute, or a view or rows of those that unfuse.py made: computed once per weight and version
    in `memo`, so that every graph of a model shares it)."""
    index = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    memo = {} if memo is None else memo

    def real(node: fx.Node) -> torch.Tensor | None:
        if node.op == "placeholder" and node.name in index:
            t = example_inputs[index[node.name]]
        elif node.op == "get_attr":
            t = getattr(gm, node.target, None)
        elif node.meta.get("pp_weight"):
            return _computed(node, real, memo)
        else:
            return None
        real_tensor = isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)
        return t if real_tensor else None

    return real


def _computed(node: fx.Node, real, memo: dict) -> torch.Tensor | None:
    args = [real(a) if isinstance(a, fx.Node) else a for a in node.args]
    if any(a is None for a in args):
        return None
    key = ("pp_weight", str(node.target),
           tuple((id(a), a._version) if isinstance(a, torch.Tensor) else repr(a) for a in args))
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = (args, node.target(*args))  # the args held: their ids stay theirs
    return hit[1]


class NodeFailed(Exception):
    """A node of a rewritten graph that does not run on the graph's example values."""

    def __init__(self, node: fx.Node):
        super().__init__(f"{node.name} does not run")
        self.node = node


def refresh_values(gm: fx.GraphModule) -> None:
    """Recompute every node's recorded value (meta "val" and "example_value") by running the
    rewritten graph on the fake values of its inputs, so that a rewritten node's meta stays true
    (a compact projection's output has the kept width, not the dense one). A node that does not
    run raises NodeFailed, its cause chained."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    args = [recorded(n) for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [a for a in args if isinstance(a, FakeTensor)]
    if not fakes or any(a is None for a in args):  # a graph without fake values (built by hand)
        return
    mode = fakes[0].fake_mode  # Dynamo's; the slots' values may be in the backend's (same shapes)

    def in_mode(a):
        if not isinstance(a, FakeTensor) or a.fake_mode is mode:
            return a
        with mode:
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)

    before = {n: recorded(n) for n in gm.graph.nodes}

    class Prop(FakeTensorProp):
        def get_attr(self, target, args, kwargs):  # constants the pass made (static policies' slices)
            t = super().get_attr(target, args, kwargs)
            # static shapes: a constant's sizes are its own (symbols for them made every op after
            # it reason symbolically: seconds per graph of sympy for nothing)
            return mode.from_tensor(t, static_shapes=True) \
                if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) else t

        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception as err:
                # An op whose meta function needs a guard (suppressed here; Dynamo could add it when
                # it traced): a node whose inputs kept their recorded shapes keeps its recorded value.
                old = before.get(n)
                if old is None or not all(_same_shape(self.env.get(a), before.get(a)) for a in n.all_input_nodes):
                    raise NodeFailed(n) from err
                n.meta["val"] = old
                return old

    # Recording values must not constrain the graph: guards it would add stay out of Dynamo's.
    shape_env = mode.shape_env
    with shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext(), \
            enable_python_dispatcher() if FAKE_PROP_NEEDS_PYTHON_DISPATCHER else contextlib.nullcontext():
        Prop(gm, mode).propagate_dont_convert_inputs(*map(in_mode, args))
    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]


def _same_shape(new, old) -> bool:
    """Two recorded values of one node have the same shape (symbolic sizes compared as expressions,
    with no guard); non-tensors compare as they are."""
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        return [str(d) for d in new.shape] == [str(d) for d in old.shape]
    return not isinstance(new, torch.Tensor) and not isinstance(old, torch.Tensor)


def body_start(g: fx.Graph) -> fx.Node:
    """The first node after the placeholders: graph-wide nodes go before it."""
    return next(n for n in g.nodes if n.op != "placeholder")


def size_source(g: fx.Graph, size: Size) -> tuple[fx.Node | int, tuple[int, int | None] | int]:
    """How the graph gets `size` (an int, or a node), and how a call finds it among the graph's
    inputs ((input index, dim); dim None: the input is the size itself)."""
    if isinstance(size, int):
        return size, size
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    for i, p in enumerate(placeholders):  # Dynamo passes each free symbol as an input of its own
        v = recorded(p)
        if isinstance(v, torch.SymInt) and static(v) == size:
            return p, (i, None)
    for i, p in enumerate(placeholders):
        v = value(p)
        if v is not None:
            for d, s in enumerate(v.shape):
                if static(s) == size:
                    with g.inserting_before(body_start(g)):
                        node = g.call_method("size", (p, d))
                    node.meta["example_value"] = s
                    return node, (i, d)
    raise Unsupported(f"no graph input carries the dynamic size {size}")


def graph_inputs(gm: fx.GraphModule, sites: list[Site]) -> GraphInputs:
    """Batch and sequence length from the blocks' inputs; the real tokens (B, L) from the attention
    mask if there is one. A graph whose blocks all read (T, hidden), a serving engine's step of
    T tokens packed from many requests (vLLM), is one sequence of T tokens: batch 1, length T."""
    examples = [value(s.x_res).shape[:2] for s in sites if value(s.x_res).dim() == 3]
    if not examples:
        return _token_stream(gm, sites)
    batch, seq_len = (static(s) for s in examples[0])
    g = gm.graph
    batch_arg, _ = size_source(g, batch)
    seq_arg, seq_source = size_source(g, seq_len)
    mask = _attention_mask(g, examples[0])
    valid = None
    if mask is not None:
        with g.inserting_before(body_start(g)):
            valid = call(g, torch.ne, mask, 0, name="pp_valid") if value(mask).dim() == 2 else \
                call(g, ops.mask_valid, mask, seq_arg, name="pp_valid")  # a 4-d mask made before the call
    return GraphInputs(valid, batch, seq_len, batch_arg, seq_arg, seq_source, examples[0][1],
                       tuple(hint(s) for s in examples[0]))


def _token_stream(gm: fx.GraphModule, sites: list[Site]) -> GraphInputs:
    """The inputs of a graph of (T, hidden) blocks: one sequence of T tokens, all real."""
    streams = [value(s.x_res).shape[0] for s in sites if value(s.x_res).dim() == 2]  # T as recorded
    lengths = {static(t) for t in streams}
    if len(lengths) != 1:
        raise Unsupported("no block input of shape (batch, sequence, hidden) or (tokens, hidden)" if not lengths
                          else f"blocks read token streams of different lengths {sorted(map(str, lengths))}")
    (tokens,) = lengths
    seq_arg, seq_source = size_source(gm.graph, tokens)
    return GraphInputs(None, 1, tokens, 1, seq_arg, seq_source, streams[0], (1, hint(streams[0])))


def _attention_mask(g: fx.Graph, batch_seq) -> fx.Node | None:
    """The attention_mask input: (B, L), or else (B, 1|H, L, K >= L) as generate passes it.
    Dynamo may give the mask's dims symbols of their own (it cannot know they equal the ids'):
    it is matched by the sizes of the example, and the compiled graph checks they agree."""
    b, L = (hint(s) for s in batch_seq)
    two_d = four_d = None
    for n in g.nodes:
        v = value(n)
        if n.op != "placeholder" or "attention_mask" not in n.name or v is None:
            continue
        shape = [hint(s) for s in v.shape]
        if shape == [b, L]:
            two_d = n
        elif four_d is None and v.dim() == 4 and shape[0] == b and shape[2] == L and shape[3] >= L:
            four_d = n
    return two_d if two_d is not None else four_d


def final_input(g: fx.Graph, site: Site, gi: GraphInputs, tag: str) -> fx.Node:
    """The final projection's input as (B, L, C) (OPT's MLP runs on (B*L, d))."""
    x = site.final.args[0]
    if _dims(x) == 2:
        with g.inserting_after(x):
            x = call(g, torch.reshape, x, (gi.batch_arg, gi.seq_arg, -1), name=f"{tag}_final_in")
    return x


def _dims(x: fx.Node) -> int:
    """A node's dims; one the pass made (no recorded value yet) has its first input's: the final
    projection's kept input (rewrite.compact_final) selects along the last dim only."""
    return value(x).dim() if value(x) is not None else _dims(x.args[0])

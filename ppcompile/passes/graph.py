"""Graph-level helpers every pass shares: copy, graph inputs, new placeholders, extra outputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .dims import Unsupported
from .sites import Site, value


@dataclass
class GraphInputs:
    """Per-graph nodes every site shares."""
    valid: fx.Node | None  # (B, L) bool: real tokens
    batch: int
    seq_len: int


def call(g: fx.Graph, fn, *args, name: str, **kwargs) -> fx.Node:
    node = g.call_function(fn, args, kwargs)
    node.name = g._graph_namespace.create_name(name, None)
    return node


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite: Dynamo reads its own graph again after the backend returns."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


def input_device(example_inputs: list) -> torch.device:
    """The device a graph runs on: that of its first tensor input."""
    return next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


def body_start(g: fx.Graph) -> fx.Node:
    """The first node after the placeholders: graph-wide nodes go before it."""
    return next(n for n in g.nodes if n.op != "placeholder")


def graph_inputs(gm: fx.GraphModule, sites: list[Site]) -> GraphInputs:
    """Batch and sequence length from the blocks' inputs; the (B, L) attention mask if there is one."""
    shapes = [tuple(value(s.x_res).shape[:2]) for s in sites if value(s.x_res).dim() == 3]
    if not shapes:
        raise Unsupported("no block input of shape (batch, sequence, hidden)")
    batch, seq_len = shapes[0]
    g = gm.graph
    mask = None
    for n in g.nodes:
        v = value(n)
        if n.op == "placeholder" and "attention_mask" in n.name and v is not None \
                and tuple(v.shape) == (batch, seq_len):
            mask = n
    valid = None
    if mask is not None:
        with g.inserting_before(body_start(g)):
            valid = call(g, torch.Tensor.bool, mask, name="pp_valid")
    return GraphInputs(valid=valid, batch=batch, seq_len=seq_len)


class Placeholders:
    """New graph inputs appended after the original ones, in the order the backend passes them."""

    def __init__(self, g: fx.Graph):
        self.g = g
        self.nodes: list[fx.Node] = []
        self._last = [n for n in g.nodes if n.op == "placeholder"][-1]

    def add(self, name: str) -> fx.Node:
        with self.g.inserting_after(self.nodes[-1] if self.nodes else self._last):
            self.nodes.append(self.g.placeholder(name))
        return self.nodes[-1]


def final_input(g: fx.Graph, site: Site, gi: GraphInputs, tag: str) -> fx.Node:
    """The final projection's input as (B, L, C) (OPT's MLP runs on (B*L, d))."""
    x = site.final.args[0]
    if value(x).dim() == 2:
        with g.inserting_after(x):
            x = call(g, torch.Tensor.view, x, gi.batch, gi.seq_len, -1, name=f"{tag}_final_in")
    return x


def add_outputs(g: fx.Graph, extra: list[fx.Node]) -> int:
    """Append `extra` to the graph's outputs (as outputs, no pass drops them as dead code);
    return how many outputs the graph had before."""
    out_node = next(n for n in g.nodes if n.op == "output")
    outputs = out_node.args[0]
    outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    if extra:
        out_node.args = (outs + tuple(extra),)
    return len(outs)

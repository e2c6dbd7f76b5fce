"""Outline: move a group of nodes into a subgraph called through `invoke_subgraph`.

Every pruned site adds the same selection computation (probe -> score -> top-k -> weight gathers);
only its inputs differ from layer to layer. Inlined, Inductor lowers, schedules and compiles it
once per site, so compile time grows with depth. Outlined, the groups with the same code and the
same input shapes share one identifier, and Inductor compiles that subgraph once per graph.

Invariants: the group's values and their order are unchanged (the subgraph is a copy of the
nodes); a group that reads a value other than a tensor or a dynamic size is left inline.
"""
from __future__ import annotations

import hashlib
import operator
import re

import torch
from torch import fx

from .graph import call
from .sites import recorded, value


class Outliner:
    """Outlines groups of one graph; groups with identical code and input shapes share a subgraph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.subgraphs: dict[str, str] = {}  # key -> attribute name of the shared subgraph

    def outline(self, nodes: list[fx.Node], tag: str, kind: str) -> bool:
        """Replace `nodes` (in graph order; their names start with `tag`) by one call; False (and
        nothing changed) when the group reads a value that is not a tensor. Inside the subgraph,
        names say `kind` instead of the site, so that every layer's group reads the same."""
        inside = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        if any(not _tensor_or_unknown(a) for a in inputs):
            return False
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        attr = self._shared(nodes, inputs, outputs, tag, kind)
        g = self.gm.graph
        with g.inserting_before(nodes[0]):
            fn = g.get_attr(attr)
            fn.name = g._graph_namespace.create_name(f"{tag}_select_fn", None)
            result = call(g, torch.ops.higher_order.invoke_subgraph, fn, attr, *inputs, name=f"{tag}_select_call")
            outs = [call(g, operator.getitem, result, i, name=f"{o.name}_out") for i, o in enumerate(outputs)]
        for o, new in zip(outputs, outs):
            o.replace_all_uses_with(new)
        for n in reversed(nodes):
            g.erase_node(n)
        for o, new in zip(outputs, outs):  # the outputs keep their names (theirs are free now)
            new.name = o.name
        return True

    def _shared(self, nodes, inputs, outputs, tag: str, kind: str) -> str:
        """The attribute of the subgraph for this group: keyed by its code with neutral names
        (names never decide sharing) and the shapes of its inputs."""
        neutral = _subgraph(self.gm, nodes, inputs, outputs, lambda i, n: f"v{i}")
        # Inputs the pass made (history, valid) have no recorded value; their shapes follow from the
        # graph's batch and sequence and from the site's weights, whose shapes are in the key.
        shapes = [(tuple(v.shape), v.dtype) if isinstance(v := value(a), torch.Tensor) else None for a in inputs]
        key = hashlib.sha1(f"{neutral.code}\n{shapes}".encode()).hexdigest()
        if key not in self.subgraphs:
            attr = f"pp_{kind}_select_{len(self.subgraphs)}"
            self.gm.register_module(attr, _subgraph(self.gm, nodes, inputs, outputs,
                                                    lambda i, n: _readable(n.name, tag, kind)))
            self.subgraphs[key] = attr
        return self.subgraphs[key]


def _subgraph(root: fx.GraphModule, nodes, inputs, outputs, name) -> fx.GraphModule:
    sub = fx.Graph()
    env = {a: sub.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    for i, n in enumerate(nodes):
        env[n] = sub.node_copy(n, lambda a: env[a])
        env[n].name = sub._graph_namespace.create_name(name(i, n), None)
    sub.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, sub)


def _readable(name: str, tag: str, kind: str) -> str:
    """model_layers_3_attention_probe_linear_12 -> attention_probe_linear: no layer's numbers and
    none of the numbers the namespace added to repeated names (it adds its own in the subgraph)."""
    if name.startswith(tag):
        name = kind + name[len(tag):]
    return re.sub(r"_\d+(?=_|$)", "", name)


def _tensor_or_unknown(n: fx.Node) -> bool:
    """A node Dynamo recorded a tensor or a dynamic size for, or one the pass made (no record;
    a tensor or a size node)."""
    v = recorded(n)
    return v is None or isinstance(v, (torch.Tensor, torch.SymInt))

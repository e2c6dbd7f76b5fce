"""Outline: move a group of nodes into a subgraph called through `invoke_subgraph`.

Decoder layers repeat: inlined, Inductor lowers, fuses, generates and compiles the same code once
per layer, so compile time grows with depth, and a pruned layer (probe, selection, compact
matmuls, history) has more of it than a dense one. Outlined, the groups with the same code and
the same input shapes share one identifier, and Inductor compiles that subgraph once per graph.
Two granularities, the coarser first: each decoder layer, in segments (`layer_segments`); then,
where a layer could not be outlined, each site's selection (probe -> score -> top-k -> weight
gathers).

Invariants: the group's values are unchanged (the subgraph is a copy of the nodes); no group
holds a node that writes in place; a write in place between a group's nodes writes graph inputs
(or views of them) only, none of the group's nodes after it reads them, and none before it views
them (so every read sees what it saw inline); a group that reads a value other than a tensor or a
dynamic size, or a value made after its first node by a node outside it, is left inline.
"""
from __future__ import annotations

import hashlib
import operator
import re

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from .additive_mask import additive_masks
from .graph import call
from .sites import layer_of, recorded, value


class Outliner:
    """Outlines groups of one graph; groups with identical code and input shapes share a subgraph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.subgraphs: dict[str, str] = {}  # key -> attribute name of the shared subgraph

    def outline(self, nodes: list[fx.Node], tag: str, kind: str, role: str = "select") -> bool:
        """Replace `nodes` (in graph order; their names start with `tag`) by one call; False (and
        nothing changed) when the group reads a value that is not a tensor, or one made after its
        first node by a node outside it. Inside the subgraph, names say `kind` instead of `tag`, so
        that every layer's group reads the same."""
        inside = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        if any(not _tensor_or_unknown(a) for a in inputs) or not _made_before(inputs, nodes[0]):
            return False
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        attr = self._shared(nodes, inputs, outputs, tag, kind, role)
        g = self.gm.graph
        with g.inserting_before(nodes[0]):
            fn = g.get_attr(attr)
            fn.name = g._graph_namespace.create_name(f"{tag}_{role}_fn", None)
            result = call(g, torch.ops.higher_order.invoke_subgraph, fn, attr, *inputs, name=f"{tag}_{role}_call")
            outs = [call(g, operator.getitem, result, i, name=f"{o.name}_out") for i, o in enumerate(outputs)]
        for o, new in zip(outputs, outs):
            o.replace_all_uses_with(new)
        for n in reversed(nodes):
            g.erase_node(n)
        for o, new in zip(outputs, outs):  # the outputs keep their names (free now) and records
            new.name = o.name
            new.meta.update(o.meta)
        return True

    def _shared(self, nodes, inputs, outputs, tag: str, kind: str, role: str) -> str:
        """The attribute of the subgraph for this group: keyed by its code with neutral names
        (names never decide sharing) and the shapes of its inputs."""
        neutral = _subgraph(nodes, inputs, outputs, lambda i, n: f"v{i}")  # its code only: no module
        # Inputs the pass made (history, valid) have no recorded value; their shapes follow from the
        # graph's batch and sequence and from the site's weights, whose shapes are in the key.
        shapes = [(tuple(v.shape), v.dtype) if isinstance(v := value(a), torch.Tensor) else None for a in inputs]
        key = hashlib.sha1(f"{neutral.python_code('self').src}\n{shapes}".encode()).hexdigest()
        if key not in self.subgraphs:
            attr = f"pp_{kind}_{role}_{len(self.subgraphs)}"
            sub = _subgraph(nodes, inputs, outputs, lambda i, n: _readable(n.name, tag, kind))
            self.gm.register_module(attr, fx.GraphModule(self.gm, sub))
            self.subgraphs[key] = attr
        return self.subgraphs[key]


def cpp_wrapper() -> bool:
    """Inductor writes its C++ wrapper (TORCHINDUCTOR_CPP_WRAPPER=1), which has no code for a call
    of a subgraph (torch 2.13): nothing is outlined for it."""
    from torch._inductor import config
    return bool(config.cpp_wrapper)


def outlined(gm: fx.GraphModule, selections: list[tuple[list[str], str, str]],
             layer_of_site: dict[str, str] | None = None) -> fx.GraphModule:
    """`gm` (a rewritten graph, nothing outlined), its repeated code outlined in place: given
    `layer_of_site` (each site's tag -> its layer's tag), each decoder layer's segments first (what
    Inductor compiles: see the module's docstring), a boolean mask the layers share made additive
    before them (additive_mask.py); then each selection in `selections` ((its
    nodes' names, its site's tag, its kind)) that no segment took."""
    by_name = {n.name: n for n in gm.graph.nodes}
    outliner = Outliner(gm)
    if layer_of_site is not None:
        additive_masks(gm.graph)  # made once for all layers, not once in each layer's subgraph
        for nodes, tag in layer_segments(gm.graph, layer_of_site):
            outliner.outline(nodes, tag, "layer", "segment")
    for names, tag, kind in selections:
        nodes = [by_name[name] for name in names]
        if not any(n._erased for n in nodes):
            outliner.outline(nodes, tag, kind)
    gm.graph.lint()
    gm.recompile()
    return gm


def layer_segments(g: fx.Graph, layer_of_tag: dict[str, str]) -> list[tuple[list[fx.Node], str]]:
    """Each decoder layer's nodes (by module path, or, for the nodes the pass made, by the site tag
    their names hold: `layer_of_tag` maps a site's tag to its layer's tag), in graph order, in
    segments of at least `_MIN_SEGMENT` nodes: (nodes, layer tag) per segment. Outline these before
    any selection: Inductor does not lower a subgraph that calls another.

    A segment's call stands where its first node stood, so a node between its first and last
    nodes that it does not hold runs after all of them. A write in place of graph inputs only
    (`_inputs_written`: a prefill's stores, a history's update) stays outside and the segment goes
    on across it, unless the segment holds a view of what it writes; a later node that reads what
    it wrote (or its result, or anything else made after the segment opened) starts a new segment.
    Any other write in place and every collective cut every open segment."""
    pos = {n: i for i, n in enumerate(g.nodes)}
    open_: dict[str, _Segment] = {}
    segments: list[tuple[list[fx.Node], str]] = []
    # a site's tag anywhere in a name: the pass's nodes start with it, or with a slot's family
    # (`stored_<tag>_q_w_t`); the `_` after it keeps layer 3's tag out of layer 30's names
    site_in_name = re.compile(r"(?:^|_)(" + "|".join(map(re.escape, layer_of_tag)) + r")_") if layer_of_tag else None

    def close(tag):
        nodes = open_.pop(tag).nodes
        if len(nodes) >= _MIN_SEGMENT:
            segments.append((nodes, tag))

    for n in g.nodes:
        if n.op in ("placeholder", "output"):
            continue
        written = _inputs_written(n)
        if written is not None:
            for tag, seg in list(open_.items()):
                if any(_aliases(m, w) for m in seg.nodes for w in written):
                    close(tag)
                else:
                    seg.written.extend(written)
            continue
        if _cuts(n):
            for tag in list(open_):
                close(tag)
            continue
        tag = _layer_tag(n, layer_of_tag, site_in_name)
        if tag is None:
            continue
        if tag in open_ and open_[tag].must_end_before(n, pos):
            close(tag)
        open_.setdefault(tag, _Segment(pos[n])).add(n)
    for tag in list(open_):
        close(tag)
    return segments


_MIN_SEGMENT = 4  # fewer nodes than this stay inline: nothing to share


class _Segment:
    def __init__(self, start: int):
        self.start, self.nodes, self.members = start, [], set()
        self.written: list[fx.Node] = []  # graph inputs written in place since it opened (outside it)

    def add(self, n: fx.Node) -> None:
        self.nodes.append(n)
        self.members.add(n)

    def must_end_before(self, n: fx.Node, pos: dict[fx.Node, int]) -> bool:
        """`n` reads a value made after the segment opened by a node outside it (the call, where
        its first node stood, would run before that value exists), or a tensor written since."""
        return any((a not in self.members and pos[a] > self.start) or any(_aliases(a, w) for w in self.written)
                   for a in n.all_input_nodes)


def _layer_tag(n: fx.Node, layer_of_tag: dict[str, str], site_in_name: re.Pattern | None) -> str | None:
    if n.op == "get_attr":  # constants differ per layer: they enter a shared subgraph as inputs
        return None
    info = layer_of(n)
    if info is not None:
        return info[0].replace(".", "_")
    m = site_in_name.search(n.name) if site_in_name else None
    return layer_of_tag[m.group(1)] if m else None


def _writes(n: fx.Node) -> list | None:
    """What `n` writes in place: [] for nothing; the tensors, where they are known (an op's schema,
    an in-place method's self, `x[i] = y`'s x); None where it may write what cannot be named (a
    module, which may hold state; a higher-order op but invoke_subgraph; a mutable op whose schema
    names nothing written; a function named like an in-place one)."""
    if n.op == "call_method":
        return [n.args[0]] if n.target.endswith("_") else []
    if n.op != "call_function":
        return None if n.op == "call_module" else []
    if n.target is operator.setitem:
        return [n.args[0]]
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        if not schema.is_mutable:
            return []
        written = [n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                   for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        return written or None
    if isinstance(n.target, torch._ops.HigherOrderOperator):
        return [] if n.target is torch.ops.higher_order.invoke_subgraph else None
    return None if getattr(n.target, "__name__", "").endswith("_") else []


def _inputs_written(n: fx.Node) -> list[fx.Node] | None:
    """The graph inputs `n` writes in place, where it writes only graph inputs or views of them and
    `_writes` names them (a prefill's stores into its slots, a history's update); else None. Never
    a collective."""
    written = _writes(n)
    if not written or _collective(n):
        return None
    inputs = [_input_viewed(t) for t in written]
    return inputs if all(t is not None for t in inputs) else None


def _input_viewed(t) -> fx.Node | None:
    """The graph input `t` is, or is a view of (through ops whose schema says that their result
    aliases their first argument, and that they write nothing); else None."""
    while isinstance(t, fx.Node) and t.op == "call_function":
        schema = getattr(t.target, "_schema", None)
        if schema is None or schema.is_mutable or not schema.returns or schema.returns[0].alias_info is None:
            return None
        t = t.args[0]
    return t if isinstance(t, fx.Node) and t.op == "placeholder" and value(t) is not None else None


def _aliases(n: fx.Node, written: fx.Node) -> bool:
    """`n`'s value shares memory with the graph input `written` (it is the input or a view of
    it), by their recorded fake values; a node with no recorded tensor is assumed to."""
    if n is written:
        return True
    v = recorded(n)
    if isinstance(v, (tuple, list)):
        return any(isinstance(t, torch.Tensor) and _same_storage(t, value(written)) for t in v)
    if v is None:
        return any(_aliases(a, written) for a in n.all_input_nodes)
    return isinstance(v, torch.Tensor) and _same_storage(v, value(written))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())
    except (NotImplementedError, RuntimeError):  # no storage to compare (a sparse or subclass tensor): assume so
        return True


def _cuts(n: fx.Node) -> bool:
    """A node no segment holds or spans: one that writes in place what `_inputs_written` does not
    take, or a collective (every rank runs them in the order traced; Inductor schedules them itself)."""
    return _collective(n) or _writes(n) != []


def _collective(n: fx.Node) -> bool:
    op = getattr(n.target, "_qualified_op_name", None) or getattr(getattr(n.target, "_schema", None), "name", "")
    return n.op == "call_function" and op.split("::")[0] in ("_c10d_functional", "c10d")


def _made_before(inputs: list[fx.Node], first: fx.Node) -> bool:
    """Every input is made before `first`, where the call will stand."""
    later = set()
    n = first
    while n is not None and n.op != "root":
        later.add(n)
        n = n.next
    return not any(a in later for a in inputs)


def _subgraph(nodes, inputs, outputs, name) -> fx.Graph:
    sub = fx.Graph()
    env = {a: sub.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    for a in inputs:  # what Dynamo recorded: the AOT autograd cache's check reads it (a tensor's method)
        env[a].meta.update({k: a.meta[k] for k in ("example_value", "val") if k in a.meta})
    for i, n in enumerate(nodes):
        env[n] = sub.node_copy(n, lambda a: env[a])
        env[n].name = sub._graph_namespace.create_name(name(i, n), None)
    sub.output(tuple(env[o] for o in outputs))
    return sub


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

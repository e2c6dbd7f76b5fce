"""Find the attention and MLP blocks of a Dynamo graph, by op pattern and module path.

A *site* is one block: its first projections (q/k/v, gate/up, fc1), the ops between them and the
input of its final projection (o_proj, down_proj, fc2), and the residual its input norm reads.
Nothing here is model-specific: a block is whatever lies between a set of linears that read one
normed input and the linear that closes it; attention is the block whose region holds an sdpa.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from .opsets import NORM_PARTS
from .status import PRUNED, Dense, Pruned, Reason

LINEAR = {torch._C._nn.linear, F.linear}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
_ROOT = re.compile(r"^L\['(?:self|args)'\](?:\[\d+\])?\.?")
_LAYER = re.compile(r"^(.*?\.(\d+))(?:\.|$)")


@dataclass
class Site:
    name: str  # "<layer path>.attention" / "<layer path>.mlp"
    kind: str  # "attention" | "mlp"
    layer: int
    final: fx.Node  # the final projection (linear)
    projections: list[fx.Node]  # first projections, all reading `x`
    x: fx.Node  # the normed block input
    x_res: fx.Node  # the pre-norm residual (ranks tokens for the probe)
    region: list[fx.Node]  # nodes between the projections and the final projection, in graph order
    channels: int  # C: input width of the final projection
    sdpa: fx.Node | None = None
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    status: Pruned | Dense = PRUNED  # or Dense(<reason>): status.py
    kept: int = 0  # heads (attention) or channels (MLP) kept
    qkv: dict[str, fx.Node] = field(default_factory=dict)  # attention: "q"/"k"/"v" -> its projection
    all_reduce: str | None = None  # a tensor-parallel shard: the group whose all-reduce sums its output
    batch: object = 0  # the graph's batch and sequence sizes (ints, or symbols of a dynamic graph)
    seq_len: object = 0
    pruned_flops: float = 0.0  # the fraction of the block's projection FLOPs a call prunes
    selected_by: str | None = None  # what chose its units, a pruned site's (select.PROBE, select.WHOLE_BATCH, ...)

    @property
    def pruned(self) -> bool:
        return self.status is PRUNED

    @property
    def units(self) -> int:
        """Heads (attention) or channels (MLP): what the pass keeps some of."""
        return self.heads or self.channels

    def leave_dense(self, reason: Reason, detail: str = "") -> None:
        self.status, self.kept = Dense(reason, detail), self.units


@dataclass(frozen=True)
class Unmatched:
    """A block of a decoder layer the pass found no site for."""
    name: str
    layer: int
    kind: str
    status: Dense


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return _ROOT.sub("", list(stack.values())[-1][0]) if stack else ""


def module_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))


def layer_of(node: fx.Node) -> tuple[str, int] | None:
    m = _LAYER.match(module_path(node))
    return (m.group(1), int(m.group(2))) if m else None


def recorded(node: fx.Node):
    """The example value Dynamo recorded for a node (any type), or None for a node the pass made."""
    return node.meta.get("example_value", node.meta.get("val"))


def value(node) -> torch.Tensor | None:
    v = recorded(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR


# In-place writes of a computed tensor into another (a static KV cache's update): op -> the
# position of the written tensor among its arguments.
_WRITES = {"index_copy_": 3, "copy_": 1, operator.setitem: 2}


def written(node: fx.Node) -> fx.Node | None:
    """The tensor `node` writes into its first argument in place (a cache update), or None."""
    pos = _WRITES.get(node.target) if node.op in ("call_method", "call_function") else None
    if pos is None or len(node.args) <= pos or not isinstance(node.args[pos], fx.Node):
        return None
    return node.args[pos]


def writers(node: fx.Node) -> list[fx.Node]:
    """The nodes that write into `node` in place: a KV cache read after its update carries what
    was written, though no edge of the graph says so."""
    return [u for u in node.users if u.args and u.args[0] is node and written(u) is not None]


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """What `node`'s value depends on: its inputs, and what was written into it in place."""
    return list(node.all_input_nodes) + writers(node)


def _region(final: fx.Node, layer: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """Walk up from the final projection's input, inside its layer, to the first linears."""
    seen: set[fx.Node] = set()
    projections: list[fx.Node] = []
    stack = [final.args[0]]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n.op in ("placeholder", "get_attr"):
            stack.extend(writers(n))  # weights and buffers are side inputs; a cache carries its writes
            continue
        seen.add(n)
        info = layer_of(n)
        if info is None or info[0] != layer:  # model-level inputs (rotary, mask): side inputs
            seen.discard(n)
            continue
        if is_linear(n):
            projections.append(n)
            continue
        stack.extend(data_inputs(n))
    region = [n for n in final.graph.nodes if n in seen and n not in projections]
    return projections, region


def _residual(x: fx.Node) -> fx.Node:
    """The tensor a pre-norm reads: the one input from outside the norm module that makes x."""
    if "norm" not in module_class(x).lower():
        return x
    path, seen, stack, outside = module_path(x), set(), [x], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a.op == "placeholder" or value(a) is None:
                continue  # the norm's own weights
            (stack if module_path(a) == path else outside).append(a)
    return outside[0] if len(set(outside)) == 1 else x


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[Unmatched], int]:
    """All blocks the pass can rewrite, every decoder layer's block it found no site for, and the
    number of decoder layers in the graph."""
    sites: list[Site] = []
    problems: list[Unmatched] = []
    layers: dict[str, int] = {}
    opaque: dict[int, str] = {}  # layer -> the opaque attention op it calls
    for node in gm.graph.nodes:
        info = layer_of(node)
        if info:
            layers.setdefault(*info)
            if _opaque_attention(node):
                opaque.setdefault(info[1], str(node.target))
        if not is_linear(node) or info is None or value(node.args[0]) is None:
            continue
        projections, region = _region(node, info[0])
        if not projections or not region:
            continue
        sdpas = [n for n in region if n.op == "call_function" and n.target in SDPA]
        eager_attention = not sdpas and any(n.target in SOFTMAX for n in region)
        opaque_op = next((n for n in region if _opaque_attention(n)), None)
        kind = "attention" if sdpas or eager_attention or opaque_op is not None else "mlp"
        if kind == "mlp" and any(_is_reduction(n) for n in region):
            continue  # a norm between linears: not a block's final projection
        xs = {p.args[0] for p in projections}
        site = Site(name=f"{info[0]}.{kind}", kind=kind, layer=info[1], final=node,
                    projections=projections, x=next(iter(xs)), x_res=next(iter(xs)),
                    region=region, channels=value(node.args[0]).shape[-1],
                    sdpa=sdpas[0] if sdpas else None)
        # a tensor-parallel shard (tp.py): its partial output is summed over the ranks of this group
        site.all_reduce = next((u.args[2] for u in node.users if u.target in ALL_REDUCE), None)
        if opaque_op is not None:  # heads, scores and cache inside one op
            site.leave_dense(Reason.OPAQUE_ATTENTION, str(opaque_op.target))
        elif eager_attention:  # scores, softmax and matmuls written out: no rule reads heads off them
            site.leave_dense(Reason.NO_SDPA)
        elif len(xs) != 1:
            site.leave_dense(Reason.SPLIT_INPUT)
        elif len(sdpas) > 1:
            site.leave_dense(Reason.MANY_SDPA)
        else:
            site.x_res = _residual(site.x)
        if kind == "attention" and site.pruned:
            _describe_attention(site)
        sites.append(site)
    _separate(sites)
    found = {(s.layer, s.kind) for s in sites}
    for path, idx in layers.items():
        for kind in ("attention", "mlp"):
            if (idx, kind) not in found:
                status = Dense(Reason.OPAQUE_ATTENTION, opaque[idx]) if kind == "attention" and idx in opaque \
                    else Dense(Reason.UNMATCHED, kind)
                problems.append(Unmatched(f"{path}.{kind}", idx, kind, status))
    return sites, problems, len(layers)


def _opaque_attention(node: fx.Node) -> bool:
    """A custom op (not aten's) that computes attention inside it, e.g. vllm.unified_attention_with_output."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    namespace, _, name = str(t).partition(".")  # "vllm.unified_attention_with_output(.default)"
    return namespace not in ("aten", "prims") and "attention" in name


def _separate(sites: list[Site]) -> None:
    """Blocks in a chain of linears (fc1 -> fc2 -> out, a router's MLP) share a linear: the final
    projection of one is a first projection of the next. Pruning both would change that linear's
    weight twice, so the later block stays dense. A second block of one kind in a layer gets a name
    of its own (its state is kept apart by name)."""
    finals = {s.final: s for s in sites}
    names: set[str] = set()
    for s in sites:
        shared = [finals[p] for p in s.projections if p in finals]
        if shared and s.pruned:
            s.leave_dense(Reason.CHAINED, shared[0].name)
        name, k = s.name, 2
        while s.name in names:
            s.name, k = f"{name}{k}", k + 1
        names.add(s.name)


ALL_REDUCE = {torch.ops._c10d_functional.all_reduce, torch.ops._c10d_functional.all_reduce.default}
SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax, "softmax", torch.ops.aten._softmax.default)


def _is_reduction(node: fx.Node) -> bool:
    """A step of a norm (a reduction over channels, rsqrt, layer_norm): no MLP has one inside."""
    return node.target in NORM_PARTS


def _describe_attention(site: Site) -> None:
    q, k, v = (value(a) for a in sdpa_qkv(site.sdpa))
    site.head_dim = q.shape[-1]
    site.heads = site.channels // site.head_dim
    by_role = _qkv_projections(site)
    if by_role is None:
        site.leave_dense(Reason.QKV_UNKNOWN)
        return
    site.kv_heads = value(by_role["k"]).shape[-1] // site.head_dim
    if q.shape[1] != site.heads or site.heads * site.head_dim != site.channels:
        site.leave_dense(Reason.HEAD_LAYOUT)
    elif site.heads % max(site.kv_heads, 1):
        site.leave_dense(Reason.GQA_RATIO)


SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_params(sdpa: fx.Node) -> dict:
    """An attention op's arguments by name, however the call passed them."""
    return dict(zip(SDPA_PARAMS, sdpa.args)) | dict(sdpa.kwargs)


def sdpa_qkv(sdpa: fx.Node) -> list[fx.Node]:
    p = sdpa_params(sdpa)
    return [p["query"], p["key"], p["value"]]


def _qkv_projections(site: Site) -> dict[str, fx.Node] | None:
    """Which projection feeds which sdpa input: follow each input back to exactly one linear."""
    out = {}
    for role, start in zip("qkv", sdpa_qkv(site.sdpa)):
        hits = [p for p in site.projections if _reaches(p, start)]
        if len(hits) != 1:
            return None
        out[role] = hits[0]
    if len(set(out.values())) != 3 or len(site.projections) != 3:
        return None
    site.qkv = out
    return out


def _reaches(src: fx.Node, dst: fx.Node) -> bool:
    """Whether `dst`'s values depend on `src`'s (a size read off a tensor is not its values:
    Falcon's key is broadcast to `query.shape`)."""
    stack, seen = [dst], set()
    while stack:
        n = stack.pop()
        if n is src:
            return True
        if n in seen or not isinstance(n, fx.Node) or _is_size(n):
            continue
        seen.add(n)
        stack.extend(data_inputs(n))
    return False


def _is_size(node: fx.Node) -> bool:
    v = recorded(node)
    if isinstance(v, (tuple, list)) and not isinstance(v, torch.Size):
        return bool(v) and all(isinstance(s, (int, torch.SymInt)) for s in v)
    return isinstance(v, (int, torch.SymInt, torch.Size))

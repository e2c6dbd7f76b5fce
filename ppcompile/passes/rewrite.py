"""Rewrite one site: probe -> score -> select -> gather -> compact matmuls (-> history update).

Invariants every rewrite keeps:
- kept counts are Python ints; probe sizes are ints in a static graph and size nodes in a dynamic
  one, so no new node has a data-dependent shape;
- no new node reads a tensor's value on the host (no .item(), nonzero, data-dependent shapes);
- state (history, step) enters as placeholders and is updated in place inside the graph;
- a site whose ops the dimension rules do not cover is left untouched (raises Unsupported first,
  before any node is changed).
"""
from __future__ import annotations

import torch
from torch import fx

from .. import ops
from .graph import call, shape_of
from .dims import Atom, Labeler, Labels, anon, resized_args
from .sites import Site, sdpa_qkv, writers, written


def label_site(site: Site, kv_whole: bool) -> Labeler:
    """Label the block's dims from its input x: b, s from x; h/kv/c on the projections' outputs."""
    shape = shape_of(site.x)
    x_lab: Labels = ((Atom("b", shape[0]),), (Atom("s", shape[1]),), anon(shape[-1])) if len(shape) == 3 \
        else ((Atom("b", site.info["B"]), Atom("s", site.info["L"])), anon(shape[-1]))
    lab = Labeler({site.x: x_lab})
    for p in site.projections:
        out = shape_of(p)[-1]
        if site.kind == "mlp":
            dim = (Atom("c", out),)
        else:
            role = next(r for r, n in site.info["qkv"].items() if n is p)
            heads = out // site.head_dim
            name = "h" if role == "q" or not kv_whole else "kv"
            dim = (Atom(name, heads), Atom(None, site.head_dim))
        lab.labels[p] = x_lab[:-1] + (dim,)
    lab.run(site.region)
    return lab


def escapes(site: Site) -> set[fx.Node]:
    """Region nodes read by anything outside the block (e.g. K/V returned as a cache), and the
    tensors written into a cache in place."""
    inside = set(site.region) | {site.final}
    leaked = {n for n in site.region + site.projections for u in n.users if u not in inside}
    return leaked | {written(n) for n in site.region if written(n) is not None}


def probe_activation(g: fx.Graph, site: Site, lab: Labeler, p: fx.Node, kept_b: fx.Node,
                     kept_t: fx.Node, k_b, k_t, tag: str) -> fx.Node:
    """Copy the block from x to the final projection's input, run on the probe p (k_b, k_t, d)."""
    new = {"b": k_b, "s": k_t}
    env: dict[fx.Node, fx.Node] = {site.x: p}
    index = {"b": kept_b, "s": kept_t}
    for n in site.projections + site.region:  # side nodes of the region are copied as they are
        if written(n) is not None:  # the probe never writes a cache: its attention reads its own K/V
            env[n] = env[n.args[0]] = env[written(n)]
            continue
        if writers(n):  # a cache made in the graph (lazily): the probe has no use for it
            continue
        args = resized_args(n, lab.labels[n], new) if n in lab.labels else n.args

        def remap(a):
            return env.get(a, a) if isinstance(a, fx.Node) else a

        args = list(fx.node.map_arg(args, remap))
        kwargs = dict(fx.node.map_arg(n.kwargs, remap))
        for (node, key), need in lab.side.items():
            if node is not n:
                continue
            side = args[key] if isinstance(key, int) else kwargs[key]
            for dim, atom in sorted(need.items()):
                if atom in index:
                    side = call(g, torch.index_select, side, dim, index[atom], name=f"{tag}_probe_side")
            if isinstance(key, int):
                args[key] = side
            else:
                kwargs[key] = side
        copy = g.create_node(n.op, n.target, tuple(args), kwargs, name=f"{tag}_probe_{n.name}")
        copy.meta = {k: v for k, v in n.meta.items() if k != "example_value" and k != "val"}
        env[n] = copy
    return env[site.final.args[0]]


def compact(g: fx.Graph, site: Site, lab: Labeler, weights: dict[fx.Node, tuple], new: dict[str, int],
            kv_index: fx.Node | None, tag: str, full_heads: fx.Node | None = None) -> None:
    """Run the whole batch on compact weights: swap the projections' weights, resize literals.
    With K/V whole, each kept query head reads its K/V head (gathered), or, given `full_heads`
    (the kept heads), the attention runs on all heads with the pruned ones zero."""
    for proj, (w, b) in weights.items():
        args = list(proj.args) + [None] * (3 - len(proj.args))
        args[1] = w
        if b is not None:
            args[2] = b
        proj.args = tuple(args)
    for n in site.region:
        if n in lab.labels:
            with g.inserting_before(n):
                n.args = resized_args(n, lab.labels[n], new)
    if full_heads is not None:
        _attend_all_heads(g, site, full_heads, tag)
    elif kv_index is not None:  # query heads pruned, K/V whole: each kept head reads its own K/V
        q, k, v = sdpa_qkv(site.sdpa)
        with g.inserting_before(site.sdpa):
            k2 = call(g, torch.index_select, k, 1, kv_index, name=f"{tag}_gather_k")
            v2 = call(g, torch.index_select, v, 1, kv_index, name=f"{tag}_gather_v")
        site.sdpa.args = (q, k2, v2) + tuple(site.sdpa.args[3:])
        kwargs = dict(site.sdpa.kwargs)
        kwargs.pop("key", None), kwargs.pop("value", None), kwargs.pop("query", None)
        if kwargs.get("enable_gqa"):
            kwargs["enable_gqa"] = False
        site.sdpa.kwargs = kwargs


def _attend_all_heads(g: fx.Graph, site: Site, kept: fx.Node, tag: str) -> None:
    """Kept query heads placed among zero heads, the attention op as the model had it (K/V read
    in place, GQA as it was), and the kept heads' outputs taken back: cheaper than gathering K/V
    per kept head when the query is short and the cache long (decode)."""
    q = sdpa_qkv(site.sdpa)[0]
    with g.inserting_before(site.sdpa):
        full = call(g, ops.scatter_heads, q, kept, site.heads, name=f"{tag}_all_heads")
    site.sdpa.replace_input_with(q, full)
    with g.inserting_after(site.sdpa):
        out = call(g, torch.index_select, site.sdpa, 1, kept, name=f"{tag}_kept_heads")
    site.sdpa.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)

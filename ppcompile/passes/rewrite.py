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
from .dims import Atom, Labeler, Labels, Unsupported, anon, resized_args
from .sites import SDPA_PARAMS, Site, sdpa_params, writers, written


def label_site(site: Site, kv_whole: bool) -> Labeler:
    """Label the block's dims from its input x: b, s from x; h/kv/c on the projections' outputs."""
    shape = shape_of(site.x)
    x_lab: Labels = ((Atom("b", shape[0]),), (Atom("s", shape[1]),), anon(shape[-1])) if len(shape) == 3 \
        else ((Atom("b", site.batch), Atom("s", site.seq_len)), anon(shape[-1]))
    lab = Labeler({site.x: x_lab})
    for p in site.projections:
        out = shape_of(p)[-1]
        if site.kind == "mlp":
            dim = (Atom("c", out),)
        else:
            role = next(r for r, n in site.qkv.items() if n is p)
            heads = out // site.head_dim
            name = "h" if role == "q" or not kv_whole else "kv"
            dim = (Atom(name, heads), Atom(None, site.head_dim))
        lab.labels[p] = x_lab[:-1] + (dim,)
    lab.run(site.region)
    return lab


def site_labels(site: Site, whole_kv: bool = False) -> tuple[Labeler, bool]:
    """Dim labels of the block, and whether its K/V stay whole (GQA, K/V in a cache, or asked);
    Unsupported where a per-head or per-channel value leaves the block, or the final projection's
    input is not laid out by heads or channels."""
    kv_whole = False
    if site.kind == "attention":
        leaked = escapes(site)
        kv_whole = whole_kv or site.kv_heads != site.heads or bool(leaked)
        lab = label_site(site, kv_whole)
        q_leaks = [n for n in leaked if n in lab.labels and any(a.name == "h" for d in lab.labels[n] for a in d)]
        if q_leaks:
            raise Unsupported(f"{q_leaks[0].name} (per query head) is used outside the block")
    else:
        lab = label_site(site, kv_whole)
        if escapes(site):
            raise Unsupported("an intermediate of the MLP is used outside the block")
    fin = lab.labels.get(site.final.args[0])
    if fin is None or [a.name for a in fin[-1]][:1] not in (["h"], ["c"]):
        raise Unsupported("the final projection's input is not laid out by head/channel")
    return lab, kv_whole


def escapes(site: Site) -> set[fx.Node]:
    """Region nodes read by anything outside the block (e.g. K/V returned as a cache), and the
    tensors written into a cache in place."""
    inside = set(site.region) | {site.final}
    leaked = {n for n in site.region + site.projections for u in n.users if u not in inside}
    return leaked | {written(n) for n in site.region if written(n) is not None}


def probe_activation(g: fx.Graph, site: Site, lab: Labeler, p: fx.Node, kept_b: fx.Node,
                     kept_t: fx.Node, k_b, k_t, tag: str, per_token: bool = False,
                     packed: bool = False) -> fx.Node:
    """Copy the block from x to the final projection's input, run on the probe p (k_b, k_t, d).
    Side inputs (rotary tables, the mask) are gathered at the probe's rows kept_b (k_b,) and
    positions: kept_t (k_t,) shared by the rows, or, `per_token`, (k_b, k_t) per row.
    `packed`: one row of tokens of several sequences, kept_b (1, k_t) each token's sequence; its
    attention gets a mask that keeps each sequence's tokens apart (ops.packed_mask)."""
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
            seq_dims = tuple(sorted(d for d, atom in need.items() if atom == "s"))
            if per_token and seq_dims:
                side = call(g, ops.side_at, side, lab.side_batch[(node, key)], seq_dims, kept_b, kept_t,
                            name=f"{tag}_probe_side")
            else:
                for dim, atom in sorted(need.items()):
                    if atom in index:
                        side = call(g, torch.index_select, side, dim, index[atom], name=f"{tag}_probe_side")
            if isinstance(key, int):
                args[key] = side
            else:
                kwargs[key] = side
        if packed and n is site.sdpa:
            params = dict(zip(SDPA_PARAMS, args)) | kwargs
            params["attn_mask"] = call(g, ops.packed_mask, params.get("attn_mask"), kept_b, kept_t,
                                       name=f"{tag}_probe_mask")
            params["is_causal"] = False
            args, kwargs = [params.pop(k) for k in ("query", "key", "value")], params
        copy = g.create_node(n.op, n.target, tuple(args), kwargs, name=f"{tag}_probe_{n.name}")
        copy.meta = {k: v for k, v in n.meta.items() if k != "example_value" and k != "val"}
        env[n] = copy
    return env[site.final.args[0]]


def compact(g: fx.Graph, site: Site, lab: Labeler, weights: dict[fx.Node, tuple], kept: fx.Node,
            kv_whole: bool, tag: str) -> None:
    """Run the whole batch on compact weights: swap the projections' weights, resize literals to
    the kept count, and gather each side input with a head or channel dim (an ALiBi bias in the
    attention mask: (B, H, L, K)) at the kept units `kept`. An attention whose K/V stay whole
    (`kv_whole`): each kept query head reads its own K/V head (attend_kept)."""
    new = {"h": site.kept, "c": site.kept}
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
    for (n, key), need in lab.side.items():
        dims = [d for d, atom in need.items() if atom in new]
        if not dims:
            continue
        args, kwargs = list(n.args), dict(n.kwargs)
        side = args[key] if isinstance(key, int) else kwargs[key]
        with g.inserting_before(n):
            for d in dims:
                side = call(g, torch.index_select, side, d, kept, name=f"{tag}_side_kept")
        if isinstance(key, int):
            args[key] = side
        else:
            kwargs[key] = side
        n.args, n.kwargs = tuple(args), kwargs
    if kv_whole and site.kind == "attention":
        attend_kept(g, site, kept, tag)


def compact_final(g: fx.Graph, site: Site, weight: fx.Node, channels: fx.Node, tag: str) -> None:
    """Only the final projection compact: it reads the kept `channels` of its input, which the
    block computed whole, through its kept columns `weight`."""
    x = site.final.args[0]
    with g.inserting_before(site.final):
        kept_x = call(g, torch.index_select, x, -1, channels, name=f"{tag}_final_kept")  # (..., k)
    site.final.args = (kept_x, weight, *site.final.args[2:])


def attend_kept(g: fx.Graph, site: Site, kept: fx.Node, tag: str) -> None:
    """The kept query heads attend on whole K/V. One query token (a decode step), no dropout, no
    causal flag: ops.attend_one_query, which reads the kept heads' K/V in place. Otherwise the K/V
    heads the kept heads read are gathered and the attention op runs on them (a copy, paid back by
    a long query)."""
    sdpa = site.sdpa
    p = sdpa_params(sdpa)
    q, k, v = p["query"], p["key"], p["value"]
    if shape_of(q)[2] == 1 and p.get("dropout_p", 0.0) == 0.0 and p.get("is_causal", False) is False:
        with g.inserting_before(sdpa):
            out = call(g, ops.attend_one_query, q, k, v, kept, site.heads, p.get("attn_mask"), p.get("scale"),
                       name=f"{tag}_attend")
        sdpa.replace_all_uses_with(out)
        g.erase_node(sdpa)
        site.sdpa = out
        return
    k_heads = shape_of(k)[1]
    with g.inserting_before(sdpa):
        kv = kept if k_heads == site.heads else \
            call(g, torch.floor_divide, kept, site.heads // k_heads, name=f"{tag}_kv_heads")
        p["key"] = call(g, torch.index_select, k, 1, kv, name=f"{tag}_gather_k")
        p["value"] = call(g, torch.index_select, v, 1, kv, name=f"{tag}_gather_v")
    p["enable_gqa"] = False
    sdpa.args, sdpa.kwargs = (q, p.pop("key"), p.pop("value")), {n: a for n, a in p.items() if n != "query"}

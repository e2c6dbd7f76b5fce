"""Compact weights for any selection: the kept rows of a block's first projections and columns of
its final one; a prefill's store of them, and a decode's reuse.

A `Selection` (select.py) names the kept units as a graph node, and, when they are known at
compile time, as a tensor too. Known units and real weights: the compact weights are sliced once
and enter as constants. Otherwise the graph gathers them on every call. A prefill writes its kept
units and compact weights into `stored/<site>/...` slots in place, each weight transposed (the
layout a matmul of a few tokens reads fastest); a decode graph reads them back as views.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import fx

from .. import ops
from .graph import body_start, call
from .seam import Seam, Slot, stored_slot
from .sites import Site, module_path, value

if TYPE_CHECKING:
    from .select import SelectContext, Selection

Weights = dict[fx.Node, tuple["fx.Node | None", "fx.Node | None"]]  # projection -> (weight, bias)


@dataclass
class Compact:
    channels: fx.Node  # the kept channels of the final projection's input: (k * head_dim,) or (k,)
    weights: Weights  # each compacted projection's new weight and bias
    named: dict[str, fx.Node]  # the same by name ("q_w", "final_w", ...): what a prefill stores


def compact_weights(ctx: "SelectContext", site: Site, sel: "Selection", kv_whole: bool, tag: str,
                    final_only: bool = False) -> Compact:
    """The kept rows of the first projections and columns of the final one, for `sel` (only the
    final one's with `final_only`). Inserted where the graph's insertion point is (the caller's)."""
    g = ctx.g
    if site.kind == "attention":
        chan = call(g, ops.head_channels, sel.kept, site.head_dim, name=f"{tag}_channels")
        chan_now = None if sel.kept_now is None else ops.head_channels(sel.kept_now, site.head_dim)
    else:
        chan, chan_now = sel.kept, sel.kept_now
    unit = unit_width(site)

    def gather(w: fx.Node, dim: int, name: str) -> fx.Node:
        t = ctx.real_of(w)
        if t is not None and chan_now is not None and len(chan_now) == t.shape[dim]:
            return w  # every unit kept (ratio 0): the model's own weight, no copy, the dense matmul
        if t is not None and chan_now is not None:  # in the layout a matmul of a few tokens reads fastest
            kept_t = t.detach().index_select(dim, chan_now.to(t.device))
            return const(g, f"{tag}_{name}", kept_t.t().contiguous().t() if kept_t.dim() == 2 else kept_t)
        if t is not None and dim == 1 and unit == 1 and ctx.config.copies_final(t.device):
            # the kept columns as rows of a transposed copy made once: a contiguous gather
            w_t = const(g, f"{tag}_{name}_transposed", ctx.derived_of(t, "transposed", lambda w: w.t().contiguous()))
            rows = call(g, torch.index_select, w_t, 0, sel.kept, name=f"{tag}_gather_{name}_rows")  # (k, d_out)
            return call(g, torch.t, rows, name=f"{tag}_gather_{name}")
        return call(g, ops.gather_units, w, dim, sel.kept, unit, name=f"{tag}_gather_{name}")

    weights, named = {}, {}
    for p, (wname, bname) in weight_names(site, kv_whole).items():
        if final_only and p is not site.final:
            continue
        w = named[wname] = gather(p.args[1], 1 if p is site.final else 0, wname)
        b = None
        if bname is not None:
            b = named[bname] = gather(bias_of(p), 0, bname)
        weights[p] = (w, b)
    return Compact(chan, weights, named)


# ---- generation: a prefill stores, its decode steps reuse ----
def stored_slots(site: Site, kv_whole: bool) -> dict[str, Slot]:
    """What a prefill stores for `site` and its decode steps read, by name ("kept", "q_w", ...):
    the kept units, and each compact weight transposed, (in, out) contiguous: the layout a matmul
    of a few tokens reads fastest (bench/layout.py: about 2x nn.Linear's (out, in) at 8 tokens on
    the development CPU)."""
    width = site.kept * unit_width(site)
    slots = {"kept": stored_slot(site.name, "kept", (site.kept,), torch.long)}
    for p, (wname, bname) in weight_names(site, kv_whole).items():
        w = value(p.args[1])
        shape = (width, w.shape[0]) if p is site.final else (w.shape[1], width)
        slots[wname] = stored_slot(site.name, wname, shape, w.dtype)
        if bname is not None:
            slots[bname] = stored_slot(site.name, bname, (width,), w.dtype)
    return slots


def store(g: fx.Graph, seam: Seam, site: Site, kv_whole: bool, named: dict[str, fx.Node]) -> None:
    """A prefill writes its kept units and compact weights into their slots, in place: the same
    tensors every generation, which the decode graphs read."""
    for name, slot in stored_slots(site, kv_whole).items():
        node, src = seam.input(g, slot), named[name]
        if len(slot.shape) == 2:  # Inductor writes the transpose as one tiled kernel
            src = call(g, torch.t, src, name=f"{node.name}_src")
        call(g, torch.ops.aten.copy_.default, node, src, name=f"{node.name}_store")


def reused(g: fx.Graph, seam: Seam, site: Site, kv_whole: bool) -> tuple[Weights, fx.Node]:
    """A decode graph's compact weights and kept units: the slots a prefill wrote (store), each
    weight read as a transposed view, in its projection's own (out, in) shape."""
    slots = stored_slots(site, kv_whole)
    nodes = {name: seam.input(g, dataclasses.replace(slot, required=True)) for name, slot in slots.items()}

    def read(name: str | None) -> fx.Node | None:
        if name is None:
            return None
        n = nodes[name]
        return call(g, torch.t, n, name=f"{n.name}_t") if len(slots[name].shape) == 2 else n

    weights = {p: (read(w), read(b)) for p, (w, b) in weight_names(site, kv_whole).items()}
    return weights, nodes["kept"]


# ---- names and costs ----
def weight_names(site: Site, kv_whole: bool) -> dict[fx.Node, tuple[str, str | None]]:
    """Each projection whose weight is compacted -> the names of its weight and bias ("q_w", "q_b";
    "final_w"; the bias name None when it has none)."""
    names = {}
    for p in pruned_projections(site, kv_whole):
        role = _role(site, p)
        names[p] = (f"{role}_w", f"{role}_b" if isinstance(bias_of(p), fx.Node) else None)
    names[site.final] = ("final_w", None)
    return names


def pruned_projections(site: Site, kv_whole: bool) -> list[fx.Node]:
    """The first projections whose rows are pruned: all of them, but K and V when kept whole."""
    return [p for p in site.projections if not (kv_whole and p in (site.qkv.get("k"), site.qkv.get("v")))]


def unit_cost(site: Site, kv_whole: bool) -> float:
    """Multiply-adds per token of one unit (head or channel): its rows of the pruned first
    projections and its columns of the final projection."""
    rows = sum(value(p.args[1]).shape[1] for p in pruned_projections(site, kv_whole))
    return float(unit_width(site) * (rows + value(site.final.args[1]).shape[0]))


def pruned_fraction(site: Site, kv_whole: bool, final_only: bool = False) -> float:
    """The fraction of the block's projection multiply-adds per token its pruned units cost (with
    `final_only`, their columns of the final projection alone)."""
    block = float(sum(value(p.args[1]).numel() for p in site.projections + [site.final]))
    per_unit = unit_cost(site, kv_whole) if not final_only else unit_width(site) * value(site.final.args[1]).shape[0]
    return (site.units - site.kept) * per_unit / block


def first_saving(site: Site, kv_whole: bool) -> float:
    """The share of the first projections' multiply-adds per token that compact weights save: the
    pruned units' rows of the projections that are pruned (not K/V kept whole)."""
    rows = sum(value(p.args[1]).shape[1] for p in pruned_projections(site, kv_whole))
    first = sum(value(p.args[1]).numel() for p in site.projections)
    return (site.units - site.kept) * unit_width(site) * rows / first


def unit_width(site: Site) -> int:
    """Channels of the final projection's input per unit: a head's head_dim, an MLP channel's 1."""
    return site.head_dim if site.kind == "attention" else 1


def bias_of(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _role(site: Site, p: fx.Node) -> str:
    """A projection's name that every graph of the model gives it alike (a prefill's stored weights
    are found by it in the decode graph): q/k/v, else its module's name, else its rank."""
    for r, n in site.qkv.items():
        if n is p:
            return r
    name = module_path(p).rsplit(".", 1)[-1]
    if name and sum(module_path(o) == module_path(p) for o in site.projections) == 1:
        return name
    return f"proj{sorted(site.projections, key=graph_order(p.graph)).index(p)}"


# ---- constants ----
def const(g: fx.Graph, name: str, t: torch.Tensor) -> fx.Node:
    """`t` as a constant of the graph (a buffer, read at the graph's start)."""
    g.owning_module.register_buffer(name, t)
    with g.inserting_before(body_start(g)):
        return g.get_attr(name)


def derived(memo: dict, weight: torch.Tensor, what: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """make(weight), made once per weight and version of it: every graph of one model (its shapes,
    its generation phases) holds the same tensor instead of a copy each. A weight changed in
    place (a new version) gets a new one."""
    key = (id(weight), what)
    hit = memo.get(key)
    if hit is None or hit[0] is not weight or hit[1] != weight._version:
        hit = memo[key] = (weight, weight._version, make(weight.detach()))
    return hit[2]


def graph_order(g: fx.Graph) -> Callable[[fx.Node], int]:
    pos = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: pos[n]

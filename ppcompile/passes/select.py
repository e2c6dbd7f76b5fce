"""Where a site's kept units come from: one selection builder per policy, registered by its class.

    @register_selector(MyPolicy)
    def my_selection(ctx: SelectContext, site: Site, history) -> Selection: ...

The pass looks the builder up by the policy's type (its classes in method resolution order, so a
subclass inherits its parent's), calls it once per pruned site, and wraps whatever it returns in
the same compact rewrite (compact.py). A builder adds its nodes before the node it names as the
selection's `anchor`; the compact weights are gathered there too. `fixed=True`: the selection is
made once at compile time (its kept units are constants); every graph rebuilds it alike, so a
prefill stores nothing and a decode selects again. Otherwise a prefill stores the selection and
its decode steps reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import fx

from .. import ops
from ..config import PPConfig
from ..policies import FullBatch, Griffin, Policy, ProbePruning
from .compact import const, derived, first_saving, graph_order
from .graph import GraphInputs, call, final_input
from .probe import fused_energy, probe_energy, probe_token_share
from .sites import Site

if TYPE_CHECKING:
    from ..calibration import Calibration

RealTensor = Callable[[fx.Node], "torch.Tensor | None"]  # a weight node -> its real tensor, if known

# What chose a pruned site's units, as model.pp.summary() names it (`selects`); made here alone. A
# decode graph reads the selection its prefill stored (PREFILL); a builder of a policy of one's own
# that names none is shown under its policy's name.
PROBE, WHOLE_BATCH, PROMPT, CALIBRATION, PREFILL = "probe", "whole batch", "prompt", "calibration", "prefill"


@dataclass
class Selection:
    kept: fx.Node  # (k,) long: the kept heads (attention) or channels (MLP), a node of the graph
    anchor: fx.Node  # the selection's nodes, and the compact weights, come before this node
    kept_now: torch.Tensor | None = None  # the same indices known at compile time (weights sliced once)
    share: fx.Node | None = None  # the probe's share of the fused energy (telemetry)
    bias: torch.Tensor | None = None  # added to the final projection's output (FLAP's compensation)
    runs_dense: bool = False  # the selecting call runs its block dense (selects for later calls)
    final_only: bool = False  # the call runs its first projections dense; only the final one is compact
    outline: bool = False  # its nodes go in a subgraph every layer of the same shape shares
    energy: fx.Node | None = None  # (L, C) per position, every channel: the history learns from it (own activations)
    by: str | None = None  # what chose the units (PROBE, WHOLE_BATCH, ...); None: the policy, by name


@dataclass
class SelectContext:
    """What a selection builder may read and build with, for one graph."""
    g: fx.Graph
    config: PPConfig
    gi: GraphInputs
    n_layers: int
    sites: list[Site]  # every site it selects for in this graph
    labels: dict[str, tuple]  # site -> (its dim labels, whether its K/V stay whole)
    real: RealTensor | None = None
    calibration: "Calibration | None" = None
    memo: dict = field(default_factory=dict)  # constants made from weights, kept across a model's graphs
    _once: dict = field(default_factory=dict)

    def real_of(self, node: fx.Node) -> torch.Tensor | None:
        return self.real(node) if self.real is not None else None

    def derived_of(self, weight: torch.Tensor, what: str, make) -> torch.Tensor:
        return derived(self.memo, weight, what, make)

    def size(self, fn, *args, name: str):
        """fn(*args): an int in a static graph, a size node (of the batch and sequence) in a dynamic one."""
        if isinstance(self.gi.batch_arg, int) and isinstance(self.gi.seq_arg, int):
            return fn(*args)
        return call(self.g, fn, *args, name=name)

    def once(self, key: str, make: Callable[[], object]):
        """make(), once per graph: a decision over all sites (FLAP's global threshold)."""
        if key not in self._once:
            self._once[key] = make()
        return self._once[key]


Builder = Callable[[SelectContext, Site, "fx.Node | None"], Selection]  # (ctx, site, its history) -> ...


@dataclass(frozen=True)
class Selector:
    build: Builder
    fixed: bool = False  # chosen at compile time: nothing to store for decode
    weighs_cost: bool = False  # gathers per call: a forward graph applies the cost rule (cost.py)


SELECTORS: dict[type, Selector] = {}


def register_selector(*policies: type, fixed: bool = False, weighs_cost: bool = False):
    """Register the selection builder of these policy classes (and their subclasses). `weighs_cost`:
    its compact weights are gathered on every call, so a forward graph leaves a site dense where
    they cannot pay at the graph's size (cost.py)."""
    def register(fn: Builder) -> Builder:
        for cls in policies:
            SELECTORS[cls] = Selector(fn, fixed, weighs_cost)
        return fn
    return register


def selector_for(policy: Policy) -> Selector:
    for cls in type(policy).__mro__:
        if cls in SELECTORS:
            return SELECTORS[cls]
    raise ValueError(f"policy {policy!r} has no selection builder: register one with "
                     "@ppcompile.passes.select.register_selector")


def tag_of(site: Site) -> str:
    """The prefix of the nodes the pass makes for a site."""
    return site.name.replace(".", "_")


def first_projection(site: Site) -> fx.Node:
    return min(site.projections, key=graph_order(site.final.graph))


# ---- the dynamic policies ----
@register_selector(ProbePruning, FullBatch, weighs_cost=True)
def probed(ctx: SelectContext, site: Site, history: fx.Node | None) -> Selection:
    """Probe -> (fuse with history) -> score -> top-k: the kept heads or channels of this batch.
    The probe's tokens are the policy's design (pp: the configured one; full-batch: every token).
    Where the probe would run so much of the batch that it and the compact first projections cost
    at least the dense first projections (batch 1: half the sequence), the block's own activations
    are the probe instead (own_activations)."""
    design = ctx.config.policy.design(ctx.config.probe)
    if whole_batch_pays(ctx, site, design):
        return own_activations(ctx, site, history)
    g, tag, lab = ctx.g, tag_of(site), ctx.labels[site.name][0]
    anchor = first_projection(site)
    with g.inserting_before(anchor):
        energy, share = probe_energy(ctx, site, lab, design, history, tag)
        kept = _top_units(ctx, site, energy, tag)
    return Selection(kept, anchor, share=share, outline=True, by=PROBE)


def whole_batch_pays(ctx: SelectContext, site: Site, design) -> bool:
    """Whether the probe's share of the batch's tokens, at the graph's sizes (a dynamic graph's
    example), is at least the share of the first projections' multiply-adds that compact weights
    save: then probing and compacting them costs no less than running them dense for every token.
    Never with whole_batch_when_cheaper=False."""
    if not ctx.config.whole_batch_when_cheaper:
        return False
    share = probe_token_share(ctx.config, site, design, *ctx.gi.example)
    return share >= first_saving(site, ctx.labels[site.name][1])


def own_activations(ctx: SelectContext, site: Site, history: fx.Node | None) -> Selection:
    """The whole batch as the probe: the block runs dense up to its final projection, whose input
    (B, L, C) gives the energy (mean over sequences per position, fused with the history); only the
    final projection reads the kept units (Selection.final_only). The same selection as a probe
    of every token, without running the block twice."""
    g, tag, gi = ctx.g, tag_of(site), ctx.gi
    act = final_input(g, site, gi, tag)  # (B, L, C)
    with g.inserting_before(site.final):
        per_position = call(g, ops.probe_energy, act, gi.valid, name=f"{tag}_own_energy")  # (L, C)
        energy, share = fused_energy(g, per_position, history, ctx.config.telemetry, tag)  # history: (L, C)
        kept = _top_units(ctx, site, energy, tag)
    return Selection(kept, site.final, share=share, outline=True, final_only=True, energy=per_position,
                     by=WHOLE_BATCH)


def _top_units(ctx: SelectContext, site: Site, energy: fx.Node, tag: str) -> fx.Node:
    """PPsp scores of the energy (C,) with the final projection's weight terms, and the top kept."""
    g, w = ctx.g, site.final.args[1]
    t = ctx.real_of(w)
    terms = const(g, f"{tag}_weight_terms", ctx.derived_of(t, "terms", ops.column_terms)) if t is not None \
        else call(g, ops.column_terms, w, name=f"{tag}_weight_terms")  # weights unknown here: every call
    if site.kind == "attention":
        scores = call(g, ops.head_scores, energy, terms, site.heads, name=f"{tag}_score")
    else:
        scores = call(g, ops.channel_scores, energy, terms, name=f"{tag}_score")
    return call(g, ops.top_indices, scores, site.kept, ctx.config.shards, name=f"{tag}_select")


@register_selector(Griffin)
def prompt_activations(ctx: SelectContext, site: Site, history: fx.Node | None) -> Selection:
    """GRIFFIN: the prompt runs dense; its final projection's input, normalized per token, picks
    the channels every decode step then uses."""
    g, tag = ctx.g, tag_of(site)
    with g.inserting_before(site.final):
        act = final_input(g, site, ctx.gi, tag)
        scores = call(g, ops.activation_scores, act, ctx.gi.valid, name=f"{tag}_score")
        kept = call(g, ops.top_indices, scores, site.kept, ctx.config.shards, name=f"{tag}_select")
    return Selection(kept, site.final, runs_dense=True, by=PROMPT)

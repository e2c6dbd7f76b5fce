"""The calibration pass: the dense graph, plus in-place sums of every block's final-projection input.

It rewrites nothing the model computes; after each final projection it adds one node that adds
this batch's statistics (per position and channel sums of x^2, token counts per position, per
channel sums of x and x^2) to four tables, which enter as named slots (see seam.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .. import ops
from .graph import call, copy_graph, final_input, graph_inputs
from .seam import STATS, Seam, slot_name, stat_slots
from .sites import Site
from .unfuse import prepare


@dataclass
class StatsPass:
    gm: fx.GraphModule
    sites: list[Site] = field(default_factory=list)  # the blocks it records
    seam: Seam = field(default_factory=Seam)


def run_stats_pass(gm: fx.GraphModule) -> StatsPass:
    gm = copy_graph(gm)
    g = gm.graph
    sites, _, _ = prepare(gm)
    sites = [s for s in sites if s.pruned]  # every block the pruning pass could rewrite
    result = StatsPass(gm, sites)
    if sites:
        gi = graph_inputs(gm, sites)
        result.seam.seq_source = gi.seq_source
        for site in sites:
            tag = site.name.replace(".", "_")
            tables = [result.seam.input(g, slot, gi.seq_example) for slot in stat_slots(site.name, site.channels)]
            x = final_input(g, site, gi, tag)
            with g.inserting_after(site.final):
                update = call(g, ops.accumulate_stats_, *tables, x, gi.valid, name=f"{tag}_stats")
            result.seam.output(slot_name(STATS, site.name), update)
    result.seam.close(g)
    g.lint()
    gm.recompile()
    return result

"""The calibration pass: the dense graph, plus in-place sums of every block's final-projection input.

It rewrites nothing the model computes; after each final projection it adds one node that adds
this batch's statistics (per position and channel sums of x^2, token counts per position, per
channel sums of x and x^2) to four tables the caller passes in as extra inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .. import ops
from .graph import Placeholders, add_outputs, call, copy_graph, final_input, graph_inputs
from .sites import find_sites

STATS = ("sq", "count", "total", "total_sq")  # the tables per site, in input order


@dataclass
class StatsPass:
    gm: fx.GraphModule
    sites: dict[str, int] = field(default_factory=dict)  # site -> channels, in input order
    seq_len: int = 0
    n_outputs: int = 0


def run_stats_pass(gm: fx.GraphModule) -> StatsPass:
    gm = copy_graph(gm)
    g = gm.graph
    sites, _, _ = find_sites(gm)
    sites = [s for s in sites if s.status == "pruned"]  # every block the pruning pass could rewrite
    result = StatsPass(gm)
    if not sites:
        result.n_outputs = add_outputs(g, [])
        return result
    gi = graph_inputs(gm, sites)
    result.seq_len = gi.seq_len
    inputs = Placeholders(g)
    updates = []
    for site in sites:
        tag = site.name.replace(".", "_")
        tables = [inputs.add(f"{tag}_{name}") for name in STATS]
        x = final_input(g, site, gi, tag)
        with g.inserting_after(site.final):
            updates.append(call(g, ops.accumulate_stats_, *tables, x, gi.valid, name=f"{tag}_stats"))
        result.sites[site.name] = site.channels
    result.n_outputs = add_outputs(g, updates)
    g.lint()
    gm.recompile()
    return result

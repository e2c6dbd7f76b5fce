"""The history a policy fuses its probe with (pp): one table per site, updated in place by the graph.

Graph-wide: the `step` and `seeded` slots, the EMA weight of this call (0 on the warm-up call, 1
into an unseeded history) and, at the end, the node that advances both. Per site: its
`history/<site>` slot, (L, C) mean of the final projection's input squared per position, and the
in-place EMA update after the final projection: of its kept units from the compact input (a
head's channels written as one run, through a (L, H, head_dim) view), or, where the block ran every
channel to select (its own activations), of every channel.
"""
from __future__ import annotations

import torch
from torch import fx

from .. import ops
from .compact import unit_width
from .graph import GraphInputs, body_start, call, final_input
from .seam import ADVANCE, SEEDED, STEP, UPDATE, Seam, history_slot, slot_name
from .sites import Site


class History:
    def __init__(self, g: fx.Graph, seam: Seam, momentum: float):
        self.g, self.seam, self.momentum = g, seam, momentum
        self.step = self.seeded = self.weight = None  # made with the first site's history

    def input(self, site: Site, gi: GraphInputs) -> fx.Node:
        """The site's history slot (rows: the graph's sequence length)."""
        if self.step is None:
            self.seeded, self.step = self.seam.input(self.g, SEEDED), self.seam.input(self.g, STEP)
            with self.g.inserting_before(body_start(self.g)):
                self.weight = call(self.g, ops.ema_weight, self.step, self.seeded, self.momentum, name="pp_ema_weight")
        return self.seam.input(self.g, history_slot(site.name, site.channels), gi.seq_example)

    def update(self, site: Site, gi: GraphInputs, history: fx.Node, kept: fx.Node, tag: str) -> tuple[str, fx.Node]:
        """The in-place EMA update of the `kept` units (heads or channels) from this call's
        final-projection input: (its output name, its node)."""
        x_final, unit = final_input(self.g, site, gi, tag), unit_width(site)
        with self.g.inserting_after(site.final):
            rows = call(self.g, ops.ema_rows, history, kept, x_final, gi.valid, self.weight, unit, name=f"{tag}_history_rows")
        with self.g.inserting_after(rows):  # untagged: the view goes with the write, outside the layer's segment
            table = call(self.g, torch.ops.aten.unflatten.int, history, 1, [-1, unit], name="pp_history_units")
        with self.g.inserting_after(table):
            write = call(self.g, torch.ops.aten.index_copy_.default, table, 1, kept, rows, name=f"{tag}_history_update")
        return slot_name(UPDATE, site.name), write

    def update_every(self, site: Site, gi: GraphInputs, history: fx.Node, energy: fx.Node, tag: str) -> tuple[str, fx.Node]:
        """The in-place EMA update of every channel from the per-position `energy` (L, C) of the
        block's own activations, where the selection computed it (select.own_activations)."""
        with self.g.inserting_after(site.final):
            step = call(self.g, ops.ema_step, history, energy, gi.valid, self.weight, name=f"{tag}_history_step")
        with self.g.inserting_after(step):  # the one write, right after its values, computed apart (ops.ema_rows)
            write = call(self.g, torch.ops.aten.add_.Tensor, history, step, name=f"{tag}_history_update")
        return slot_name(UPDATE, site.name), write

    def advance(self) -> list[tuple[str, fx.Node]]:
        """The call's step and seeded flag advanced, last in the graph; nothing without a history."""
        if self.step is None:
            return []
        with self.g.inserting_before(next(n for n in self.g.nodes if n.op == "output")):
            return [(ADVANCE, call(self.g, ops.advance_, self.step, self.seeded, name="pp_advance"))]

"""The history a policy fuses its probe with (pp): one table per site, updated in place by the graph.

Graph-wide: the `step` and `seeded` slots, the EMA weight of this call (0 on the warm-up call, 1
into an unseeded history) and, at the end, the node that advances both. Per site: its
`history/<site>` slot, (L, C) mean of the final projection's input squared per position, and the
in-place EMA update after the final projection: of its kept channels from the compact input, or,
where the block ran every channel to select (its own activations), of every channel.
"""
from __future__ import annotations

import torch
from torch import fx

from .. import ops
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

    def update(self, site: Site, gi: GraphInputs, history: fx.Node, channels: fx.Node, tag: str) -> tuple[str, fx.Node]:
        """The in-place EMA update of the kept `channels` from this call's final-projection input:
        (its output name, its node)."""
        x_final = final_input(self.g, site, gi, tag)
        with self.g.inserting_after(site.final):
            rows = call(self.g, ops.ema_rows, history, channels, x_final, gi.valid, self.weight, name=f"{tag}_history_rows")
        return slot_name(UPDATE, site.name), self._write(torch.ops.aten.index_copy_.default, history, 1, channels, rows, tag=tag)

    def update_every(self, site: Site, gi: GraphInputs, history: fx.Node, energy: fx.Node, tag: str) -> tuple[str, fx.Node]:
        """The in-place EMA update of every channel from the per-position `energy` (L, C) of the
        block's own activations, where the selection computed it (select.own_activations)."""
        with self.g.inserting_after(site.final):
            step = call(self.g, ops.ema_step, history, energy, gi.valid, self.weight, name=f"{tag}_history_step")
        return slot_name(UPDATE, site.name), self._write(torch.ops.aten.add_.Tensor, history, step, tag=tag)

    def _write(self, op, *args, tag: str) -> fx.Node:
        """The one in-place write of the history, right after its new values (the last of `args`),
        which are computed apart: see ops.ema_rows."""
        with self.g.inserting_after(args[-1]):
            return call(self.g, op, *args, name=f"{tag}_history_update")

    def advance(self) -> list[tuple[str, fx.Node]]:
        """The call's step and seeded flag advanced, last in the graph; nothing without a history."""
        if self.step is None:
            return []
        with self.g.inserting_before(next(n for n in self.g.nodes if n.op == "output")):
            return [(ADVANCE, call(self.g, ops.advance_, self.step, self.seeded, name="pp_advance"))]

"""Probe designs: which tokens of a batch the probe runs the block on. Every design goes through
the same pass (passes/probe_prune.py asks the design object, never compares names); a new design
is a subclass registered in PROBES.

  paper   the paper's: top positions by the batch's residual norms, shared by the top sequences
          (sample_ratio of them, at least one); the probe's energy is averaged over its sequences
          per position, then fused with the history
  every   every sequence, each at its own top-norm positions (the sink rule per sequence)
  spread  every sequence, at positions evenly spaced over its real tokens, its first and last
          (most recent) included; no norms
  stratified  every sequence at one position per stratum of its real tokens, the sequences at
          staggered offsets, so that the batch covers B x k_t distinct positions; no norms
  flat    the top-norm tokens of the whole batch (a flat top-k over B x L), run as one packed row:
          its attention is per sequence over the chosen tokens, causal at their true positions
In every design but `paper` each probe token fuses with the history at its own position.

How many positions: with probe_budget, the most that keep the probe within it (ops.budget_positions);
without, the paper's position_ratio for `paper`, and for the others as many tokens as `paper`'s
probe would run (the designs over every sequence: at least two per sequence). `flat` holds at most L tokens, so
that its attention (every pair of its tokens is computed, then masked) stays within the budget's
count of L keys per token.
"""
from __future__ import annotations

from . import ops


class ProbeDesign:
    name = ""
    per_sequence = False  # every sequence is probed at positions of its own: (B, k_t) positions
    packed = False  # one row of tokens from any sequences: (1, k) sequences and positions
    # per-token designs: (x_res, valid, k_t) -> (rows, positions, ok), an ops function the graph calls
    select = None

    @property
    def per_token(self) -> bool:
        """Each probe token has a position of its own (fused with the history there)."""
        return self.per_sequence or self.packed

    def __repr__(self) -> str:
        return f"<probe {self.name}>"

    def __str__(self) -> str:
        return self.name


class Paper(ProbeDesign):
    """Rows (k_b,) and shared positions (k_t,): ops.select_probe."""
    name = "paper"


class Every(ProbeDesign):
    name = "every"
    per_sequence = True
    select = staticmethod(ops.sequence_positions)


class Spread(ProbeDesign):
    name = "spread"
    per_sequence = True
    select = staticmethod(ops.spread_positions)


class Stratified(ProbeDesign):
    name = "stratified"
    per_sequence = True
    select = staticmethod(ops.stratified_positions)


class Flat(ProbeDesign):
    name = "flat"
    packed = True
    select = staticmethod(ops.batch_top_tokens)


PROBES: dict[str, ProbeDesign] = {p.name: p for p in (Paper(), Every(), Spread(), Stratified(), Flat())}


def get_probe(probe: "str | ProbeDesign") -> ProbeDesign:
    """The registered probe design of that name (or the design object itself)."""
    if isinstance(probe, ProbeDesign):
        return probe
    if not isinstance(probe, str) or probe not in PROBES:
        raise ValueError(f"unknown probe design {probe!r}; known designs: {', '.join(PROBES)}")
    return PROBES[probe]

"""Probe designs: which tokens of a batch the probe runs the block on. Every design goes through
the same pass: the pass looks up the token builder registered for the design's class
(passes/probe.py), never its name. A new design is a class (or an object of one), registered
in PROBES to be known by name.

  paper   the paper's: top positions by the batch's residual norms, shared by the top sequences
          (sample_ratio of them, at least one); the probe's energy is averaged over its sequences
          per position, then fused with the history
  every   every sequence, each at its first real token and its own top-norm positions
  spread  every sequence, at positions evenly spaced over its real tokens, its first and last
          (most recent) included; no norms
  stratified  every sequence at its first real token (the attention sink) and one position per
          further stratum of its real tokens, the sequences at staggered offsets, so that the
          batch covers about B x k_t distinct positions; no norms
  flat    every sequence's first real token and the batch's top-norm tokens (a flat top-k over
          B x L), run as one packed row: its attention is per sequence over the chosen tokens,
          causal at their true positions
In every design but `paper` each probe token fuses with the history at its own position, and
each probed sequence's first real token is always in: the attention sink, which the probe's
attention must read (`paper` keeps the paper's rule: token 0 forced in only when k_t <= 10).

How many positions: with probe_budget, the most that keep the probe within it
(ops.budget_positions); without, the paper's position_ratio for `paper`, and for the others as
many tokens as `paper`'s probe would run (at least two per sequence where every sequence is
probed). `flat` holds at most L tokens, so that its attention (every pair of its tokens is
computed, then masked) stays within the budget's count of L keys per token.

Where a design's tokens are so large a share of the batch (batch 1: half the sequence) that the
probe and the compact first projections cost at least the dense ones, no probe runs: the block's
own activations select (passes/select.py, own_activations).
"""
from __future__ import annotations

import torch

from . import ops
from .registry import Named, lookup


# ---- each design's choice of tokens: plain tensor functions the graph calls (no host sync) ----
def sequence_positions(x_res: torch.Tensor, valid: torch.Tensor | None, k_t) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's own probe positions: its first real token (the attention sink, always) and
    its k_t - 1 other real tokens of largest residual norm, ascending, and which of them are real
    tokens: (rows (B,): every sequence, positions (B, k_t), ok (B, k_t) bool). A sequence with
    fewer than k_t real tokens fills up with pads, which `ok` marks."""
    score = _with_sinks(ops.token_norms(x_res, valid))  # (B, L), pads -1, sinks +inf
    real = score >= 0
    positions = torch.topk(score, k_t, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k_t)
    return torch.arange(score.shape[0], device=score.device), positions, real.gather(1, positions)


def spread_positions(x_res: torch.Tensor, valid: torch.Tensor | None, k_t) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's k_t positions evenly spaced over its real tokens, its first and its last
    (most recent) token included: (rows (B,), positions (B, k_t), ok (B, k_t) bool). A sequence
    with fewer than k_t real tokens repeats some; `ok` keeps each real token once."""
    real = _real(x_res, valid)  # (B, L)
    span = real.sum(1).clamp(min=1) - 1  # (B,)
    gaps = torch.sym_max(k_t - 1, 1)
    i = torch.arange(k_t, device=x_res.device)  # (k_t,)
    return _past_first(real, (2 * i * span.unsqueeze(1) + gaps) // (2 * gaps))  # round(i * span / (k_t - 1))


def stratified_positions(x_res: torch.Tensor, valid: torch.Tensor | None, k_t) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sequence at one position in each of k_t equal strata of its real tokens, the B
    sequences at staggered offsets within a stratum, so that the batch's probe covers B x k_t
    distinct positions: (rows (B,), positions (B, k_t), ok (B, k_t) bool). Sequence b, stratum i:
    floor((i + (b + 1/2) / B) * n / k_t) past its first real token, n its real tokens; the first
    stratum's position is the first real token itself, whatever k_t: the attention sink, which
    every probe token's attention must read (without it the probe's attention outputs, and so the
    head scores, are far from the batch's)."""
    real = _real(x_res, valid)  # (B, L)
    B, n = real.shape[0], real.sum(1)  # n: (B,)
    i = torch.arange(k_t, device=x_res.device).unsqueeze(0)  # (1, k_t)
    b = torch.arange(B, device=x_res.device).unsqueeze(1)  # (B, 1)
    offset = ((2 * (i * B + b) + 1) * n.unsqueeze(1)) // (2 * B * k_t)  # (B, k_t), ascending in i
    return _past_first(real, torch.where(i == 0, 0, offset))  # the first stratum: the sink


def batch_top_tokens(x_res: torch.Tensor, valid: torch.Tensor | None, k) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first real token of every sequence (its attention sink) and the batch's other tokens of
    largest residual norm, k in all (a flat top-k over B x L), in (sequence, position) order, as one
    packed probe row: (rows (1, k), positions (1, k), ok (1, k)): each token's sequence and
    position, and whether it is a real token (pads rank last)."""
    score = _with_sinks(ops.token_norms(x_res, valid))  # (B, L), pads -1, sinks +inf
    L = score.shape[1]
    flat = torch.topk(score.flatten(), k, sorted=False).indices.sort().values  # (k,)
    rows, positions = flat // L, flat % L
    return rows.unsqueeze(0), positions.unsqueeze(0), (score.flatten()[flat] >= 0).unsqueeze(0)


def _real(x_res: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: which tokens are real (all, without a mask)."""
    return torch.ones(x_res.shape[:2], dtype=torch.bool, device=x_res.device) if valid is None else valid


def _past_first(real: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Each sequence's positions `offset` (B, k_t, ascending) past its first real token (real
    tokens are contiguous: left or right padding): (rows (B,), positions (B, k_t), ok (B, k_t)),
    `ok` keeping each real token once."""
    positions = _first_real(real).unsqueeze(1) + offset
    repeat = torch.cat([torch.zeros_like(real[:, :1]), positions[:, 1:] == positions[:, :-1]], 1)
    return torch.arange(real.shape[0], device=real.device), positions, real.gather(1, positions) & ~repeat


def _with_sinks(norms: torch.Tensor) -> torch.Tensor:
    """Token norms (B, L) (pads -1) with each sequence's first real token ranked first (+inf): the
    attention sink, which a probe token's attention must read. The residual norm alone does not
    pick it in every layer (in SmolLM2's layer 10, about a hundred tokens of a window outrank it)."""
    real = norms >= 0
    sink = torch.zeros_like(real).scatter(1, _first_real(real).unsqueeze(1), True) & real
    return torch.where(sink, float("inf"), norms)


def _first_real(real: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) the first True position of each row (0 for a row with none)."""
    return real.int().argmax(1)


# ---- the designs ----
class ProbeDesign(Named):
    """Which tokens the probe runs on. How the pass picks them, and lays them out, is the token
    builder registered for the design's class (passes/probe.py, @probe_tokens)."""
    kind = "probe"


class Paper(ProbeDesign):
    """Rows (k_b,) and shared positions (k_t,): ops.select_probe."""
    name = "paper"


class WholeBatch(ProbeDesign):
    """Every token of the batch (the full-batch oracle's probe; not a design users pick by name)."""
    name = "all"


class PerSequence(ProbeDesign):
    """Every sequence at positions of its own, chosen by `select`: (x_res, valid, k_t) -> (rows
    (B,), positions (B, k_t), ok (B, k_t)), a plain tensor function the graph calls."""

    def __init__(self, name: str, select):
        self.name, self.select = name, select


class Packed(PerSequence):
    """One row of tokens from any sequences, chosen by `select`: (x_res, valid, k) -> (rows (1, k),
    positions (1, k), ok (1, k)): each token's sequence and position."""


PROBES: dict[str, ProbeDesign] = {p.name: p for p in (
    Paper(),
    PerSequence("every", sequence_positions),
    PerSequence("spread", spread_positions),
    PerSequence("stratified", stratified_positions),
    Packed("flat", batch_top_tokens),
)}


def get_probe(probe: "str | ProbeDesign") -> ProbeDesign:
    """The registered probe design of that name (or the design object itself)."""
    return lookup(PROBES, probe, ProbeDesign, "probe design", "designs")

"""The probe of one site: which tokens it runs on, how they lie, and its energy fused with the history.

Each probe design's class (probes.py) has one token builder here, registered with `@probe_tokens`
and the `Layout` of the tokens it returns:
  SHARED        rows (k_b,) sharing positions (k_t,): the paper's probe, the whole batch
  PER_SEQUENCE  every sequence at positions of its own: (B, k_t), with `ok` marking real tokens
  PACKED        one row of tokens from any sequences: (1, k), each token's sequence and position
The layout says how the block's input and side inputs are gathered at the tokens, how the energy
is reduced (batch mean per position, or per token) and where the history is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

import torch
from torch import fx

from .. import ops
from ..probes import Packed, Paper, PerSequence, ProbeDesign, WholeBatch
from .dims import Unsupported
from .graph import call, mul
from .rewrite import probe_activation
from .sites import Site, value

if TYPE_CHECKING:
    from ..config import PPConfig
    from .select import SelectContext


@dataclass
class ProbeTokens:
    rows: fx.Node  # which sequence each probe row (or packed token) is
    positions: fx.Node  # their positions: (k_t,) shared, (B, k_t) per sequence, (1, k) packed
    k_b: object  # probe rows: an int, or a size node of a dynamic graph
    k_t: object  # positions per row
    ok: fx.Node | None = None  # per-token layouts: the real tokens (not pads, not repeats)


class Layout:
    """How a probe's tokens lie: SHARED positions (this class), or per token (TokenLayout)."""
    per_token = False  # each token has a position of its own (fused with the history there)
    packed = False  # one row of tokens from several sequences

    def check(self, lab, design: ProbeDesign) -> None:
        """Raise Unsupported if the block's side inputs cannot follow these tokens."""

    def gather(self, g: fx.Graph, x: fx.Node, t: ProbeTokens, tag: str) -> fx.Node:
        return call(g, _gather_probe, x, t.rows, t.positions, name=f"{tag}_probe_x")  # (k_b, k_t, d)

    def energy(self, g: fx.Graph, act: fx.Node, t: ProbeTokens, valid, tag: str) -> fx.Node:
        """The batch mean per position: (k_t, C)."""
        pvalid = call(g, _gather_probe, valid, t.rows, t.positions, name=f"{tag}_probe_valid") \
            if valid is not None else None
        return call(g, ops.probe_energy, act, pvalid, name=f"{tag}_probe_energy")

    def history_at(self, g: fx.Graph, history: fx.Node, t: ProbeTokens, tag: str) -> fx.Node:
        return call(g, torch.index_select, history, 0, t.positions, name=f"{tag}_history_at_probe")


class TokenLayout(Layout):
    per_token = True

    def __init__(self, packed: bool = False):
        self.packed = packed

    def check(self, lab, design):
        unaligned = [n for (n, key), need in lab.side.items() if "s" in need.values() and (n, key) not in lab.side_batch]
        if unaligned:
            raise Unsupported(f"{unaligned[0].name}: a side input has sequence dims but no batch dim to gather "
                              f"it per sequence (probe='{design}'; use probe='paper')")
        per_row = [n for (n, key), need in lab.side.items() if "b" in need.values() and "s" not in need.values()]
        if per_row and self.packed:
            raise Unsupported(f"{per_row[0].name}: a side input per sequence has no positions to follow a packed "
                              f"probe row (probe='{design}'; use another probe)")

    def gather(self, g, x, t, tag):
        return call(g, ops.tokens_at, x, t.rows, t.positions, name=f"{tag}_probe_x")

    def energy(self, g, act, t, valid, tag):
        """Each probe token on its own: (k_b * k_t, C), pads and repeats zero."""
        return call(g, ops.token_energy, act, t.ok, name=f"{tag}_probe_energy")

    def history_at(self, g, history, t, tag):
        return call(g, ops.history_at, history, t.positions, t.ok, name=f"{tag}_history_at_probe")


SHARED, PER_SEQUENCE, PACKED = Layout(), TokenLayout(), TokenLayout(packed=True)

TokenBuilder = Callable[["SelectContext", Site, ProbeDesign, fx.Node, str], ProbeTokens]
Counts = Callable[["SelectContext", Site, str], tuple]  # (ctx, site, tag) -> (k_b rows, k_t positions per row)
TOKEN_BUILDERS: dict[type, tuple[TokenBuilder, Layout, Counts]] = {}


def probe_tokens(*designs: type, layout: Layout, counts: Counts):
    """Register a token builder for these probe design classes (and their subclasses), with the
    layout of its tokens and how many it takes (`counts`, which the builder itself uses)."""
    def register(fn: TokenBuilder) -> TokenBuilder:
        for d in designs:
            TOKEN_BUILDERS[d] = (fn, layout, counts)
        return fn
    return register


def _registered(design: ProbeDesign) -> tuple[TokenBuilder, Layout, Counts]:
    for cls in type(design).__mro__:
        if cls in TOKEN_BUILDERS:
            return TOKEN_BUILDERS[cls]
    raise ValueError(f"probe design {design!r} has no token builder: register one with "
                     "@ppcompile.passes.probe.probe_tokens")


def token_builder(design: ProbeDesign) -> tuple[TokenBuilder, Layout]:
    return _registered(design)[:2]


@dataclass
class _AtSizes:
    """What a design's counts read of a SelectContext, at int sizes: its sizes are plain ints."""
    config: "PPConfig"
    gi: SimpleNamespace

    def size(self, fn, *args, name: str):
        return fn(*args)


def probe_token_share(config: "PPConfig", site: Site, design: ProbeDesign, batch: int, seq_len: int) -> float:
    """The share of a batch x seq_len batch's tokens the design's probe runs (nominal: pads counted)."""
    k_b, k_t = _registered(design)[2](_AtSizes(config, SimpleNamespace(batch_arg=batch, seq_arg=seq_len)), site, "")
    return k_b * k_t / (batch * seq_len)


def check_sides(lab, design: ProbeDesign | None) -> None:
    """A site whose side inputs cannot follow the design's tokens raises Unsupported (stays dense)."""
    if design is not None:
        token_builder(design)[1].check(lab, design)


# ---- the designs' counts and token builders ----
def whole_counts(ctx: "SelectContext", site: Site, tag: str) -> tuple:
    return ctx.gi.batch_arg, ctx.gi.seq_arg


def paper_counts(ctx: "SelectContext", site: Site, tag: str) -> tuple:
    """The top sequences (sample_ratio of them) at the budget's positions or position_ratio of them."""
    k_b = _sample_rows(ctx, tag)
    k_t = _positions(ctx, site, k_b, tag)
    return k_b, _paper_positions(ctx, tag) if k_t is None else k_t


def sequence_counts(ctx: "SelectContext", site: Site, tag: str) -> tuple:
    """Every sequence, at as many tokens in all as the paper's probe (at least two each)."""
    B = ctx.gi.batch_arg
    k_t = _positions(ctx, site, B, tag)
    if k_t is None:
        k_t = ctx.size(ops.spread_count, B, ctx.gi.seq_arg, _sample_rows(ctx, tag), _paper_positions(ctx, tag),
                       name=f"{tag}_probe_positions_each")
    return B, k_t


def packed_counts(ctx: "SelectContext", site: Site, tag: str) -> tuple:
    """One row of as many tokens as the paper's probe, at most L: its attention, k x k pairs,
    stays within the L keys per token that a budget counts."""
    k_t = _positions(ctx, site, 1, tag)
    if k_t is None:
        k_t = ctx.size(ops.packed_count, ctx.gi.seq_arg, _sample_rows(ctx, tag), _paper_positions(ctx, tag),
                       name=f"{tag}_probe_tokens")
    return 1, k_t


@probe_tokens(WholeBatch, layout=SHARED, counts=whole_counts)
def whole_batch(ctx: "SelectContext", site: Site, design, x_res: fx.Node, tag: str) -> ProbeTokens:
    B, L = whole_counts(ctx, site, tag)
    return ProbeTokens(call(ctx.g, torch.arange, B, name=f"{tag}_probe_b"),
                       call(ctx.g, torch.arange, L, name=f"{tag}_probe_t"), B, L)


@probe_tokens(Paper, layout=SHARED, counts=paper_counts)
def top_rows_and_positions(ctx: "SelectContext", site: Site, design, x_res: fx.Node, tag: str) -> ProbeTokens:
    """The top positions by the batch's residual norms, shared by the top sequences."""
    k_b, k_t = paper_counts(ctx, site, tag)
    sel = call(ctx.g, ops.select_probe, x_res, ctx.gi.valid, k_t, k_b, ctx.config.sequence_first,
               name=f"{tag}_probe_select")
    return ProbeTokens(_item(ctx.g, sel, 0, f"{tag}_probe_b"), _item(ctx.g, sel, 1, f"{tag}_probe_t"), k_b, k_t)


@probe_tokens(PerSequence, layout=PER_SEQUENCE, counts=sequence_counts)
def each_sequence(ctx: "SelectContext", site: Site, design, x_res: fx.Node, tag: str) -> ProbeTokens:
    return selected_tokens(ctx, design.select, x_res, *sequence_counts(ctx, site, tag), tag)


@probe_tokens(Packed, layout=PACKED, counts=packed_counts)
def one_packed_row(ctx: "SelectContext", site: Site, design, x_res: fx.Node, tag: str) -> ProbeTokens:
    return selected_tokens(ctx, design.select, x_res, *packed_counts(ctx, site, tag), tag)


def selected_tokens(ctx: "SelectContext", select, x_res: fx.Node, k_b, k_t, tag: str) -> ProbeTokens:
    """The tokens `select(x_res, valid, k_t) -> (rows, positions, ok)` picks, a plain tensor
    function the graph calls (probes.py has the built-in designs')."""
    sel = call(ctx.g, select, x_res, ctx.gi.valid, k_t, name=f"{tag}_probe_select")
    rows, positions, ok = (_item(ctx.g, sel, i, f"{tag}_probe_{what}") for i, what in enumerate(("b", "t", "ok")))
    return ProbeTokens(rows, positions, k_b, k_t, ok)


def _sample_rows(ctx: "SelectContext", tag: str):
    return ctx.size(ops.probe_count, ctx.gi.batch_arg, *ctx.config.probe_rule("sample"), name=f"{tag}_probe_rows")


def _paper_positions(ctx: "SelectContext", tag: str):
    return ctx.size(ops.probe_count, ctx.gi.seq_arg, *ctx.config.probe_rule("position"),
                    name=f"{tag}_probe_positions")


def _positions(ctx: "SelectContext", site: Site, rows, tag: str):
    """With a probe_budget: the most positions per row that keep `rows` rows within it
    (ops.budget_positions); None without one."""
    if ctx.config.probe_budget is None:
        return None
    return ctx.size(ops.budget_positions, ctx.gi.batch_arg, ctx.gi.seq_arg, rows, *ctx.config.budget_fraction(),
                    *_probe_costs(site), name=f"{tag}_probe_positions")


def _probe_costs(site: Site) -> tuple[int, int, int]:
    """Multiply-adds of the block per token: its first projections (all of which the probe runs),
    its final projection, and its attention per pair of tokens (QK and AV; 0 for an MLP)."""
    first = sum(value(p.args[1]).numel() for p in site.projections)
    pair = 2 * site.heads * site.head_dim if site.kind == "attention" else 0
    return first, value(site.final.args[1]).numel(), pair


# ---- the probe's energy ----
def probe_energy(ctx: "SelectContext", site: Site, lab, design: ProbeDesign, history: fx.Node | None,
                 tag: str) -> tuple[fx.Node, fx.Node | None]:
    """Run the block on the design's tokens: the energy per channel of its final projection's
    input (fused with the history at the tokens' positions, when there is one), and the probe's
    share of the fused energy (telemetry; None without)."""
    g, gi = ctx.g, ctx.gi
    x, x_res = (_batch_by_sequence(g, n, gi, f"{tag}_{what}") for n, what in ((site.x, "x"), (site.x_res, "x_res")))
    build, layout = token_builder(design)
    t = build(ctx, site, design, x_res, tag)
    p = layout.gather(g, x, t, tag)
    if value(site.x).dim() == 2:
        p = call(g, torch.reshape, p, (mul(g, t.k_b, t.k_t, f"{tag}_probe_rows"), -1), name=f"{tag}_probe_x2d")
    act = probe_activation(g, site, lab, p, t.rows, t.positions, t.k_b, t.k_t, tag, layout.per_token,
                           packed=layout.packed)
    act = call(g, torch.reshape, act, (t.k_b, t.k_t, -1), name=f"{tag}_probe_act")
    energy = layout.energy(g, act, t, gi.valid, tag)
    hist = layout.history_at(g, history, t, tag) if history is not None else None
    return fused_energy(g, energy, hist, ctx.config.telemetry, tag)


def fused_energy(g: fx.Graph, energy: fx.Node, hist: fx.Node | None, telemetry: bool,
                 tag: str) -> tuple[fx.Node, fx.Node | None]:
    """The energy per channel (C,) from a probe's energy per position or token (T, C): fused with
    the history at the same rows (T, C), or summed without one; and the probe's share of it
    (telemetry; None without)."""
    if hist is None:
        share = call(g, torch.ones, (), name=f"{tag}_share") if telemetry else None
        return call(g, torch.sum, energy, 0, name=f"{tag}_energy"), share
    share = call(g, ops.probe_share, energy, hist, name=f"{tag}_share") if telemetry else None
    return call(g, ops.fuse_history, energy, hist, name=f"{tag}_fuse"), share


def _batch_by_sequence(g: fx.Graph, x: fx.Node, gi, name: str) -> fx.Node:
    """A (B*L, d) block input (OPT's MLP) viewed as (B, L, d); a (B, L, d) one as it is."""
    return call(g, torch.reshape, x, (gi.batch_arg, gi.seq_arg, -1), name=name) if value(x).dim() == 2 else x


def _item(g: fx.Graph, t: fx.Node, i: int, name: str) -> fx.Node:
    return call(g, _getitem, t, i, name=name)


def _getitem(t, i):
    return t[i]


def _gather_probe(x: torch.Tensor, kept_b: torch.Tensor, kept_t: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, kept_b).index_select(1, kept_t)  # (k_b, k_t, ...)

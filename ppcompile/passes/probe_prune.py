"""The pass: find every block, and rewrite each with the configured policy.

    plan -> labels -> selection (select.py, by policy) -> compact (compact.py) -> history -> outline

A policy's registered builder says which heads or channels a site keeps (a probe per call, with
or without history; a static choice from calibration; a dense prompt's activations); every
selection then runs the batch on compact weights, the same rewrite for all.

Generation runs a graph in one of three phases (PHASES): `forward` selects and computes, as above;
`prefill` also writes the selection and the compact weights it gathered into slots, in place;
`decode` reads them back: no probe, no gather, no history, compact matmuls only. A selection fixed
at compile time (static policies) is neither stored nor reused: every phase builds it alike. In
both generation phases an attention block keeps K/V whole, so the cache holds every K/V head.

State crosses the graph's boundary as named slots and outputs (seam.py):
  inputs   history/<site> (L, C) per position, seeded (), step ()     (policies with a history)
           stored/<site>/kept, stored/<site>/<weight>   (the prefill writes them in place, decode reads)
  outputs  kept/<site>, share/<site> (telemetry), update/<site>, advance
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from ..config import PPConfig
from . import compact as compacting
from . import static as _static  # noqa: F401  registers the static policies' selection
from .cost import cannot_pay
from .dims import Unsupported, check_resizable
from .graph import GraphInputs, NodeFailed, call, copy_graph, graph_inputs, refresh_values
from .history import History
from .outline import cpp_wrapper, outlined
from .probe import check_sides
from .rewrite import compact, compact_final, site_labels
from .seam import KEPT, SHARE, Seam, parse, slot_name
from .select import PREFILL, RealTensor, SelectContext, first_projection, selector_for, tag_of
from .sites import Site, Unmatched
from .status import Dense, Reason
from .unfuse import prepare

if TYPE_CHECKING:
    from ..calibration import Calibration

PHASES = ("forward", "prefill", "decode")


@dataclass
class PassResult:
    gm: fx.GraphModule
    sites: list[Site]
    problems: list[Unmatched]  # blocks of a decoder layer the pass found no site for
    n_layers: int
    batch: object = 0  # an int, or the symbol of a dynamic batch
    seq_len: object = 0
    seam: Seam = field(default_factory=Seam)
    phase: str = "forward"
    compiled: fx.GraphModule | None = None  # what runs: gm, or, for Inductor, gm with its layers outlined

    @property
    def selected_sites(self) -> list[str]:
        """Sites whose kept indices the graph returns (every rewritten site), in order."""
        return [site for fam, site, _ in map(parse, self.seam.outputs) if fam == KEPT]

    @property
    def dense_by_cost(self) -> list[Site]:
        """Sites the cost rule left dense (cost.py)."""
        return [s for s in self.sites if isinstance(s.status, Dense) and s.status.reason is Reason.CANNOT_PAY]

    @property
    def active_sites(self) -> list[str]:
        """Sites the graph prunes or selects at."""
        return [s.name for s in self.sites if s.pruned]

    @property
    def whole_model(self) -> bool:
        """The graph holds every decoder layer (not a piece of the model between graph breaks)."""
        return bool(self.n_layers) and {s.layer for s in self.sites} == set(range(self.n_layers))

    @property
    def dynamic(self) -> bool:
        return not (isinstance(self.batch, int) and isinstance(self.seq_len, int))


def run_pass(gm: fx.GraphModule, config: PPConfig, *, calibration: "Calibration | None" = None,
             real: RealTensor | None = None, phase: str = "forward",
             stored: frozenset[str] = frozenset(), derived: dict | None = None,
             for_inductor: bool = False) -> PassResult:
    """Rewrite a copy of `gm` for `phase` (see PHASES). Static policies need `calibration` and
    `real` (the real weights, which they score and pre-slice once); `stored`: the sites whose
    selection a prefill stored (what a decode graph can reuse); `derived`: the constants made from
    weights alone, kept across the passes of one model so that its graphs share them
    (compact.derived); `for_inductor`: also make the graph Inductor compiles (`PassResult.compiled`,
    layers outlined). Nothing a site does can fail the pass: a site the rules do not cover stays
    dense, with the reason in its status, and so does a rewritten site that does not run on the
    graph's example values (the last check, when the values are recorded): the pass then runs
    again without it."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    failed: dict[str, Dense] = {}
    while True:
        try:
            return _Pass(gm, config, calibration, real, phase, stored, {} if derived is None else derived,
                         failed, for_inductor).run()
        except _SiteFailed as e:
            failed[e.site] = e.status


class _SiteFailed(Exception):
    def __init__(self, site: str, status: Dense):
        super().__init__(str(status))
        self.site, self.status = site, status


class _Pass:
    """One run of the pass over a copy of the graph."""

    def __init__(self, gm, config: PPConfig, calibration, real, phase: str, stored: frozenset[str],
                 derived: dict, failed: dict[str, Dense], for_inductor: bool = False):
        self.gm = copy_graph(gm)
        self.g, self.config, self.phase, self.stored, self.failed = self.gm.graph, config, phase, stored, failed
        self.calibration, self.real, self.derived = calibration, real, derived
        self.for_inductor = for_inductor
        self.selector = selector_for(config.policy) if config.policy.prunes else None
        self.history = None  # made in run(), with the seam
        self.updates: list[tuple[str, fx.Node]] = []
        self.groups: list[tuple[list[str], str, str]] = []  # each site's selection (node names, tag, kind)

    def run(self) -> PassResult:
        sites, problems, n_layers = prepare(self.gm)
        blocks = self.config.blocks  # a block the config does not prune is dense by choice, matched or not
        problems = [p if blocks in ("both", p.kind) else Unmatched(p.name, p.layer, p.kind, Dense(Reason.BLOCKS, blocks))
                    for p in problems]
        for s in sites:
            if s.name in self.failed:
                s.status = self.failed[s.name]
        result = self.result = PassResult(self.gm, sites, problems, n_layers, phase=self.phase)
        if self.config.uses_history:
            self.history = History(self.g, result.seam, self.config.momentum)
        gi = self.gi = self._graph_inputs(sites)
        if gi is not None:
            result.batch, result.seq_len, result.seam.seq_source = gi.batch, gi.seq_len, gi.seq_source
            _plan(sites, self.config, n_layers, gi)
            labels = self._label(sites)
            self._weigh_cost(sites, labels, gi)
            ctx = SelectContext(self.g, self.config, gi, n_layers, [s for s in sites if s.name in labels], labels,
                                self.real, self.calibration, self.derived)
            for site in ctx.sites:
                self._rewrite(ctx, site)
        self._finish(sites)
        return result

    def _graph_inputs(self, sites: list[Site]) -> GraphInputs | None:
        try:
            return graph_inputs(self.gm, sites) if sites else None
        except Unsupported as e:
            for s in sites:
                s.leave_dense(Reason.UNSUPPORTED, str(e))
            return None

    @property
    def _reuses(self) -> bool:
        """A decode graph reads the selection a prefill stored (a selection made per call)."""
        return self.phase == "decode" and not self.selector.fixed

    def _label(self, sites: list[Site]) -> dict[str, tuple]:
        labels = {}
        design = self.config.policy.design(self.config.probe)
        for site in sites:
            if not site.pruned:
                continue
            if self._reuses and site.name not in self.stored:
                site.leave_dense(Reason.NOT_STORED)
                continue
            try:
                labels[site.name] = _labels(site, whole_kv=self.phase != "forward", design=design)
            except Unsupported as e:
                site.leave_dense(Reason.UNSUPPORTED, str(e))
        return labels

    def _weigh_cost(self, sites: list[Site], labels: dict, gi: GraphInputs) -> None:
        """The cost rule (cost.py), in forward graphs of a policy that gathers per call: a site whose
        compact weights cannot pay at the graph's sizes stays dense (a dynamic graph: guarded)."""
        if self.phase != "forward" or self.selector is None or not self.selector.weighs_cost:
            return
        for site in sites:
            if site.name in labels and (why := cannot_pay(site, self.config.gather_cost, gi.batch, gi.seq_len,
                                                          gi.example)):
                site.leave_dense(Reason.CANNOT_PAY, why)
                del labels[site.name]

    def _rewrite(self, ctx: SelectContext, site: Site) -> None:
        g, seam, tag = self.g, self.result.seam, tag_of(site)
        lab, kv_whole = ctx.labels[site.name]
        if self._reuses:
            site.pruned_flops, site.selected_by = compacting.pruned_fraction(site, kv_whole), PREFILL
            with g.inserting_before(first_projection(site)):
                weights, kept = compacting.reused(g, seam, site, kv_whole)
            compact(g, site, lab, weights, kept, True, tag)  # K/V whole in decode
            return
        history = self.history.input(site, ctx.gi) if self.history is not None else None
        before = set(g.nodes)
        sel = self.selector.build(ctx, site, history)  # a static policy's first build sets every kept count
        site.pruned_flops = 0.0 if sel.runs_dense else compacting.pruned_fraction(site, kv_whole, sel.final_only)
        site.selected_by = sel.by or self.config.policy.name
        stores = self.phase == "prefill" and not self.selector.fixed
        compacted = None
        if stores or not sel.runs_dense:
            with g.inserting_before(sel.anchor):  # a prefill stores every compact weight, for its decode steps
                compacted = compacting.compact_weights(ctx, site, sel, kv_whole, tag, sel.final_only and not stores)
        if sel.outline:  # constants (get_attr, at the graph's start) enter the subgraph as inputs
            self.groups.append(([n.name for n in g.nodes if n not in before and n.op != "get_attr"], tag, site.kind))
        seam.output(slot_name(KEPT, site.name), sel.kept)
        if stores:
            with g.inserting_before(sel.anchor):
                compacting.store(g, seam, site, kv_whole, {"kept": sel.kept, **compacted.named})
        if sel.share is not None and self.config.telemetry:
            seam.output(slot_name(SHARE, site.name), sel.share)
        if sel.final_only:
            compact_final(g, site, compacted.weights[site.final][0], compacted.channels, tag)
        elif not sel.runs_dense:
            compact(g, site, lab, compacted.weights, sel.kept, kv_whole, tag)
        if sel.bias is not None:
            _add_bias(g, site.final, sel.bias, tag)
        if history is not None and sel.energy is not None:  # every channel ran: every channel learns
            self.updates.append(self.history.update_every(site, ctx.gi, history, sel.energy, tag))
        elif history is not None:
            self.updates.append(self.history.update(site, ctx.gi, history, sel.kept, tag))

    # ---- outputs, outlining, the last check ----
    def _finish(self, sites: list[Site]) -> None:
        g, seam = self.g, self.result.seam
        if self.history is not None:
            self.updates += self.history.advance()
        for name, node in self.updates:  # state updates are outputs too: no pass drops them as dead code
            seam.output(name, node)
        seam.close(g)
        g.lint()
        self.gm.recompile()
        if self.gi is not None:  # something was rewritten: record the values it makes (inlined, the
            self._refresh(sites)  # selections propagate in half the time they take outlined)
        self.result.compiled = self.gm
        if self.for_inductor:  # on a copy: the sites keep naming self.gm's nodes
            layer_of_site = {tag_of(s): s.name.rsplit(".", 1)[0].replace(".", "_") for s in sites}
            graph = copy_graph(self.gm)  # Inductor's C++ wrapper cannot call a subgraph: inline there
            self.result.compiled = graph if cpp_wrapper() else outlined(graph, self.groups, layer_of_site)
        outlined(self.gm, self.groups)

    def _refresh(self, sites: list[Site]) -> None:
        try:
            refresh_values(self.gm)
        except NodeFailed as e:
            site = _site_of(e.node, sites)
            if site is None or site.name in self.failed:
                raise
            cause = e.__cause__ or e
            raise _SiteFailed(site.name, Dense(Reason.DOES_NOT_RUN, f"{type(cause).__name__}: "
                                                                   f"{str(cause).splitlines()[0][:160]}")) from e


def _plan(sites: list[Site], config: PPConfig, n_layers: int, gi: GraphInputs) -> None:
    """Each site's sizes, what the config leaves dense, and every kept count."""
    policy = config.policy
    if (why := config.unreachable(n_layers)) and policy.prunes:
        warnings.warn(f"ppcompile: {why}", stacklevel=2)
    for s in sites:
        s.batch, s.seq_len = gi.batch, gi.seq_len
        if s.pruned and s.layer in config.skip_layers:
            s.leave_dense(Reason.SKIPPED_LAYER)
        elif config.blocks not in ("both", s.kind):  # by choice, whatever else would keep it dense
            s.leave_dense(Reason.BLOCKS, config.blocks)
        elif not s.pruned:
            s.kept = s.units
        elif not policy.prunes:
            s.leave_dense(Reason.POLICY, str(policy))
        elif s.kind not in policy.kinds:
            s.leave_dense(Reason.POLICY, f"{policy} prunes {' and '.join(policy.kinds)} only")
        elif s.units % config.shards:
            s.leave_dense(Reason.UNEVEN_SHARDS, f"its {s.units} {'heads' if s.heads else 'channels'} do not split "
                                                f"evenly over shards={config.shards}")
        else:
            s.kept = config.kept_units(s.kind, s.units, n_layers)


def _labels(site: Site, whole_kv: bool, design) -> tuple:
    """Dim labels of the block and whether its K/V stay whole (rewrite.site_labels), checked
    against the probe design's tokens and against the resizes the rewrite makes."""
    lab, kv_whole = site_labels(site, whole_kv)
    check_sides(lab, design)
    for n, labels in lab.labels.items():  # the probe resizes b and s, the compact rewrite h and c
        check_resizable(n, labels, {"b", "s"})
        check_resizable(n, labels, {"h", "c"})
    return lab, kv_whole


def _site_of(node: fx.Node, sites: list[Site]) -> Site | None:
    """The site a node of the rewritten graph belongs to: one of its own nodes, or one the pass
    made for it (named after it)."""
    for s in sites:
        if node in s.region or node in s.projections or node is s.final:
            return s
    tags = [s for s in sites if node.name.startswith(tag_of(s) + "_")]
    return max(tags, key=lambda s: len(s.name), default=None)


def _add_bias(g: fx.Graph, final: fx.Node, bias: torch.Tensor, tag: str) -> None:
    b = compacting.const(g, f"{tag}_bias_compensation", bias)  # (d_out,)
    with g.inserting_after(final):
        added = call(g, torch.add, final, b, name=f"{tag}_compensated")
    final.replace_all_uses_with(added, delete_user_cb=lambda u: u is not added)

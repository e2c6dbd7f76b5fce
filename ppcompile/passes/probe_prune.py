"""The pass: find every block, and rewrite each with the configured policy.

Policies (see policies.py) differ only in where the kept indices come from: a probe (with or
without history) chosen per call, or a static choice from calibration (weights pre-sliced once).
Every policy then runs the whole batch on compact weights (the same `compact` rewrite).

Generation runs a graph in one of three phases (PHASES): `forward` selects and computes, as above;
`prefill` also writes the selection and the compact weights it gathered into slots, in place;
`decode` reads them back: no probe, no gather, no history, compact matmuls only. In both generation
phases an attention block keeps K/V whole, so the cache holds every K/V head.

State crosses the graph's boundary as named slots and outputs (seam.py):
  inputs   history/<site> (L, C) per position, seeded (), step ()     (policies with a history)
           stored/<site>/kept, stored/<site>/<weight>   (the prefill writes them in place, decode reads)
  outputs  kept/<site>, share/<site> (telemetry), update/<site>, advance
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from .. import baselines, ops, tp
from ..baselines import StaticChoice
from ..calibration import Calibration
from ..config import PPConfig
from .dims import Unsupported, check_resizable
from .graph import (GraphInputs, NodeFailed, body_start, call, copy_graph, final_input, graph_inputs, mul,
                    refresh_values)
from .outline import Outliner
from .rewrite import compact, escapes, label_site, probe_activation
from .seam import Seam, Slot
from .sites import Site, module_path, value
from .unfuse import prepare

@dataclass
class PassResult:
    gm: fx.GraphModule
    sites: list[Site]
    problems: list[str]
    n_layers: int
    batch: object = 0  # an int, or the symbol of a dynamic batch
    seq_len: object = 0
    seam: Seam = field(default_factory=Seam)
    phase: str = "forward"

    @property
    def selected_sites(self) -> list[str]:
        """Sites whose kept indices the graph returns (every rewritten site), in order."""
        return [name[len("kept/"):] for name in self.seam.outputs if name.startswith("kept/")]

    @property
    def active_sites(self) -> list[str]:
        """Sites the graph prunes or selects at (every site whose status is "pruned")."""
        return [s.name for s in self.sites if s.status == "pruned"]

    @property
    def whole_model(self) -> bool:
        """The graph holds every decoder layer (not a piece of the model between graph breaks)."""
        return bool(self.n_layers) and {s.layer for s in self.sites} == set(range(self.n_layers))

    @property
    def dynamic(self) -> bool:
        return not (isinstance(self.batch, int) and isinstance(self.seq_len, int))


RealTensor = Callable[[fx.Node], "torch.Tensor | None"]  # a weight node -> its real tensor, if known

SEEDED = Slot("seeded", dtype=torch.bool)  # the history holds real statistics
STEP = Slot("step", dtype=torch.long)  # calls so far; call 0 is the warm-up
PHASES = ("forward", "prefill", "decode")


def history_slot(site: Site) -> Slot:
    """A site's history: mean of its final projection's input squared, per position and channel."""
    return Slot(f"history/{site.name}", (site.channels,), per_position=True)


def _kept(site: Site, config: PPConfig, n_layers: int) -> int:
    return config.kept_units(site.kind, site.heads or site.channels, n_layers)


def _plan(sites: list[Site], config: PPConfig, n_layers: int, gi: GraphInputs) -> None:
    policy = config.policy
    if (why := config.unreachable(n_layers)) and policy.prunes:
        warnings.warn(f"ppcompile: {why}", stacklevel=2)
    for s in sites:
        s.info["B"], s.info["L"] = gi.batch, gi.seq_len
        if s.status != "pruned":
            continue
        if s.layer in config.skip_layers:
            s.status = "dense: skipped layer"
        elif config.blocks not in ("both", s.kind):
            s.status = f"dense: blocks={config.blocks}"
        elif not policy.prunes:
            s.status = f"dense: policy {policy}"
        elif s.kind not in policy.kinds:
            s.status = f"dense: policy {policy} prunes {' and '.join(policy.kinds)} only"
        elif (s.heads or s.channels) % config.shards:
            s.status = (f"dense: its {s.heads or s.channels} {'heads' if s.heads else 'channels'} do not split "
                        f"evenly over shards={config.shards}")
        s.kept = _kept(s, config, n_layers) if s.status == "pruned" else (s.heads or s.channels)


def run_pass(gm: fx.GraphModule, config: PPConfig, *, calibration: Calibration | None = None,
             real: RealTensor | None = None, phase: str = "forward",
             stored: frozenset[str] = frozenset(), derived: dict | None = None) -> PassResult:
    """Rewrite a copy of `gm` for `phase` (see PHASES). Static policies need `calibration` and
    `real` (the real weights, which they score and pre-slice once); `stored`: the sites whose
    selection a prefill stored (what a decode graph can reuse); `derived`: the constants made from
    weights alone, kept across the passes of one model so that its graphs share them (see
    _derived). Nothing a site does can fail the pass: a site the rules do not cover stays dense,
    with the reason in its status, and so does a rewritten site that does not run on the graph's
    example values (the last check, when the values are recorded): the pass then runs again
    without it."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    failed: dict[str, str] = {}
    while True:
        try:
            return _rewrite(gm, config, calibration, real, phase, stored, {} if derived is None else derived, failed)
        except _SiteFailed as e:
            failed[e.site] = e.status


class _SiteFailed(Exception):
    def __init__(self, site: str, status: str):
        super().__init__(status)
        self.site, self.status = site, status


def _rewrite(gm: fx.GraphModule, config: PPConfig, calibration: Calibration | None, real: RealTensor | None,
             phase: str, stored: frozenset[str], derived: dict, failed: dict[str, str]) -> PassResult:
    gm = copy_graph(gm)
    g = gm.graph
    sites, problems, n_layers = prepare(gm)
    for s in sites:
        if s.name in failed:
            s.status = failed[s.name]
    result = PassResult(gm, sites, problems, n_layers, phase=phase)
    policy = config.policy
    try:
        gi = graph_inputs(gm, sites) if sites else None
    except Unsupported as e:
        for s in sites:
            s.status, s.kept = f"dense: {e}", s.heads or s.channels
        gi = None
    if gi is None:
        result.seam.close(g)
        gm.recompile()
        return result
    result.batch, result.seq_len = gi.batch, gi.seq_len
    seam = result.seam
    seam.seq_source = gi.seq_source
    _plan(sites, config, n_layers, gi)
    reuse = phase == "decode" and not policy.static  # reads a prefill's selection
    store = phase == "prefill" and not policy.static  # returns its selection for the decode
    labels = {}
    for site in sites:
        if site.status != "pruned":
            continue
        if reuse and site.name not in stored:
            site.status, site.kept = "dense: no prefill stored a selection for it", site.heads or site.channels
            continue
        try:
            labels[site.name] = _labels(site, whole_kv=phase != "forward",
                                        probe=config.probe if policy.probe == "sampled" else None)
        except Unsupported as e:
            site.status = f"dense: {e}"
    static = None
    if policy.static:
        static = _static_choices(policy, [s for s in sites if s.name in labels], labels, calibration, real,
                                 config.layer_ratio(n_layers), config.shards)

    step = seeded = weight = None
    updates: list[tuple[str, fx.Node]] = []
    groups: list[tuple[list[fx.Node], str, str]] = []  # each site's selection nodes, to outline
    for site in sites:
        if site.name not in labels or site.status != "pruned":
            continue
        lab, kv_whole = labels[site.name]
        tag = site.name.replace(".", "_")
        dense_block = policy.dense_prefill and not reuse  # griffin: the selecting call runs dense
        site.info["pruned_flops"] = 0.0 if dense_block else \
            ((site.heads or site.channels) - site.kept) * _unit_cost(site, kv_whole) / _block_cost(site)
        if reuse:
            with g.inserting_before(min(site.projections, key=_order(g))):
                new_weights, kept = _reused_weights(g, seam, site, kv_whole)
            compact(g, site, lab, new_weights, kept, True, tag)  # K/V whole in decode
            continue
        history = None
        if config.uses_history:
            if step is None:
                seeded, step = seam.input(g, SEEDED), seam.input(g, STEP)
                with g.inserting_before(body_start(g)):
                    weight = call(g, ops.ema_weight, step, seeded, config.momentum, name="pp_ema_weight")
            history = seam.input(g, history_slot(site), gi.seq_example)
        first = site.final if dense_block else min(site.projections, key=_order(g))
        before = set(g.nodes)
        with g.inserting_before(first):
            if static is not None:
                share, kept_now = None, static[site.name].kept
                kept = _const(g, f"{tag}_kept", kept_now)
            elif dense_block:
                act = final_input(g, site, gi, tag)
                scores = call(g, ops.activation_scores, act, gi.valid, name=f"{tag}_score")
                kept = call(g, ops.top_indices, scores, site.kept, config.shards, name=f"{tag}_select")
                share = kept_now = None
            else:
                kept, share = _dynamic_select(g, site, lab, config, gi.valid, history, gi, real, derived, tag)
                kept_now = None
            chan = new_weights = named = None
            if store or not dense_block:
                chan, new_weights, named = _compact_weights(g, site, kept, kept_now, kv_whole, real, derived,
                                                            config.copies_final, tag)
        if static is None and not dense_block:
            # constants (get_attr, placed at the graph's start) enter the subgraph as inputs
            groups.append(([n for n in g.nodes if n not in before and n.op != "get_attr"], tag, site.kind))
        seam.output(f"kept/{site.name}", kept)
        if store:
            with g.inserting_before(first):
                _store(g, seam, site, kv_whole, {"kept": kept, **named})
        if share is not None and config.telemetry:
            seam.output(f"share/{site.name}", share)
        if not dense_block:
            compact(g, site, lab, new_weights, kept, kv_whole, tag)
        if static is not None and static[site.name].bias is not None:
            _add_bias(g, site.final, static[site.name].bias, tag)
        if history is not None:
            x_final = final_input(g, site, gi, tag)
            with g.inserting_after(site.final):
                upd = call(g, ops.ema_update_, history, chan, x_final, gi.valid, weight,
                           name=f"{tag}_history_update")
            updates.append((f"update/{site.name}", upd))
    if step is not None:
        with g.inserting_before(next(n for n in g.nodes if n.op == "output")):
            updates.append(("advance", call(g, ops.advance_, step, seeded, name="pp_advance")))
    # State updates are outputs too, so that no pass drops them as dead code.
    for name, node in updates:
        seam.output(name, node)
    seam.close(g)
    outliner = Outliner(gm)
    for nodes, tag, kind in groups:
        outliner.outline(nodes, tag, kind)
    g.lint()
    gm.recompile()
    try:
        refresh_values(gm)
    except NodeFailed as e:
        site = _site_of(e.node, sites)
        if site is None or site.name in failed:
            raise
        cause = e.__cause__ or e
        raise _SiteFailed(site.name, f"dense: the rewritten block does not run ({type(cause).__name__}: "
                                     f"{str(cause).splitlines()[0][:160]})") from e
    return result


def _site_of(node: fx.Node, sites: list[Site]) -> Site | None:
    """The site a node of the rewritten graph belongs to: one of its own nodes, or one the pass
    made for it (named after it)."""
    for s in sites:
        if node in s.region or node in s.projections or node is s.final:
            return s
    tags = [s for s in sites if node.name.startswith(s.name.replace(".", "_") + "_")]
    return max(tags, key=lambda s: len(s.name), default=None)


def _static_choices(policy, sites: list[Site], labels: dict, calibration: Calibration | None,
                    real: RealTensor | None, layer_ratio: float, groups: int) -> dict[str, StaticChoice]:
    """The static decision for every site. On a rank of a tensor-parallel model, the channel
    metrics of every rank are gathered (once, here, at compile time) and every rank makes the one
    decision for whole blocks, then keeps its own run of it: what one process with shards=world
    keeps (FLAP's threshold is global, so ranks may keep different counts)."""
    if calibration is None:
        raise ValueError(f"policy '{policy}' is static: it needs calibration statistics; pass "
                         "calibration=<token batches or a saved Calibration> to pp.compile")
    if real is None:
        raise ValueError(f"policy '{policy}' needs the real weights of the graph to score them")
    weights, cost = {}, {}
    for s in sites:
        w = real(s.final.args[1])
        if w is None:
            raise ValueError(f"{s.name}: the weight of its final projection is not a real tensor "
                             f"here, so policy '{policy}' cannot score it")
        weights[s.name] = w
        cost[s.name] = _unit_cost(s, labels[s.name][1])
    metrics = {s.name: policy.channel_metric(s, weights[s.name], calibration) for s in sites}
    rank, world = 0, 1
    if group := tp.shard_group(sites):
        metrics, rank, world = tp.whole_blocks(metrics, group)
    kept = baselines.choose(policy, sites, metrics, {s.name: s.kept * world for s in sites}, cost, layer_ratio,
                            groups * world)
    choices = {}
    for s in sites:
        units = s.heads or s.channels  # this rank's
        mine = kept[s.name][kept[s.name] // units == rank] - rank * units
        choices[s.name] = StaticChoice(mine, policy.bias(s, weights[s.name], mine, calibration))
        s.kept = len(mine)
    return choices


def _block_cost(site: Site) -> float:
    """Multiply-adds per token of the block's projections."""
    return float(sum(value(p.args[1]).numel() for p in site.projections + [site.final]))


def _pruned_projections(site: Site, kv_whole: bool) -> list[fx.Node]:
    """The first projections whose rows are pruned: all of them, but K and V when kept whole."""
    qkv = site.info.get("qkv", {})
    return [p for p in site.projections if not (kv_whole and p in (qkv.get("k"), qkv.get("v")))]


def _unit_cost(site: Site, kv_whole: bool) -> float:
    """Multiply-adds per token of one unit (head or channel): its rows of the pruned first
    projections and its columns of the final projection."""
    per_unit = site.head_dim if site.kind == "attention" else 1
    rows = sum(value(p.args[1]).shape[1] for p in _pruned_projections(site, kv_whole))
    return float(per_unit * (rows + value(site.final.args[1]).shape[0]))


def _order(g: fx.Graph):
    pos = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: pos[n]


def _labels(site: Site, whole_kv: bool = False, probe=None):
    """Dim labels of the block, and whether its K/V stay whole (GQA, K/V in a cache, or asked).
    `probe`: the probe design, when the pass probes: one whose tokens have positions of their own
    needs every side input with sequence dims lined up with the batch, and a packed row has no
    sequence to give a side input that has a batch dim and no sequence dim."""
    kv_whole = False
    if site.kind == "attention":
        leaked = escapes(site)
        kv_whole = whole_kv or site.kv_heads != site.heads or bool(leaked)
        lab = label_site(site, kv_whole)
        q_leaks = [n for n in leaked if n in lab.labels and any(a.name == "h" for d in lab.labels[n] for a in d)]
        if q_leaks:
            raise Unsupported(f"{q_leaks[0].name} (per query head) is used outside the block")
    else:
        lab = label_site(site, kv_whole)
        if escapes(site):
            raise Unsupported("an intermediate of the MLP is used outside the block")
    fin = lab.labels.get(site.final.args[0])
    if fin is None or [a.name for a in fin[-1]][:1] not in (["h"], ["c"]):
        raise Unsupported("the final projection's input is not laid out by head/channel")
    if probe is not None and probe.per_token:
        unaligned = [n for (n, key), need in lab.side.items() if "s" in need.values() and (n, key) not in lab.side_batch]
        if unaligned:
            raise Unsupported(f"{unaligned[0].name}: a side input has sequence dims but no batch dim to gather "
                              f"it per sequence (probe='{probe}'; use probe='paper')")
        per_row = [n for (n, key), need in lab.side.items() if "b" in need.values() and "s" not in need.values()]
        if per_row and probe.packed:
            raise Unsupported(f"{per_row[0].name}: a side input per sequence has no positions to follow a packed "
                              f"probe row (probe='{probe}'; use another probe)")
    for n, labels in lab.labels.items():  # the probe resizes b and s, the compact rewrite h and c
        check_resizable(n, labels, {"b", "s"})
        check_resizable(n, labels, {"h", "c"})
    return lab, kv_whole


def _dynamic_select(g, site: Site, lab, config: PPConfig, valid, history, gi: GraphInputs,
                    real: RealTensor | None, derived: dict, tag: str):
    """Probe -> (fuse with history) -> score -> top-k: the kept heads or channels of this batch,
    and the probe's share of the fused energy."""
    energy, share = _probe_energy(g, site, lab, config, valid, history, gi, tag)
    w = site.final.args[1]
    t = real(w) if real is not None else None
    terms = _const(g, f"{tag}_weight_terms", _derived(derived, t, "terms", ops.column_terms)) if t is not None else \
        call(g, ops.column_terms, w, name=f"{tag}_weight_terms")  # weights unknown here: every call
    if site.kind == "attention":
        scores = call(g, ops.head_scores, energy, terms, site.heads, name=f"{tag}_score")
    else:
        scores = call(g, ops.channel_scores, energy, terms, name=f"{tag}_score")
    return call(g, ops.top_indices, scores, site.kept, config.shards, name=f"{tag}_select"), share


def _compact_weights(g, site: Site, kept: fx.Node, kept_now: torch.Tensor | None, kv_whole: bool,
                     real: RealTensor | None, derived: dict, copies_final: Callable[[torch.device], bool],
                     tag: str):
    """The kept rows of the first projections and columns of the final one. With indices known
    now (static policies) and real weights, they are sliced once here and enter as constants;
    otherwise the graph gathers them on every call (an MLP's final columns from a transposed copy
    where `copies_final`: see PPConfig.final_layout). Returns (channels, projection -> (weight, bias),
    the same weights by name: see _weight_names)."""
    if site.kind == "attention":
        chan = call(g, ops.head_channels, kept, site.head_dim, name=f"{tag}_channels")
        chan_now = None if kept_now is None else ops.head_channels(kept_now, site.head_dim)
    else:
        chan, chan_now = kept, kept_now

    unit = site.head_dim if site.kind == "attention" else 1

    def gather(w: fx.Node, dim: int, name: str) -> fx.Node:
        t = real(w) if real is not None else None
        if t is not None and chan_now is not None and len(chan_now) == t.shape[dim]:
            return w  # every unit kept (ratio 0): the model's own weight, no copy, the dense matmul
        if t is not None and chan_now is not None:  # in the layout a matmul of a few tokens reads fastest (_stored)
            kept_t = t.detach().index_select(dim, chan_now.to(t.device))
            return _const(g, f"{tag}_{name}", kept_t.t().contiguous().t() if kept_t.dim() == 2 else kept_t)
        if t is not None and dim == 1 and unit == 1 and copies_final(t.device):
            # the kept columns as rows of a transposed copy made once: a contiguous gather
            w_t = _const(g, f"{tag}_{name}_transposed",
                         _derived(derived, t, "transposed", lambda w: w.t().contiguous()))  # (C, d_out)
            rows = call(g, torch.index_select, w_t, 0, kept, name=f"{tag}_gather_{name}_rows")  # (k, d_out)
            return call(g, torch.Tensor.t, rows, name=f"{tag}_gather_{name}")
        return call(g, ops.gather_units, w, dim, kept, unit, name=f"{tag}_gather_{name}")

    weights, named = {}, {}
    for p, (wname, bname) in _weight_names(site, kv_whole).items():
        w = named[wname] = gather(p.args[1], 1 if p is site.final else 0, wname)
        b = None
        if bname is not None:
            b = named[bname] = gather(_bias(p), 0, bname)
        weights[p] = (w, b)
    return chan, weights, named


def _weight_names(site: Site, kv_whole: bool) -> dict[fx.Node, tuple[str, str | None]]:
    """Each projection whose weight is compacted -> the names of its weight and bias ("q_w", "q_b";
    "final_w"; the bias name None when it has none)."""
    names = {}
    for p in _pruned_projections(site, kv_whole):
        role = _role(site, p)
        names[p] = (f"{role}_w", f"{role}_b" if isinstance(_bias(p), fx.Node) else None)
    names[site.final] = ("final_w", None)
    return names


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _stored(site: Site, kv_whole: bool) -> dict[str, Slot]:
    """What a prefill stores for `site` and its decode steps read, by name ("kept", "q_w", ...):
    the kept units, and each compact weight transposed, (in, out) contiguous: the layout a matmul
    of a few tokens reads fastest (bench/layout.py: about 2x nn.Linear's (out, in) at 8 tokens on
    the development CPU)."""
    width = site.kept * (site.head_dim if site.kind == "attention" else 1)
    slots = {"kept": Slot(f"stored/{site.name}/kept", (site.kept,), dtype=torch.long)}
    for p, (wname, bname) in _weight_names(site, kv_whole).items():
        w = value(p.args[1])
        shape = (width, w.shape[0]) if p is site.final else (w.shape[1], width)
        slots[wname] = Slot(f"stored/{site.name}/{wname}", shape, dtype=w.dtype)
        if bname is not None:
            slots[bname] = Slot(f"stored/{site.name}/{bname}", (width,), dtype=w.dtype)
    return slots


def _store(g: fx.Graph, seam: Seam, site: Site, kv_whole: bool, named: dict[str, fx.Node]) -> None:
    """A prefill writes its kept units and compact weights into their slots, in place: the same
    tensors every generation, which the decode graphs read."""
    for name, slot in _stored(site, kv_whole).items():
        node, src = seam.input(g, slot), named[name]
        if len(slot.shape) == 2:  # Inductor writes the transpose as one tiled kernel
            src = call(g, torch.Tensor.t, src, name=f"{node.name}_src")
        call(g, torch.ops.aten.copy_.default, node, src, name=f"{node.name}_store")


def _reused_weights(g: fx.Graph, seam: Seam, site: Site, kv_whole: bool):
    """A decode graph's compact weights and kept units: the slots a prefill wrote (_store), each
    weight read as a transposed view, in its projection's own (out, in) shape."""
    slots = _stored(site, kv_whole)
    nodes = {name: seam.input(g, dataclasses.replace(slot, required=True)) for name, slot in slots.items()}

    def read(name: str | None) -> fx.Node | None:
        if name is None:
            return None
        n = nodes[name]
        return call(g, torch.Tensor.t, n, name=f"{n.name}_t") if len(slots[name].shape) == 2 else n

    weights = {p: (read(w), read(b)) for p, (w, b) in _weight_names(site, kv_whole).items()}
    return weights, nodes["kept"]


def _role(site: Site, p: fx.Node) -> str:
    """A projection's name that every graph of the model gives it alike (a prefill's stored weights
    are found by it in the decode graph): q/k/v, else its module's name, else its rank."""
    for r, n in site.info.get("qkv", {}).items():
        if n is p:
            return r
    name = module_path(p).rsplit(".", 1)[-1]
    if name and sum(module_path(o) == module_path(p) for o in site.projections) == 1:
        return name
    return f"proj{sorted(site.projections, key=_order(p.graph)).index(p)}"


def _probe_energy(g, site: Site, lab, config: PPConfig, valid, history, gi: GraphInputs, tag: str):
    B, L = gi.batch_arg, gi.seq_arg
    x, x_res = site.x, site.x_res
    if value(x).dim() == 2:  # (B*L, d) blocks (OPT's MLP): view as (B, L, d)
        x = call(g, torch.Tensor.view, x, B, L, -1, name=f"{tag}_x")
    if value(x_res).dim() == 2:
        x_res = call(g, torch.Tensor.view, x_res, B, L, -1, name=f"{tag}_x_res")
    design = config.probe
    if config.policy.probe == "all":
        k_b, k_t = B, L
        kept_b = call(g, torch.arange, B, name=f"{tag}_probe_b")
        kept_t = call(g, torch.arange, L, name=f"{tag}_probe_t")
    elif design.per_token:  # positions per sequence (B, k_t), or one packed row (1, k_t) with each token's sequence
        k_b, k_t = _probe_sizes(g, config, site, B, L, tag)
        sel = call(g, design.select, x_res, valid, k_t, name=f"{tag}_probe_select")
        kept_b, kept_t, ok = (call(g, _getitem, sel, i, name=f"{tag}_probe_{what}") for i, what in enumerate(("b", "t", "ok")))
    else:  # the paper's: rows (k_b,) sharing positions (k_t,)
        k_b, k_t = _probe_sizes(g, config, site, B, L, tag)
        sel = call(g, ops.select_probe, x_res, valid, k_t, k_b, config.sequence_first, name=f"{tag}_probe_select")
        kept_b = call(g, _getitem, sel, 0, name=f"{tag}_probe_b")
        kept_t = call(g, _getitem, sel, 1, name=f"{tag}_probe_t")
    per_token = design.per_token and config.policy.probe != "all"
    p = call(g, ops.tokens_at if per_token else _gather_probe, x, kept_b, kept_t, name=f"{tag}_probe_x")
    if value(site.x).dim() == 2:
        p = call(g, torch.Tensor.reshape, p, mul(g, k_b, k_t, f"{tag}_probe_rows"), -1, name=f"{tag}_probe_x2d")
    act = probe_activation(g, site, lab, p, kept_b, kept_t, k_b, k_t, tag, per_token,
                           packed=design.packed and per_token)
    act = call(g, torch.Tensor.reshape, act, k_b, k_t, -1, name=f"{tag}_probe_act")
    if per_token:  # each probe token on its own: (k_b * k_t, C), pads and repeats zero
        energy = call(g, ops.token_energy, act, ok, name=f"{tag}_probe_energy")
        hist = None if history is None else \
            call(g, ops.history_at, history, kept_t, ok, name=f"{tag}_history_at_probe")
    else:  # the batch mean per position: (k_t, C)
        pvalid = call(g, _gather_probe, valid, kept_b, kept_t, name=f"{tag}_probe_valid") if valid is not None else None
        energy = call(g, ops.probe_energy, act, pvalid, name=f"{tag}_probe_energy")
        hist = None if history is None else \
            call(g, torch.index_select, history, 0, kept_t, name=f"{tag}_history_at_probe")
    if hist is None:
        share = call(g, torch.ones, (), name=f"{tag}_share") if config.telemetry else None
        return call(g, torch.sum, energy, 0, name=f"{tag}_energy"), share
    share = call(g, ops.probe_share, energy, hist, name=f"{tag}_share") if config.telemetry else None
    return call(g, ops.fuse_history, energy, hist, name=f"{tag}_fuse"), share


def _probe_sizes(g, config: PPConfig, site: Site, B, L, tag: str):
    """Probe rows and positions: ints in a static graph, size nodes (of B and L) in a dynamic one.
    With a probe_budget the positions follow from the site's costs (ops.budget_positions)."""
    static = isinstance(B, int) and isinstance(L, int)

    def size(fn, *args, name: str):
        return fn(*args) if static else call(g, fn, *args, name=f"{tag}_{name}")

    design = config.probe
    k_b = size(ops.probe_count, B, *config.probe_rule("sample"), name="probe_rows")
    rows = B if design.per_sequence else 1 if design.packed else k_b
    # A packed row holds at most L tokens: its attention, k_t x k_t pairs, then stays within the
    # L keys per token that the budget counts.
    if config.probe_budget is not None:
        k_t = size(ops.budget_positions, B, L, rows, *config.budget_fraction(), *_probe_costs(site),
                   name="probe_positions")
    else:
        k_t = size(ops.probe_count, L, *config.probe_rule("position"), name="probe_positions")
        if design.per_sequence:  # as many tokens as the paper's probe, over every sequence
            k_t = size(ops.spread_count, B, L, k_b, k_t, name="probe_positions_each")
        elif design.packed:  # as many tokens as the paper's probe, in one row
            k_t = size(ops.packed_count, L, k_b, k_t, name="probe_tokens")
    return rows, k_t


def _probe_costs(site: Site) -> tuple[int, int, int]:
    """Multiply-adds of the block per token: its first projections (all of which the probe runs),
    its final projection, and its attention per pair of tokens (QK and AV; 0 for an MLP)."""
    first = sum(value(p.args[1]).numel() for p in site.projections)
    pair = 2 * site.heads * site.head_dim if site.kind == "attention" else 0
    return first, value(site.final.args[1]).numel(), pair


def _getitem(t, i):
    return t[i]


def _gather_probe(x: torch.Tensor, kept_b: torch.Tensor, kept_t: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, kept_b).index_select(1, kept_t)  # (k_b, k_t, ...)


def _derived(memo: dict, weight: torch.Tensor, what: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """make(weight), made once per weight and version of it: every graph of one model (its shapes,
    its generation phases) holds the same tensor instead of a copy each. A weight changed in
    place (a new version) gets a new one."""
    key = (id(weight), what)
    hit = memo.get(key)
    if hit is None or hit[0] is not weight or hit[1] != weight._version:
        hit = memo[key] = (weight, weight._version, make(weight.detach()))
    return hit[2]


def _const(g: fx.Graph, name: str, t: torch.Tensor) -> fx.Node:
    g.owning_module.register_buffer(name, t)
    with g.inserting_before(body_start(g)):
        return g.get_attr(name)


def _add_bias(g: fx.Graph, final: fx.Node, bias: torch.Tensor, tag: str) -> None:
    b = _const(g, f"{tag}_bias_compensation", bias)
    with g.inserting_after(final):
        added = call(g, torch.add, final, b, name=f"{tag}_compensated")
    final.replace_all_uses_with(added, delete_user_cb=lambda u: u is not added)

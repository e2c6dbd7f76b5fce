"""The pass: find every block, and rewrite each with the configured policy.

Policies differ only in where the kept indices come from:
  pp          probe + history (the method)        full-batch  the whole batch is the probe
  wanda-sp / flap  fixed from calibration (weights pre-sliced once)       dense  no rewrite
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .. import ops
from ..config import PPConfig
from .dims import Unsupported
from .rewrite import GraphInputs, _call, compact, escapes, label_site, probe_activation
from .sites import Site, find_sites, sdpa_qkv, value


@dataclass
class StaticChoice:
    """A static policy's decision for one site, made once from calibration statistics."""
    kept: torch.Tensor  # kept heads (attention) or channels (MLP), ascending
    bias: torch.Tensor | None = None  # FLAP bias compensation, added to the final projection's output


@dataclass
class PassResult:
    gm: fx.GraphModule
    sites: list[Site]
    problems: list[str]
    n_layers: int
    batch: int
    seq_len: int
    history_sites: list[str] = field(default_factory=list)  # order of the history inputs
    selected_sites: list[str] = field(default_factory=list)  # order of the kept-index outputs
    uses_step: bool = False  # the graph takes (step, seeded) after the histories
    n_outputs: int = 0  # outputs of the original graph (extra outputs are state updates)


def _graph_inputs(gm: fx.GraphModule, sites: list[Site]) -> GraphInputs:
    shapes = [tuple(value(s.x_res).shape[:2]) for s in sites if value(s.x_res).dim() == 3]
    if not shapes:
        raise Unsupported("no block input of shape (batch, sequence, hidden)")
    batch, seq_len = shapes[0]
    mask = None
    for n in gm.graph.nodes:
        v = value(n)
        if n.op == "placeholder" and "attention_mask" in n.name and v is not None \
                and tuple(v.shape) == (batch, seq_len):
            mask = n
    return GraphInputs(valid=mask, batch=batch, seq_len=seq_len)


def _kept(site: Site, config: PPConfig, n_layers: int) -> int:
    if site.kind == "attention":
        return config.kept_heads(site.heads, n_layers)
    return config.kept_channels(site.channels, n_layers)


def _plan(sites: list[Site], config: PPConfig, n_layers: int, gi: GraphInputs) -> None:
    for s in sites:
        s.info["B"], s.info["L"] = gi.batch, gi.seq_len
        if s.status != "pruned":
            continue
        if s.layer in config.skip_layers:
            s.status = "dense: skipped layer"
        elif config.blocks not in ("both", s.kind):
            s.status = f"dense: blocks={config.blocks}"
        elif config.policy == "dense":
            s.status = "dense: policy dense"
        s.kept = _kept(s, config, n_layers) if s.status == "pruned" else (s.heads or s.channels)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite: Dynamo reads its own graph again after the backend returns."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


def run_pass(gm: fx.GraphModule, config: PPConfig,
             static: dict[str, StaticChoice] | None = None) -> PassResult:
    gm = _copy(gm)
    g = gm.graph
    sites, problems, n_layers = find_sites(gm)
    out_node = next(n for n in g.nodes if n.op == "output")
    outputs = out_node.args[0]
    result = PassResult(gm, sites, problems, n_layers, 0, 0,
                        n_outputs=len(outputs) if isinstance(outputs, (tuple, list)) else 1)
    if not sites:
        return result
    gi = _graph_inputs(gm, sites)
    result.batch, result.seq_len = gi.batch, gi.seq_len
    _plan(sites, config, n_layers, gi)

    last_ph = [n for n in g.nodes if n.op == "placeholder"][-1]
    new_inputs: list[fx.Node] = []  # state placeholders, in the order the runtime passes them

    def placeholder(name: str) -> fx.Node:
        with g.inserting_after(new_inputs[-1] if new_inputs else last_ph):
            new_inputs.append(g.placeholder(name))
        return new_inputs[-1]

    state_nodes: list[fx.Node] = []
    selections: list[fx.Node] = []
    step = seeded = weight = None
    body = next(n for n in g.nodes if n.op != "placeholder")  # graph-wide nodes go before it
    valid = None
    if gi.valid is not None:
        with g.inserting_before(body):
            valid = _call(g, torch.Tensor.bool, gi.valid, name="pp_valid")
    for site in sites:
        if site.status != "pruned":
            continue
        try:
            lab, kv_whole = _labels(site)
        except Unsupported as e:
            site.status = f"dense: {e}"
            continue
        tag = site.name.replace(".", "_")
        history = None
        if config.policy == "pp":
            if step is None:
                seeded, step = placeholder("pp_seeded"), placeholder("pp_step")
                with g.inserting_before(body):
                    weight = _call(g, ops.ema_weight, step, seeded, config.momentum, name="pp_ema_weight")
            history = placeholder(f"{tag}_history")
            result.history_sites.append(site.name)
        first = min(site.projections, key=_order(g))
        with g.inserting_before(first):
            chan, new_weights, kv_index, comp, kept = _select(g, site, lab, kv_whole, config, static,
                                                              valid, history, gi, tag)
        selections.append(kept)
        result.selected_sites.append(site.name)
        compact(g, site, lab, new_weights, {"h": site.kept, "c": site.kept}, kv_index, tag)
        if comp is not None:
            _add_bias(g, site.final, comp, tag)
        if history is not None:
            x_final = site.final.args[0]
            if value(x_final).dim() == 2:
                with g.inserting_after(x_final):
                    x_final = _call(g, torch.Tensor.view, x_final, gi.batch, gi.seq_len, -1,
                                    name=f"{tag}_final_in")
            with g.inserting_after(site.final):
                upd = _call(g, ops.ema_update_, history, chan, x_final, valid, weight,
                            name=f"{tag}_history_update")
            state_nodes.append(upd)
    if step is not None:
        with g.inserting_before(out_node):
            state_nodes.append(_call(g, ops.advance_, step, seeded, name="pp_advance"))
        result.uses_step = True
    # Extra outputs: the kept indices (for inspection), then the state updates (outputs, so that
    # no pass drops them as dead code). The backend returns only the original outputs.
    if selections or state_nodes:
        outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        out_node.args = (outs + tuple(selections) + tuple(state_nodes),)
    g.lint()
    gm.recompile()
    return result


def _order(g: fx.Graph):
    pos = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: pos[n]


def _labels(site: Site):
    kv_whole = False
    if site.kind == "attention":
        leaked = escapes(site)
        kv_whole = site.kv_heads != site.heads or bool(leaked)  # GQA, or K/V returned as a cache
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
    return lab, kv_whole


def _select(g, site: Site, lab, kv_whole: bool, config: PPConfig, static, valid, history, gi, tag):
    """Emit probe -> score -> select; return kept channels, compact weights, K/V index, bias."""
    w_final = site.final.args[1]
    comp = None
    if config.policy in ("pp", "full-batch"):
        energy = _probe_energy(g, site, lab, config, valid, history, gi, tag)
        if site.kind == "attention":
            scores = _call(g, ops.head_scores, energy, w_final, site.heads, name=f"{tag}_score")
        else:
            scores = _call(g, ops.channel_scores, energy, w_final, name=f"{tag}_score")
        kept = _call(g, ops.top_indices, scores, site.kept, name=f"{tag}_select")
    else:
        choice = static[site.name]
        kept = _const(g, f"{tag}_kept", choice.kept)
        comp = choice.bias
    chan = _call(g, ops.head_channels, kept, site.head_dim, name=f"{tag}_channels") \
        if site.kind == "attention" else kept
    weights = {}
    qkv = site.info.get("qkv", {})
    for p in site.projections:
        if kv_whole and p in (qkv.get("k"), qkv.get("v")):
            continue
        w = _call(g, torch.index_select, p.args[1], 0, chan, name=f"{tag}_gather_{_role(site, p)}_w")
        bias = p.args[2] if len(p.args) > 2 else p.kwargs.get("bias")
        b = _call(g, torch.index_select, bias, 0, chan, name=f"{tag}_gather_{_role(site, p)}_b") \
            if isinstance(bias, fx.Node) else None
        weights[p] = (w, b)
    wf = _call(g, torch.index_select, w_final, 1, chan, name=f"{tag}_gather_final_w")
    weights[site.final] = (wf, None)
    kv_index = None
    if kv_whole:
        k_heads = value(sdpa_qkv(site.sdpa)[1]).shape[1]
        kv_index = kept if k_heads == site.heads else \
            _call(g, torch.floor_divide, kept, site.heads // site.kv_heads, name=f"{tag}_kv_heads")
    return chan, weights, kv_index, comp, kept


def _role(site: Site, p: fx.Node) -> str:
    for r, n in site.info.get("qkv", {}).items():
        if n is p:
            return r
    return p.name


def _probe_energy(g, site: Site, lab, config: PPConfig, valid, history, gi: GraphInputs, tag: str):
    B, L = gi.batch, gi.seq_len
    x, x_res = site.x, site.x_res
    if value(x).dim() == 2:  # (B*L, d) blocks (OPT's MLP): view as (B, L, d)
        x = _call(g, torch.Tensor.view, x, B, L, -1, name=f"{tag}_x")
    if value(x_res).dim() == 2:
        x_res = _call(g, torch.Tensor.view, x_res, B, L, -1, name=f"{tag}_x_res")
    if config.policy == "full-batch":
        k_b, k_t = B, L
        kept_b = _call(g, torch.arange, B, name=f"{tag}_probe_b")
        kept_t = _call(g, torch.arange, L, name=f"{tag}_probe_t")
    else:
        k_b, k_t = config.probe_samples(B), config.probe_positions(L)
        sel = _call(g, ops.select_probe, x_res, valid, k_t, k_b, config.sequence_first, name=f"{tag}_probe_select")
        kept_b = _call(g, _getitem, sel, 0, name=f"{tag}_probe_b")
        kept_t = _call(g, _getitem, sel, 1, name=f"{tag}_probe_t")
    p = _call(g, _gather_probe, x, kept_b, kept_t, name=f"{tag}_probe_x")
    if value(site.x).dim() == 2:
        p = _call(g, torch.Tensor.reshape, p, k_b * k_t, -1, name=f"{tag}_probe_x2d")
    act = probe_activation(g, site, lab, p, kept_b, kept_t, k_b, k_t, tag)
    act = _call(g, torch.Tensor.reshape, act, k_b, k_t, -1, name=f"{tag}_probe_act")
    pvalid = _call(g, _gather_probe, valid, kept_b, kept_t, name=f"{tag}_probe_valid") if valid is not None else None
    energy = _call(g, ops.probe_energy, act, pvalid, name=f"{tag}_probe_energy")
    if history is None:
        return _call(g, torch.sum, energy, 0, name=f"{tag}_energy")
    hist = _call(g, torch.index_select, history, 0, kept_t, name=f"{tag}_history_at_probe")
    return _call(g, ops.fuse_history, energy, hist, name=f"{tag}_fuse")


def _getitem(t, i):
    return t[i]


def _gather_probe(x: torch.Tensor, kept_b: torch.Tensor, kept_t: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, kept_b).index_select(1, kept_t)  # (k_b, k_t, ...)


def _const(g: fx.Graph, name: str, t: torch.Tensor) -> fx.Node:
    gm = g.owning_module
    gm.register_buffer(name, t)
    with g.inserting_before(next(n for n in g.nodes if n.op != "placeholder")):
        return g.get_attr(name)


def _add_bias(g: fx.Graph, final: fx.Node, bias: torch.Tensor, tag: str) -> None:
    b = _const(g, f"{tag}_bias_compensation", bias)
    with g.inserting_after(final):
        added = _call(g, torch.add, final, b, name=f"{tag}_compensated")
    final.replace_all_uses_with(added, delete_user_cb=lambda u: u is not added)

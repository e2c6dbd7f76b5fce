"""The static policies' selection (wanda-sp, FLAP): every site scored once, at compile time, from
the real weights and calibration statistics; the kept units enter as constants, the compact
weights are sliced once (compact.py).

On a rank of a tensor-parallel model the channel metrics of every rank are gathered (one
all-gather, here, at compile time) and every rank makes the one decision for whole blocks, then
keeps its own run of it: what one process with shards=world keeps (FLAP's threshold is global,
so ranks may keep different counts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import baselines
from ..baselines import StaticChoice
from ..policies import StaticPolicy
from .compact import const, unit_cost
from .select import CALIBRATION, SelectContext, Selection, first_projection, register_selector, tag_of
from .sites import Site


@register_selector(StaticPolicy, fixed=True)
def calibrated(ctx: SelectContext, site: Site, history) -> Selection:
    choice = ctx.once("static", lambda: static_choices(ctx))[site.name]
    kept = const(ctx.g, f"{tag_of(site)}_kept", choice.kept)
    return Selection(kept, first_projection(site), kept_now=choice.kept, bias=choice.bias, by=CALIBRATION)


def static_choices(ctx: SelectContext) -> dict[str, StaticChoice]:
    """The static decision for every site of the graph (it sets each site's kept count)."""
    policy, sites, cal = ctx.config.policy, ctx.sites, ctx.calibration
    if cal is None:
        raise ValueError(f"policy '{policy}' is static: it needs calibration statistics; pass "
                         "calibration=<token batches or a saved Calibration> to pp.compile")
    if ctx.real is None:
        raise ValueError(f"policy '{policy}' needs the real weights of the graph to score them")
    weights, cost = {}, {}
    for s in sites:
        w = ctx.real(s.final.args[1])
        if w is None:
            raise ValueError(f"{s.name}: the weight of its final projection is not a real tensor "
                             f"here, so policy '{policy}' cannot score it")
        weights[s.name] = w
        cost[s.name] = unit_cost(s, ctx.labels[s.name][1])
    metrics = {s.name: policy.channel_metric(s, weights[s.name], cal) for s in sites}
    rank, world = 0, 1
    if group := shard_group(sites):
        metrics, rank, world = whole_blocks(metrics, group)
    kept = baselines.choose(policy, sites, metrics, {s.name: s.kept * world for s in sites}, cost,
                            ctx.config.layer_ratio(ctx.n_layers), ctx.config.shards * world)
    choices = {}
    for s in sites:
        mine = kept[s.name][kept[s.name] // s.units == rank] - rank * s.units  # this rank's units
        choices[s.name] = StaticChoice(mine, policy.bias(s, weights[s.name], mine, cal))
        s.kept = len(mine)
    return choices


def shard_group(sites: list[Site]) -> str | None:
    """The process group (by name) whose all-reduce sums the sites' outputs; None: not sharded.
    Sharded and replicated sites together are refused: a static policy's one decision counts a
    sharded block's units once over the ranks, and gathering a replicated one would count it once
    per rank."""
    names = {s.all_reduce for s in sites}
    if None in names and len(names) > 1:
        whole = next(s.name for s in sites if s.all_reduce is None)
        raise ValueError(f"{whole} is replicated (tp.shard: it does not split over the ranks) and other blocks are "
                         "sharded; a static policy (wanda-sp, flap) cannot score both yet: use policy 'pp', or a "
                         "world size that splits every block")
    names -= {None}
    if len(names) > 1:
        raise ValueError(f"the blocks of this graph are summed over different process groups {sorted(names)}; "
                         "a static policy scores over one")
    return next(iter(names), None)


def whole_blocks(metrics: dict[str, torch.Tensor], group_name: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Each site's per-channel statistic on this rank (its run of the block's channels) -> the
    whole block's, every rank's run in rank order; and (rank, world). One all-gather; every rank
    of the group calls it on the same sites (they compile the same graph)."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = torch.cat(list(metrics.values()))  # (sum of C_local,)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    sizes = [len(m) for m in metrics.values()]
    per_rank = [p.split(sizes) for p in parts]
    return {name: torch.cat([p[i] for p in per_rank]) for i, name in enumerate(metrics)}, rank, world

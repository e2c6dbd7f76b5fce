"""The math of the static baselines (see policies.py): FLAP's standardized scores, its global
allocation and bias compensation, and the static decision for every site.

  flap  one global threshold over all blocks sets how many units each keeps, so that the pruned
        FLOPs reach the layer ratio r_l of the pruned layers' prunable FLOPs (FLAP's own
        allocation, no rounding to multiples); the pruned channels' mean contribution
        W[:, pruned] @ mu[pruned] is added back as a bias
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import top_indices


@dataclass
class StaticChoice:
    """A static policy's decision for one site, made once from calibration statistics."""
    kept: torch.Tensor  # kept heads (attention) or channels (MLP), ascending
    bias: torch.Tensor | None = None  # added to the final projection's output (FLAP's compensation)


def standardized(s: torch.Tensor) -> torch.Tensor:
    std = s.std(unbiased=False)
    return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)


def flap_allocation(scores: dict, cost: dict, target: float) -> dict:
    """Units kept per run of scores (a block, or a shard's run of one): prune the globally
    lowest-scoring units until their summed cost reaches `target`; every run keeps at least one."""
    owner, unit_cost = [], []
    for name, s in scores.items():
        owner += [name] * len(s)
        unit_cost += [cost[name]] * len(s)
    kept = {name: len(s) for name, s in scores.items()}
    pruned = 0.0
    for i in torch.cat(list(scores.values())).argsort().tolist():
        if pruned >= target:
            break
        if kept[owner[i]] > 1:
            kept[owner[i]] -= 1
            pruned += unit_cost[i]
    return kept


def choose(policy, sites: list, metrics: dict[str, torch.Tensor], uniform: dict[str, int],
           cost: dict[str, float], layer_ratio: float, groups: int = 1) -> dict[str, torch.Tensor]:
    """The kept units (ascending) of every whole block under `policy` (a StaticPolicy). `metrics`:
    each block's channel metric (policy.channel_metric, over all its channels); `uniform`: each
    block's kept count at the ratio; `cost`: the FLOPs per token of one unit of each block;
    `layer_ratio`: r_l, the fraction FLAP prunes of the blocks' prunable FLOPs. `groups`: every
    block is that many runs of consecutive units (the shards of tensor parallelism), each counted
    on its own: an even split of the uniform count, or for FLAP at least one unit per run."""
    scores = {s.name: policy.unit_scores(s, metrics[s.name]) for s in sites}
    target = layer_ratio * sum(len(v) * cost[name] for name, v in scores.items())
    runs = {(name, g): run for name, v in scores.items() for g, run in enumerate(v.view(groups, -1))}
    counts = policy.counts(runs, {key: uniform[key[0]] // groups for key in runs},
                           {key: cost[key[0]] for key in runs}, target)
    kept = {}
    for name, v in scores.items():
        per = len(v) // groups
        kept[name] = torch.cat([top_indices(runs[name, g], counts[name, g]) + g * per for g in range(groups)])
    return kept


def compensation(site, weight: torch.Tensor, kept: torch.Tensor, cal) -> torch.Tensor:
    """W[:, pruned] @ mu[pruned]: the pruned channels' mean contribution to the output, (d_out,)."""
    unit = site.head_dim if site.kind == "attention" else 1
    pruned = torch.ones(weight.shape[1] // unit, dtype=torch.bool, device=weight.device)
    pruned[kept] = False
    pruned = pruned.repeat_interleave(unit)  # (C,)
    mu = cal.mean(site.name).to(weight.device)
    return (weight.detach().double()[:, pruned] @ mu[pruned]).to(weight.dtype)

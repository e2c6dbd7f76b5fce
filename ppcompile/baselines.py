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


def flap_allocation(scores: dict[str, torch.Tensor], cost: dict[str, float], target: float) -> dict[str, int]:
    """Units kept per site: prune the globally lowest-scoring units until their summed cost reaches
    `target`; every site keeps at least one unit."""
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


def choose(policy, sites: list, weights: dict[str, torch.Tensor], cost: dict[str, float],
           cal, layer_ratio: float, groups: int = 1) -> dict[str, StaticChoice]:
    """The static decision of `policy` (a StaticPolicy) for every site. `sites` carry the uniform
    kept counts (`site.kept`), `weights` the final projections' weights, `cost` the FLOPs per token
    of one unit of each site; `layer_ratio` is r_l, the fraction FLAP prunes of the sites'
    prunable FLOPs; `groups`: the kept units split evenly over that many runs (ops.top_indices)."""
    scores = {s.name: policy.unit_scores(s, weights[s.name], cal) for s in sites}
    target = layer_ratio * sum(len(scores[s.name]) * cost[s.name] for s in sites)
    counts = policy.counts(scores, {s.name: s.kept for s in sites}, cost, target)
    choices = {}
    for s in sites:
        kept = top_indices(scores[s.name], counts[s.name], groups)
        choices[s.name] = StaticChoice(kept, policy.bias(s, weights[s.name], kept, cal))
    return choices


def compensation(site, weight: torch.Tensor, kept: torch.Tensor, cal) -> torch.Tensor:
    """W[:, pruned] @ mu[pruned]: the pruned channels' mean contribution to the output, (d_out,)."""
    unit = site.head_dim if site.kind == "attention" else 1
    pruned = torch.ones(weight.shape[1] // unit, dtype=torch.bool, device=weight.device)
    pruned[kept] = False
    pruned = pruned.repeat_interleave(unit)  # (C,)
    mu = cal.mean(site.name).to(weight.device)
    return (weight.detach().double()[:, pruned] @ mu[pruned]).to(weight.dtype)

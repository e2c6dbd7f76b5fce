"""The static baselines: which heads and channels Wanda-sp and FLAP keep, from calibration.

Both score the units (heads, MLP channels) of each site once, from the final projection's weight W
(d_out, C) and the calibration statistics of its input, and keep the best ones for good:
  wanda-sp  channel score sum_i |W_ij| * sqrt(S_j); the same kept count as the uniform rules
  flap      channel score V_j * sum_i W_ij^2, standardized over the channels of each block of
            each layer; a head scores the mean of its channels' standardized scores; one global
            threshold over all blocks sets how many units each keeps, so that the pruned FLOPs
            reach the layer ratio r_l of the pruned layers' prunable FLOPs (FLAP's own allocation,
            no rounding to multiples); the pruned channels' mean contribution
            W[:, pruned] @ mu[pruned] is added back as a bias
A Wanda-sp head scores the sum of its channels' scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import Calibration
from .passes.sites import Site


@dataclass
class StaticChoice:
    """A static policy's decision for one site, made once from calibration statistics."""
    kept: torch.Tensor  # kept heads (attention) or channels (MLP), ascending
    bias: torch.Tensor | None = None  # FLAP's bias compensation, added to the final projection's output


def unit_scores(policy: str, site: Site, weight: torch.Tensor, cal: Calibration) -> torch.Tensor:
    """Per head (attention) or channel (MLP) of `site`, float64."""
    w = weight.detach().double()  # (d_out, C)
    if policy == "wanda-sp":
        per_channel = w.abs().sum(0) * cal.energy(site.name).sqrt().to(w.device)
        return per_channel.view(site.heads, -1).sum(-1) if site.kind == "attention" else per_channel
    if policy == "flap":
        per_channel = _standardized(cal.variance(site.name).to(w.device) * w.pow(2).sum(0))
        return per_channel.view(site.heads, -1).mean(-1) if site.kind == "attention" else per_channel
    raise ValueError(f"{policy!r} is not a static policy")


def _standardized(s: torch.Tensor) -> torch.Tensor:
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


def choose(policy: str, sites: list[Site], weights: dict[str, torch.Tensor], cost: dict[str, float],
           cal: Calibration, layer_ratio: float) -> dict[str, StaticChoice]:
    """The static decision for every site. `sites` carry the uniform kept counts (`site.kept`),
    `weights` the final projections' weights, `cost` the FLOPs per token of one unit of each site;
    `layer_ratio` is r_l, the fraction FLAP prunes of the sites' prunable FLOPs."""
    scores = {s.name: unit_scores(policy, s, weights[s.name], cal) for s in sites}
    counts = {s.name: s.kept for s in sites}
    if policy == "flap":
        target = layer_ratio * sum(len(scores[s.name]) * cost[s.name] for s in sites)
        counts = flap_allocation(scores, cost, target)
    choices = {}
    for s in sites:
        kept = scores[s.name].topk(counts[s.name]).indices.sort().values
        choices[s.name] = StaticChoice(kept, _compensation(s, weights[s.name], kept, cal) if policy == "flap" else None)
    return choices


def _compensation(site: Site, weight: torch.Tensor, kept: torch.Tensor, cal: Calibration) -> torch.Tensor:
    """W[:, pruned] @ mu[pruned]: the pruned channels' mean contribution to the output, (d_out,)."""
    unit = site.head_dim if site.kind == "attention" else 1
    pruned = torch.ones(weight.shape[1] // unit, dtype=torch.bool, device=weight.device)
    pruned[kept] = False
    pruned = pruned.repeat_interleave(unit)  # (C,)
    mu = cal.mean(site.name).to(weight.device)
    return (weight.detach().double()[:, pruned] @ mu[pruned]).to(weight.dtype)

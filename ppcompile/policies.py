"""Policies: where a pruned site's kept heads and channels come from. Every policy runs through the
same pass; the pass asks the policy object what it needs (a probe, a history, calibration) instead
of comparing names. A new policy is a subclass registered in POLICIES.

  pp          per batch: a probe of top positions and samples, fused with the history (the method)
  full-batch  per batch: the whole batch is the probe, no history (the oracle)
  wanda-sp    once, from calibration: sum_i |W_ij| * sqrt(S_j), uniform kept counts
  flap        once, from calibration: standardized V_j * sum_i W_ij^2, one global threshold, bias
              compensation
  griffin     per prompt, for generation (GRIFFIN, Dong et al. 2024): the prompt runs dense, its MLP
              activations (normalized per token) pick the channels every decode step then uses
  dense       no rewrite
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import baselines
from .registry import Named, lookup

if TYPE_CHECKING:
    from .calibration import Calibration


class Policy(Named):
    kind = "policy"
    prunes = True  # False: the pass rewrites nothing (ratio 0 of every other policy equals it)
    static = False  # kept indices chosen once from calibration statistics; weights pre-sliced
    history = False  # fuses the probe with a per-position history carried between calls
    probe: str | None = "sampled"  # "sampled": top positions, then top samples; "all": the whole batch
    kinds: tuple[str, ...] = ("attention", "mlp")  # the blocks it prunes
    dense_prefill = False  # the selecting call runs its blocks dense and selects from their activations
    uniform_counts = True  # every block of a kind keeps the same count (False: allocated across blocks)

    @property
    def needs_calibration(self) -> bool:
        return self.static


class ProbePruning(Policy):
    name = "pp"
    history = True


class FullBatch(Policy):
    name = "full-batch"
    probe = "all"


class Griffin(Policy):
    name = "griffin"
    probe = None
    kinds = ("mlp",)
    dense_prefill = True


class Dense(Policy):
    name = "dense"
    prunes = False
    probe = None


class StaticPolicy(Policy):
    """Scores every unit once from the final projection's weight and calibration statistics."""
    static = True
    probe = None

    def unit_scores(self, site, weight: torch.Tensor, cal: "Calibration") -> torch.Tensor:
        """Per head (attention) or channel (MLP) of `site`, float64."""
        raise NotImplementedError

    def counts(self, scores: dict[str, torch.Tensor], uniform: dict[str, int], cost: dict[str, float],
               target: float) -> dict[str, int]:
        """Units kept per site; by default the uniform counts of the ratio."""
        return uniform

    def bias(self, site, weight: torch.Tensor, kept: torch.Tensor, cal: "Calibration") -> torch.Tensor | None:
        """What to add to the final projection's output for the pruned units; None: nothing."""
        return None


class WandaSP(StaticPolicy):
    name = "wanda-sp"

    def unit_scores(self, site, weight, cal):
        per_channel = weight.detach().double().abs().sum(0) * cal.energy(site.name).sqrt().to(weight.device)
        return per_channel.view(site.heads, -1).sum(-1) if site.kind == "attention" else per_channel


class FLAP(StaticPolicy):
    name = "flap"
    uniform_counts = False

    def unit_scores(self, site, weight, cal):
        w = weight.detach().double()
        per_channel = baselines.standardized(cal.variance(site.name).to(w.device) * w.pow(2).sum(0))
        return per_channel.view(site.heads, -1).mean(-1) if site.kind == "attention" else per_channel

    def counts(self, scores, uniform, cost, target):
        return baselines.flap_allocation(scores, cost, target)

    def bias(self, site, weight, kept, cal):
        return baselines.compensation(site, weight, kept, cal)


POLICIES: dict[str, Policy] = {p.name: p for p in (ProbePruning(), FullBatch(), Griffin(), WandaSP(), FLAP(), Dense())}


def get_policy(policy: "str | Policy") -> Policy:
    """The registered policy of that name (or the policy object itself)."""
    return lookup(POLICIES, policy, Policy, "policy", "policies")

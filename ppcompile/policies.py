"""Policies: where a pruned site's kept heads and channels come from. Every policy runs through the
same pass, which builds its selection with the builder registered for the policy's class
(passes/select.py, @register_selector), never by comparing names. A new policy is a subclass and
one registered builder; registered in POLICIES, it is known by name.

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
from .probes import ProbeDesign, WholeBatch
from .registry import Named, lookup

if TYPE_CHECKING:
    from .calibration import Calibration


class Policy(Named):
    kind = "policy"
    prunes = True  # False: the pass rewrites nothing (ratio 0 of every other policy equals it)
    history = False  # fuses the probe with a per-position history carried between calls
    needs_calibration = False  # scores from calibration statistics, which pp.compile must be given
    kinds: tuple[str, ...] = ("attention", "mlp")  # the blocks it prunes
    measured_in = "forward"  # where its pruning shows: "generation" when its selecting call runs dense

    def design(self, configured: ProbeDesign) -> ProbeDesign | None:
        """The probe design its selection runs, given the configured one; None: it runs no probe."""
        return None


class ProbePruning(Policy):
    name = "pp"
    history = True

    def design(self, configured):
        return configured


class FullBatch(Policy):
    name = "full-batch"

    def design(self, configured):
        return WholeBatch()


class Griffin(Policy):
    name = "griffin"
    kinds = ("mlp",)
    measured_in = "generation"  # the prompt runs dense; the decode steps after it are pruned


class Dense(Policy):
    name = "dense"
    prunes = False


class StaticPolicy(Policy):
    """Scores every unit once from the final projection's weight and calibration statistics: a
    statistic per channel (what a rank of a tensor-parallel model can compute on its shard), then
    scores per unit over the whole block (its channels gathered from every rank)."""
    needs_calibration = True

    def channel_metric(self, site, weight: torch.Tensor, cal: "Calibration") -> torch.Tensor:
        """Per input channel of the final projection `weight` (d_out, C), float64 (C,)."""
        raise NotImplementedError

    def unit_scores(self, site, metric: torch.Tensor) -> torch.Tensor:
        """The whole block's channel metric (C,) -> per head (attention) or channel (MLP)."""
        raise NotImplementedError

    def counts(self, scores: dict, uniform: dict, cost: dict, target: float) -> dict:
        """Units kept per run of scores (a block, or one shard's run of it); by default uniform."""
        return uniform

    def bias(self, site, weight: torch.Tensor, kept: torch.Tensor, cal: "Calibration") -> torch.Tensor | None:
        """What to add to the final projection's output for the pruned units; None: nothing."""
        return None


class WandaSP(StaticPolicy):
    name = "wanda-sp"

    def channel_metric(self, site, weight, cal):
        return weight.detach().double().abs().sum(0) * cal.energy(site.name).sqrt().to(weight.device)

    def unit_scores(self, site, metric):
        return metric.view(-1, site.head_dim).sum(-1) if site.kind == "attention" else metric


class FLAP(StaticPolicy):
    name = "flap"

    def channel_metric(self, site, weight, cal):
        w = weight.detach().double()
        return cal.variance(site.name).to(w.device) * w.pow(2).sum(0)

    def unit_scores(self, site, metric):
        z = baselines.standardized(metric)  # over the whole block's channels
        return z.view(-1, site.head_dim).mean(-1) if site.kind == "attention" else z

    def counts(self, scores, uniform, cost, target):
        return baselines.flap_allocation(scores, cost, target)

    def bias(self, site, weight, kept, cal):
        return baselines.compensation(site, weight, kept, cal)


POLICIES: dict[str, Policy] = {p.name: p for p in (ProbePruning(), FullBatch(), Griffin(), WandaSP(), FLAP(), Dense())}


def get_policy(policy: "str | Policy") -> Policy:
    """The registered policy of that name (or the policy object itself)."""
    return lookup(POLICIES, policy, Policy, "policy", "policies")

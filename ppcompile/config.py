"""PPConfig: every knob of the method, with the paper's defaults, validated once."""
from __future__ import annotations

import math
from fractions import Fraction
import numbers
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from .policies import Policy, get_policy
from .probes import ProbeDesign, get_probe

if TYPE_CHECKING:
    import torch

BLOCKS = ("both", "attention", "mlp")
FINAL_LAYOUTS = ("auto", "copy", "gather")


@dataclass(frozen=True)
class PPConfig:
    ratio: float = 0.4  # fraction of the model pruned (skipped layers count as 0%)
    policy: Policy | str = "pp"  # a name or a Policy (policies.py); stored as the registered object
    position_ratio: float = 0.5  # probe: fraction of sequence positions kept
    sample_ratio: float = 0.05  # probe: fraction of batch samples kept
    sequence_first: bool = True  # select positions before samples (the paper's order)
    # which tokens the probe runs (probes.py; stored as the registered object). "spread", not the
    # paper's rule: at the paper's cost it is closer to the full-batch oracle on both texts of the
    # probe study (README, "The probe at a FLOPs budget"); "paper" reproduces the paper's choice.
    probe: ProbeDesign | str = "spread"
    history: bool = True  # fuse the probe with the per-position history (policies that keep one; False: the probe alone)
    # The probe's multiply-adds as a fraction of each pruned block's dense ones: the positions
    # per probed sample follow from B and L (at least two). None: position_ratio, the paper's rule.
    probe_budget: float | None = None
    # Where the probe would run so much of the batch (batch 1: half the sequence) that it and the
    # compact first projections cost more than the dense ones, the block's own activations select
    # and only its final projection is compact (passes/select.py). False: always the probe, as the paper.
    whole_batch_when_cheaper: bool = True
    # A forward graph leaves a site dense where its compact weights cannot pay at the call's size:
    # the multiply-adds they save against what selecting and gathering them costs, one gathered
    # weight element counted as this many multiply-adds (passes/cost.py). "auto": the device's and
    # dtype's default (CPU: 96 in float32, 256 in bf16/fp16); 0: prune at every size.
    gather_cost: int | str = "auto"
    skip_layers: tuple[int, ...] = (0, 1, 2)  # decoder layers left dense
    blocks: str = "both"  # which blocks are pruned: both | attention | mlp
    mlp_multiple: int = 64  # kept MLP channels rounded up to a multiple of this
    momentum: float = 0.99  # EMA momentum of the history
    strict: bool = False  # an unmatched block is an error instead of a warning
    telemetry: bool = False  # record per call and site what was kept (runtime.stats())
    # Batch and sequence dims, as torch.compile's `dynamic`: None (automatic) compiles a phase's first
    # shape static (it keeps serving it) and one graph for every other shape; True:
    # one graph for every shape from the first call (a server's mixed shapes pay one compile);
    # False: one static graph per shape. Static graphs compile 2-3x faster (docs/results.md).
    dynamic: bool | None = None
    cache_bucket: int = 128  # generate(): the static KV cache's length, rounded up to a multiple of this
    # How a dynamic policy reads the kept columns of an MLP's final projection on every call:
    # "gather" them from the model's weight (no memory added), or gather rows of a transposed
    # "copy" made once (one more copy of that weight per pruned MLP; on CPU, where a column
    # gather runs scalar, about 7x faster to gather). "auto": copy on CPU, gather elsewhere.
    final_layout: str = "auto"
    # Kept units split evenly over this many groups of consecutive heads/channels, top-k inside
    # each: what each rank of a tensor-parallel model does on its own shard (tp.py), run in one
    # process to measure what sharding costs. 1: one top-k over the whole block. FLAP keeps its
    # one global threshold, with at least one unit in every group (counts may differ).
    shards: int = 1

    def __post_init__(self) -> None:
        # types first: "0.4" < 1.0 is a TypeError deep in a comparison, and True passes as 1
        for name, interval in (("ratio", "[0, 1)"), ("position_ratio", "(0, 1]"), ("sample_ratio", "(0, 1]"),
                               ("momentum", "[0, 1)")):
            object.__setattr__(self, name, _number(name, getattr(self, name), interval))
        object.__setattr__(self, "skip_layers", _layer_indices(self.skip_layers))
        if self.probe_budget is not None:
            budget = _number("probe_budget", self.probe_budget, "(0, 1) or None")
            if not 0.0 < budget < 1.0:
                raise ValueError(f"probe_budget must be a number in (0, 1) or None, got {budget}: the probe's share "
                                 "of a block's multiply-adds, e.g. 0.015; None keeps the paper's position_ratio")
            object.__setattr__(self, "probe_budget", budget)
        for name, example in (("mlp_multiple", 64), ("cache_bucket", 128), ("shards", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int >= 1, got {_shown(v)}: e.g. {name}={example}")
            if v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v}")
            object.__setattr__(self, name, int(v))
        for name in ("sequence_first", "history", "whole_batch_when_cheaper", "strict", "telemetry"):  # "False" as a string would read as True
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {_shown(getattr(self, name))}: pass a bool")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic must be None, True or False, got {_shown(self.dynamic)}: None compiles the "
                            "first shape static and goes dynamic on another; True: dynamic from the first call")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio}: it is the fraction "
                             "pruned (0.4 prunes 40%, 0 nothing)")
        object.__setattr__(self, "policy", get_policy(self.policy))
        object.__setattr__(self, "probe", get_probe(self.probe))
        if self.gather_cost != "auto":
            if isinstance(self.gather_cost, bool) or not isinstance(self.gather_cost, numbers.Integral) \
                    or self.gather_cost < 0:
                raise ValueError(f"gather_cost must be 'auto' or an int >= 0, got {_shown(self.gather_cost)}: "
                                 "the multiply-adds one gathered weight element costs (0: prune at every size)")
            object.__setattr__(self, "gather_cost", int(self.gather_cost))
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {self.blocks!r}")
        if self.final_layout not in FINAL_LAYOUTS:
            raise ValueError(f"final_layout must be one of {', '.join(FINAL_LAYOUTS)}, got {self.final_layout!r}")
        for name in ("position_ratio", "sample_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a number in (0, 1], got {value}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {self.momentum}")

    def check_layers(self, n_layers: int, *, named: bool = True) -> None:
        """Refuse skip_layers that do not fit a model of `n_layers` decoder layers: an index it does
        not have (a typo, or a config written for a deeper model), or skipping every layer while
        asking for a ratio > 0 (nothing would be pruned, silently)."""
        missing = [i for i in self.skip_layers if i >= n_layers]
        if missing and named:  # named: the user chose skip_layers (the default fits deep models)
            have = f" (0..{n_layers - 1})" if n_layers > 0 else ""
            raise ValueError(f"skip_layers names layer(s) {missing} but the model has {n_layers} decoder "
                             f"layers{have}: drop them from skip_layers")
        if n_layers > 0 and self._pruned_layers(n_layers) == 0 and self.ratio > 0 and self.policy.prunes:
            raise ValueError(f"skip_layers skips all {n_layers} layers, so nothing would be pruned at ratio "
                             f"{self.ratio}: skip fewer layers or use ratio 0")

    @classmethod
    def from_options(cls, options: dict | None) -> "PPConfig":
        """Build from torch.compile's `options` dict; an unknown key is an error, not ignored."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown ppcompile option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**options)

    def as_dict(self) -> dict:
        """Plain values (the policy by name), for keys, reports and JSON."""
        return {**asdict(self), "policy": self.policy.name, "probe": self.probe.name}

    @property
    def uses_history(self) -> bool:
        """The policy carries a history between calls and the probe is fused with it."""
        return self.policy.history and self.history

    def copies_final(self, device: torch.device) -> bool:
        """Whether a dynamic policy gathers an MLP's final projection from a transposed copy."""
        return self.final_layout == "copy" or (self.final_layout == "auto" and device.type == "cpu")

    # ---- kept counts: Python ints, so every shape in the rewritten graph is static ----
    def layer_ratio(self, n_layers: int) -> float:
        """The ratio of each pruned layer: skipped layers count as 0%, so the rest prune more
        (at most all of it: see `unreachable`)."""
        return min(self._scaled_ratio(n_layers), 1.0)

    def unreachable(self, n_layers: int) -> str | None:
        """Why `ratio` cannot be reached on `n_layers` layers, or None when it can."""
        scaled = self._scaled_ratio(n_layers)
        if scaled <= 1.0:
            return None
        n_pruned = self._pruned_layers(n_layers)
        return (f"ratio {self.ratio} cannot be reached with {n_pruned} of {n_layers} layers pruned: each would "
                f"prune {scaled:.0%}; they keep one head and {self.mlp_multiple} MLP channels instead, so the "
                "model prunes less than asked (lower the ratio or skip fewer layers)")

    def _pruned_layers(self, n_layers: int) -> int:
        return n_layers - len([i for i in self.skip_layers if i < n_layers])

    def _scaled_ratio(self, n_layers: int) -> float:
        n_pruned = self._pruned_layers(n_layers)
        if n_pruned <= 0 or self.ratio == 0:
            return 0.0
        return round(self.ratio * n_layers / n_pruned, 2)

    def kept_heads(self, n_heads: int, n_layers: int) -> int:
        """Heads pruned: floor(r_l * H); at least one head is kept."""
        return max(1, n_heads - math.floor(self.layer_ratio(n_layers) * n_heads))

    def kept_channels(self, n_channels: int, n_layers: int) -> int:
        """Channels pruned: floor(r_l * C); the kept count is rounded up to the multiple (>= 1)."""
        kept = max(1, n_channels - math.floor(self.layer_ratio(n_layers) * n_channels))
        return min(n_channels, math.ceil(kept / self.mlp_multiple) * self.mlp_multiple)

    def kept_units(self, kind: str, units: int, n_layers: int) -> int:
        """Kept heads (attention) or channels (MLP) of a block of `units`: with shards, each of
        the `shards` groups keeps what a block of units / shards would (what its rank keeps)."""
        rule = self.kept_heads if kind == "attention" else self.kept_channels
        return self.shards * rule(units // self.shards, n_layers)

    # ---- probe sizes: exact rational arithmetic, the same for an int and a dynamic size ----
    def probe_rule(self, what: str) -> tuple[int, int, int]:
        """(num, den, floor): the probe keeps min(n, max(ceil(n * num / den), floor)) of n
        positions ("position", at least two) or samples ("sample", at least one)."""
        ratio, floor = (self.position_ratio, 2) if what == "position" else (self.sample_ratio, 1)
        return *_fraction(ratio), floor

    def budget_fraction(self) -> tuple[int, int]:
        """probe_budget as an exact fraction (num, den)."""
        return _fraction(self.probe_budget)

    def probe_positions(self, seq_len: int) -> int:
        from .ops import probe_count
        return probe_count(seq_len, *self.probe_rule("position"))

    def probe_samples(self, batch: int) -> int:
        from .ops import probe_count
        return probe_count(batch, *self.probe_rule("sample"))


def _fraction(x: float) -> tuple[int, int]:
    """The fraction a decimal spells (0.05 -> (1, 20)), for exact integer arithmetic on sizes."""
    frac = Fraction(str(x)).limit_denominator(10**6)
    return frac.numerator, frac.denominator


def _shown(value) -> str:
    """A value and its type, as error messages show what they got: '0.4' (str)."""
    return f"{value!r} ({type(value).__name__})"


def _number(name: str, value, interval: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}, got {_shown(value)}: pass a float, "
                        f"e.g. {name}={_as_float(value) or 0.5}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number in {interval}, got nan")
    return float(value)


def _as_float(value) -> float | None:
    """The number a string such as '0.4' spells (for the hint), or None."""
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _layer_indices(skip_layers) -> tuple[int, ...]:
    """skip_layers as sorted unique ints; a string, a bare int or a float index is an error."""
    example = "e.g. skip_layers=(0, 1, 2), or () to prune every layer"
    if isinstance(skip_layers, (str, bytes)) or not isinstance(skip_layers, Iterable):
        raise TypeError(f"skip_layers must be an iterable of layer indices (ints), got {_shown(skip_layers)}: "
                        f"{example}")
    indices = []
    for i in skip_layers:
        try:  # operator.index: ints, numpy ints and integer 0-d tensors, never floats
            if isinstance(i, bool):
                raise TypeError
            indices.append(operator.index(i))
        except TypeError:
            raise TypeError(f"skip_layers must hold layer indices (ints), got {_shown(i)} in it: {example}") from None
    negative = [i for i in indices if i < 0]
    if negative:
        raise ValueError(f"skip_layers must hold layer indices >= 0, got {negative}: count layers from 0 (the first)")
    return tuple(sorted(set(indices)))

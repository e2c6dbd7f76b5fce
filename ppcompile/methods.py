"""The methods `ppcompile eval` can compare, by name, and how a method is named everywhere.

A method turns (model, ratio, calibration) into a logits function. Every registered policy
(ppcompile.policies.POLICIES) is a method, unless a forward pass, which is what eval measures,
would not run it pruned (`measured_by_forward`): griffin selects from a prompt for generation and
runs its blocks dense in a plain forward, so eval refuses it (REFUSED) and names where it is
measured.

A method's label (`label`, read back by `parse_label`) is POLICY[@RATIO][ FIELD=VALUE ...]: "pp",
"pp@0.4", "pp probe=paper", "pp@0.2 shards=3", "pp backend=eager"; the fields are pp.compile
options (PPConfig fields, backend), each written as `ppcompile eval --pp FIELD=VALUE` reads it.
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from .calibration import Calibration
from .policies import POLICIES, Policy, get_policy
from .evaluate import LogitsFn, model_logits_fn

MethodBuilder = Callable[..., LogitsFn]  # (model, ratio, calibration, backend, **PPConfig fields) -> logits


def _dense(model: torch.nn.Module, ratio: float, calibration: Calibration | None, backend: str,
           **options) -> LogitsFn:
    """The model unpruned, run the way the pruned methods run: compiled by the same route with
    Inductor (policy "dense": the graph unchanged), or as it is with backend "eager"."""
    if backend == "eager":
        return model_logits_fn(model)
    from .api import compile as pp_compile
    return model_logits_fn(pp_compile(model, 0.0, policy="dense"))


def _policy(policy: str) -> MethodBuilder:
    def build(model: torch.nn.Module, ratio: float, calibration: Calibration | None, backend: str,
              **options) -> LogitsFn:
        from .api import compile as pp_compile  # late: the CLI starts faster without torch.compile
        rule = get_policy(policy)
        if not ((rule.history and options.get("history", True)) or rule.needs_calibration):
            calibration = None  # e.g. the oracle: no history and no use for one
        elif rule.needs_calibration and calibration is None:
            raise ValueError(f"method {policy!r} needs calibration text: add --calibration SOURCE")
        options.setdefault("gather_cost", 0)  # quality measures the method at every size: no cost rule
        return model_logits_fn(pp_compile(model, ratio, policy=policy, calibration=calibration, backend=backend,
                                          **options))

    return build


def measured_by_forward(policy: Policy) -> bool:
    """Whether a plain forward pass (what eval's perplexity, KL and top-1 measure) runs the policy
    as it prunes: not griffin, whose selecting call (the prompt) runs dense for the decode steps
    after it (Policy.measured_in). Dense itself is measured (the reference)."""
    return policy.measured_in == "forward"


def _refusal(policy: Policy) -> str:
    return (f"method {policy.name!r} selects its channels from a prompt for generation: in a forward pass, "
            f"which is what eval measures, its blocks run dense (its perplexity would be dense's); measure it "
            f"in generation: `ppcompile generate --policy {policy.name}`, or `python bench/generate.py` "
            f"(--quality: continuation perplexity and greedy agreement)")


# dense first (the reference), then every other registered policy that a forward runs pruned, in
# the registry's order. pp without calibration starts with an empty history that fills from the
# evaluated batches.
METHODS: dict[str, MethodBuilder] = {
    **{name: _dense for name, p in POLICIES.items() if not p.prunes},
    **{name: _policy(name) for name, p in POLICIES.items() if p.prunes and measured_by_forward(p)}}
REFUSED: dict[str, str] = {name: _refusal(p) for name, p in POLICIES.items() if not measured_by_forward(p)}
RATIO_FREE = {name for name, p in POLICIES.items() if not p.prunes}  # methods whose result does not depend on the ratio


def parse_methods(spec: str) -> list[str]:
    """'dense,pp' -> ['dense', 'pp']; an unknown name is an error listing the known ones, a refused
    one (griffin) an error saying where it is measured."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    refused = [m for m in names if m in REFUSED]
    if refused:
        raise ValueError("; ".join(REFUSED[m] for m in refused))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; known methods: {', '.join(METHODS)}")
    return names


def build_method(name: str, model: torch.nn.Module, ratio: float, calibration: Calibration | None = None,
                 backend: str = "inductor", **options) -> LogitsFn:
    """`options`: PPConfig fields for the pruned methods (probe, probe_budget, ...); dense takes none."""
    if name not in METHODS:
        parse_methods(name)  # raises: refused, or unknown
    if name in RATIO_FREE and options:
        raise ValueError(f"method {name!r} takes no options, got {sorted(options)}")
    return METHODS[name](model, ratio, calibration, backend, **options)


# ---- labels: how a method is named in rows, tables and messages ----
def parse_option(text: str) -> tuple[str, object]:
    """'probe_budget=0.015' -> ('probe_budget', 0.015): a field and its value, as JSON when it
    parses, else a string ('probe=every'). ValueError without FIELD=VALUE; the field itself is
    checked by PPConfig."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise ValueError(f"expected FIELD=VALUE, e.g. probe_budget=0.015, got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def _written(value) -> str:
    """A field's value as parse_option reads it back: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def label(policy: str, ratio: float | None = None, **options) -> str:
    """A method's name: POLICY[@RATIO][ FIELD=VALUE ...]. The ratio is left out when None (the row
    gives it apart) and for a ratio-free method (dense); `options` are pp.compile options, in the
    order given. label("pp", 0.4) == "pp@0.4"; label("pp", probe="paper") == "pp probe=paper"."""
    name = policy if ratio is None or policy in RATIO_FREE else f"{policy}@{ratio:g}"
    return " ".join([name, *(f"{field}={_written(value)}" for field, value in options.items())])


def parse_label(text: str, ratio: float | None = None) -> tuple[str, float | None, dict]:
    """(policy, ratio, options) of a label made by `label`. The ratio: 0.0 for a ratio-free
    method, the label's own where it has one ("pp@0"), else `ratio`."""
    head, *fields = text.split() or [""]
    policy, at, own = head.partition("@")
    if not policy or (at and not own):
        raise ValueError(f"a method label is POLICY[@RATIO][ FIELD=VALUE ...], e.g. pp@0.4, got {text!r}")
    if policy in RATIO_FREE:
        ratio = 0.0
    elif at:
        ratio = float(own)
    return policy, ratio, dict(parse_option(f) for f in fields)

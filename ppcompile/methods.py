"""The methods `ppcompile eval` can compare, by name.

A method turns (model, ratio, calibration) into a logits function. New methods register here.
"""
from __future__ import annotations

from typing import Callable

import torch

from .calibration import Calibration
from .policies import get_policy
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
        if not ((rule.history and options.get("history", True)) or rule.static):
            calibration = None  # e.g. the oracle: no history and no use for one
        elif rule.needs_calibration and calibration is None:
            raise ValueError(f"method {policy!r} needs calibration text: add --calibration SOURCE")
        return model_logits_fn(pp_compile(model, ratio, policy=policy, calibration=calibration, backend=backend,
                                          **options))

    return build


# pp without calibration starts with an empty history that fills from the evaluated batches.
METHODS: dict[str, MethodBuilder] = {
    "dense": _dense, "pp": _policy("pp"), "full-batch": _policy("full-batch"),
    "wanda-sp": _policy("wanda-sp"), "flap": _policy("flap"),
}
RATIO_FREE = {"dense"}  # methods whose result does not depend on the ratio


def parse_methods(spec: str) -> list[str]:
    """'dense,pp' -> ['dense', 'pp']; an unknown name is an error listing the known ones."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; known methods: {', '.join(METHODS)}")
    return names


def build_method(name: str, model: torch.nn.Module, ratio: float, calibration: Calibration | None = None,
                 backend: str = "inductor", **options) -> LogitsFn:
    """`options`: PPConfig fields for the pruned methods (probe, probe_budget, ...); dense takes none."""
    if name in RATIO_FREE and options:
        raise ValueError(f"method {name!r} takes no options, got {sorted(options)}")
    return METHODS[name](model, ratio, calibration, backend, **options)

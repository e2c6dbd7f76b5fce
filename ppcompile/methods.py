"""The methods `ppcompile eval` can compare, by name.

A method turns (model, ratio) into a logits function. New methods register here as they land.
"""
from __future__ import annotations

from typing import Callable

import torch

from .evaluate import LogitsFn, model_logits_fn

MethodBuilder = Callable[[torch.nn.Module, float], LogitsFn]


def _dense(model: torch.nn.Module, ratio: float) -> LogitsFn:
    return model_logits_fn(model)


def _policy(policy: str) -> MethodBuilder:
    def build(model: torch.nn.Module, ratio: float) -> LogitsFn:
        from .api import compile as pp_compile  # late: the CLI starts faster without torch.compile
        return model_logits_fn(pp_compile(model, ratio, policy=policy))

    return build


# pp here runs without calibration: its history starts empty and fills from the evaluated batches.
METHODS: dict[str, MethodBuilder] = {"dense": _dense, "pp": _policy("pp"), "full-batch": _policy("full-batch")}
RATIO_FREE = {"dense"}  # methods whose result does not depend on the ratio


def parse_methods(spec: str) -> list[str]:
    """'dense,pp' -> ['dense', 'pp']; an unknown name is an error listing the known ones."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; known methods: {', '.join(METHODS)}")
    return names


def build_method(name: str, model: torch.nn.Module, ratio: float) -> LogitsFn:
    return METHODS[name](model, ratio)

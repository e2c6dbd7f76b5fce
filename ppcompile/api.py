"""pp.compile: the one entry point."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .backend import make_backend
from .config import PPConfig
from .passes.probe_prune import PassResult
from .runtime import Runtime


@dataclass
class Handle:
    """`model.pp`: the config, the runtime (history between calls) and what the pass did."""
    config: PPConfig
    runtime: Runtime
    passes: list[PassResult] = field(default_factory=list)

    def summary(self) -> list[dict]:
        """One row per site of the last compiled graph: layer, kind, kept/total, status."""
        if not self.passes:
            return []
        r = self.passes[-1]
        rows = [{"site": s.name, "layer": s.layer, "kind": s.kind, "total": s.heads or s.channels,
                 "kept": s.kept, "status": s.status} for s in r.sites]
        return rows + [{"site": p.split(":")[0], "status": "dense: " + p.split(": ", 1)[-1]} for p in r.problems]


def compile(model: torch.nn.Module, ratio: float = 0.4, *, calibration=None, policy: str = "pp",
            backend: str = "inductor", **options) -> torch.nn.Module:
    """Compile `model` so that every call runs the Probe Pruning pass with the given policy.

    backend: "inductor" (C++ on CPU, Triton on GPU) or "eager" (the rewritten graph, run as is).
    options: any other PPConfig field (position_ratio, sample_ratio, skip_layers, blocks, ...).
    """
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    config = PPConfig(ratio=ratio, policy=policy, **options)
    if calibration is not None or policy in ("wanda-sp", "flap"):
        raise NotImplementedError("calibration and the static baselines (wanda-sp, flap) are not built yet")
    handle = Handle(config, Runtime(config.momentum))

    def on_pass(result: PassResult) -> None:
        handle.passes.append(result)
        unmatched = result.problems + [f"{s.name}: {s.status}" for s in result.sites
                                       if s.status.startswith("dense") and "skipped" not in s.status
                                       and "policy" not in s.status and "blocks=" not in s.status]
        if not result.sites and config.strict:
            raise ValueError("ppcompile (strict): no attention or MLP block of this model could be matched")
        if unmatched and config.strict:
            raise ValueError("ppcompile (strict): blocks left dense:\n  " + "\n  ".join(unmatched))
        if unmatched:
            warnings.warn("ppcompile: blocks left dense:\n  " + "\n  ".join(unmatched), stacklevel=2)

    fn = make_backend(config, handle.runtime, inductor=backend == "inductor", on_pass=on_pass)
    model.pp = handle
    return torch.compile(model, backend=fn, dynamic=False)

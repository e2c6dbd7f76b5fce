"""pp.compile: the one entry point."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import dump
from .backend import make_backend
from .calibration import Calibration, collect, fingerprint, resolve
from .config import STATIC_POLICIES, PPConfig
from .passes.probe_prune import PassResult
from .report import left_dense_unmatched, site_rows
from .runtime import Runtime


@dataclass
class Handle:
    """`model.pp`: the config, the runtime (history between calls), the calibration and what the
    pass did."""
    config: PPConfig
    runtime: Runtime
    model_fingerprint: str
    calibration: Calibration | None = None
    passes: list[PassResult] = field(default_factory=list)

    def use_calibration(self, cal: Calibration) -> None:
        """Seed the history from `cal` (pp); static policies score with it when they compile."""
        cal.check(self.model_fingerprint)
        if self.config.policy in STATIC_POLICIES and self.passes:
            raise ValueError(f"policy {self.config.policy!r} already chose its heads and channels when the "
                             "model was compiled; pass the calibration to pp.compile(..., calibration=...)")
        self.calibration = cal
        if self.config.policy == "pp":
            self.runtime.seed(cal.histories())

    def summary(self) -> list[dict]:
        """One row per site of the last compiled graph: layer, kind, module, kept/total, status."""
        return site_rows(self.passes[-1]) if self.passes else []


def calibrate(model: torch.nn.Module, batches, *, meta: dict | None = None,
              progress: bool = False) -> Calibration:
    """Dense passes over `batches` (token tensors (B, L) or dicts with `input_ids` and
    `attention_mask`): the statistics Probe Pruning's history starts from and the static baselines
    score with. A model compiled by pp.compile takes them in at once (its history is seeded)."""
    cal = collect(model, batches, meta=meta, progress=progress)
    handle = getattr(model, "pp", None)
    if isinstance(handle, Handle):
        handle.use_calibration(cal)
    return cal


def compile(model: torch.nn.Module, ratio: float = 0.4, *, calibration=None, policy: str = "pp",
            backend: str = "inductor", dump_dir: str | Path | None = None, **options) -> torch.nn.Module:
    """Compile `model` so that every call runs the Probe Pruning pass with the given policy.

    calibration: a Calibration (see pp.calibrate), the path of a saved one, or an iterable of
        token batches to calibrate on now. pp starts from its history; wanda-sp and flap need it.
    backend: "inductor" (C++ on CPU, Triton on GPU) or "eager" (the rewritten graph, run as is).
    dump_dir: write, per compiled graph, the captured and rewritten graphs, the site table, the
        Inductor code and a report.json there (also $PPCOMPILE_DUMP; see ppcompile.dump).
    options: any other PPConfig field (position_ratio, sample_ratio, skip_layers, blocks,
        telemetry, ...).
    """
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    config = PPConfig(ratio=ratio, policy=policy, **options)
    if config.policy in STATIC_POLICIES and calibration is None:
        raise ValueError(f"policy {policy!r} is static: it needs calibration=<token batches or a "
                         "Calibration from pp.calibrate>")
    model_fp = fingerprint(model)
    key = {"model": model_fp, "config": {k: v for k, v in config.as_dict().items() if k not in ("strict", "telemetry")}}
    handle = Handle(config, Runtime(key=key, telemetry=config.telemetry), model_fp)
    if calibration is not None:
        handle.use_calibration(resolve(calibration, model))

    def on_pass(result: PassResult) -> None:
        handle.passes.append(result)
        unmatched = [f"{r['site']}: {r['status']}" for r in site_rows(result) if left_dense_unmatched(r["status"])]
        if not result.sites and config.strict:
            raise ValueError("ppcompile (strict): no attention or MLP block of this model could be matched")
        if unmatched and config.strict:
            raise ValueError("ppcompile (strict): blocks left dense:\n  " + "\n  ".join(unmatched))
        if unmatched:
            warnings.warn("ppcompile: blocks left dense:\n  " + "\n  ".join(unmatched), stacklevel=2)

    folder = dump.dump_dir(dump_dir)
    fn = make_backend(config, handle.runtime, calibration=lambda: handle.calibration,
                      inductor=backend == "inductor", on_pass=on_pass,
                      dumper=dump.Dumper(folder) if folder else None)
    model.pp = handle
    return torch.compile(model, backend=fn, dynamic=False)

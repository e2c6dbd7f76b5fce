"""pp.compile: the one entry point. It builds the session the `ppcompile` backend runs on, and
wraps the compiled model's forward so that every call is accounted for: a call that Dynamo ran
as the original forward (recompile limit, graph break, a disabled or eager stance) warns once with
its cause and the fix, and raises under strict=True. Never silently unpruned."""
from __future__ import annotations

from pathlib import Path

import torch

from . import dump
from .backend import Session
from .calibration import Calibration, collect, fingerprint, resolve
from .config import PPConfig
from .generation import Router
from .runtime import Runtime
from .torch_compat import compile_isolated


def calibrate(model: torch.nn.Module, batches, *, meta: dict | None = None,
              progress: bool = False) -> Calibration:
    """Dense passes over `batches` (token tensors (B, L) or dicts with `input_ids` and
    `attention_mask`): the statistics Probe Pruning's history starts from and the static baselines
    score with. A model compiled by pp.compile takes them in at once (its history is seeded)."""
    cal = collect(model, batches, meta=meta, progress=progress)
    session = getattr(model, "pp", None)
    if isinstance(session, Session):
        session.use_calibration(cal)
    return cal


def compile(model: torch.nn.Module, ratio: float = 0.4, *, calibration=None, policy: str = "pp",
            backend: str = "inductor", dump_dir: str | Path | None = None, quiet: bool = False,
            **options) -> torch.nn.Module:
    """Compile `model` so that every call runs the Probe Pruning pass with the given policy.

    calibration: a Calibration (see pp.calibrate), the path of a saved one, or an iterable of
        token batches to calibrate on now. pp starts from its history; wanda-sp and flap need it.
    backend: "inductor" (C++ on CPU, Triton on GPU) or "eager" (the rewritten graph, run as is).
    dump_dir: write, per compiled graph, the captured and rewritten graphs, the site table, the
        Inductor code and a report.json there (also $PPCOMPILE_DUMP; see ppcompile.dump).
    quiet: no line on stderr when an Inductor compile starts and ends (also PPCOMPILE_QUIET=1).
    options: any other PPConfig field (position_ratio, sample_ratio, skip_layers, blocks,
        dynamic, strict, telemetry, ...).

    Shapes (config.dynamic, as torch.compile's `dynamic`): by default (None) the first call's batch
    and sequence length compile a static graph that keeps serving them; the first call of another
    shape compiles one graph that serves every other shape with batch >= 2 (one more for batch 1:
    Dynamo specializes sizes 0 and 1). dynamic=True compiles that graph at once (a server of mixed
    shapes); False, one static graph per shape.
    """
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    config = PPConfig.from_options({"ratio": ratio, "policy": policy, **options})  # an unknown option is named
    if config.policy.needs_calibration and calibration is None:
        raise ValueError(f"policy '{config.policy}' is static: it needs calibration=<token batches or a "
                         "Calibration from pp.calibrate>")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n_layers, int):  # before any compile; the session checks again on each whole graph
        config.check_layers(n_layers, named="skip_layers" in options)
    model_fp = fingerprint(model)
    key = {"model": model_fp, "config": {k: v for k, v in config.as_dict().items() if k not in ("strict", "telemetry")}}
    folder = dump.dump_dir(dump_dir)
    session = Session(config, runtime=Runtime(key=key, telemetry=config.telemetry),
                      inductor=backend == "inductor", dumper=dump.Dumper(folder) if folder else None,
                      model_fingerprint=model_fp, skip_layers_named="skip_layers" in options, quiet=quiet)
    if calibration is not None:
        session.use_calibration(resolve(calibration, model))
    model.pp = session
    # Own recompile region: other compiled copies of this class do not count against its limit.
    # strict: a graph break or the recompile limit raises inside Dynamo instead of running eager.
    compiled = compile_isolated(model, backend=session.backend, dynamic=False, fullgraph=config.strict)
    compiled.__dict__["pp"] = session  # this compiled object's own (model.pp: the last compile's)
    router = Router(model, session, compiled.forward)
    compiled.forward = router.forward
    if callable(getattr(model, "generate", None)):
        compiled.__dict__["generate"] = router.generate  # this object's, not the model's
    return compiled

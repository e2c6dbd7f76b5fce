"""pp.compile: the one entry point. It builds the session the `ppcompile` backend runs on, and
wraps the compiled model's forward so that every call is accounted for: a call that Dynamo ran
as the original forward (recompile limit, graph break, a disabled or eager stance) warns once with
its cause and the fix, and raises under strict=True. Never silently unpruned."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import dump
from .backend import Session
from .calibration import Calibration, collect, fingerprint, resolve
from .config import PPConfig
from .inputs import check_call, check_training
from .runtime import Runtime

# Inputs whose first two dims are (batch, sequence): made dynamic on every call.
BATCH_BY_SEQUENCE = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels")


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
            backend: str = "inductor", dump_dir: str | Path | None = None, **options) -> torch.nn.Module:
    """Compile `model` so that every call runs the Probe Pruning pass with the given policy.

    calibration: a Calibration (see pp.calibrate), the path of a saved one, or an iterable of
        token batches to calibrate on now. pp starts from its history; wanda-sp and flap need it.
    backend: "inductor" (C++ on CPU, Triton on GPU) or "eager" (the rewritten graph, run as is).
    dump_dir: write, per compiled graph, the captured and rewritten graphs, the site table, the
        Inductor code and a report.json there (also $PPCOMPILE_DUMP; see ppcompile.dump).
    options: any other PPConfig field (position_ratio, sample_ratio, skip_layers, blocks,
        dynamic, strict, telemetry, ...).

    Batch and sequence length are dynamic (config.dynamic): one graph serves every shape with
    batch >= 2, one more every shape with batch 1 (Dynamo specializes sizes 0 and 1).
    """
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    config = PPConfig(ratio=ratio, policy=policy, **options)
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
                      model_fingerprint=model_fp, skip_layers_named="skip_layers" in options)
    if calibration is not None:
        session.use_calibration(resolve(calibration, model))
    model.pp = session
    # Own recompile region: other compiled copies of this class do not count against its limit.
    # strict: a graph break or the recompile limit raises inside Dynamo instead of running eager.
    compiled = torch.compile(model, backend=session.backend, dynamic=False, fullgraph=config.strict,
                             isolate_recompiles=True)
    compiled.forward = _accounted(compiled.forward, model, session)
    if callable(getattr(model, "generate", None)):
        compiled.__dict__["generate"] = _unrouted_generate(model, session)  # this object's, not the model's
    return compiled


def _accounted(forward, model: torch.nn.Module, session: Session):
    """The compiled forward, checked and counted: bad inputs are refused before anything runs,
    batch and sequence dims are marked dynamic, and a call no compiled graph ran is reported."""
    runtime, config = session.runtime, session.config
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    @functools.wraps(forward)
    def call(*args, **kwargs):
        check_training(model.training)
        for message in check_call(args, kwargs, max_positions=max_positions):
            session.warn_once(f"ppcompile: {message}")
        if config.dynamic:
            args, kwargs = _mark_dynamic(args, kwargs)
        graphs, sites = runtime.counts["graph_runs"], runtime.counts["site_runs"]
        out = forward(*args, **kwargs)
        ran_graph = runtime.counts["graph_runs"] > graphs
        if ran_graph and (runtime.counts["site_runs"] > sites or not config.policy.prunes):
            runtime.counts["pruned_calls"] += 1
            return out
        runtime.counts["unpruned_calls"] += 1
        cause = _fallback_cause(model) if not ran_graph else (
            "its compiled graphs held no whole attention or MLP block (graph breaks split them); run "
            "with TORCH_LOGS=graph_breaks to see where, or compile with strict=True to make it an error")
        message = f"ppcompile: this call ran the original, unpruned forward: {cause}"
        if config.strict:
            raise RuntimeError(message + " (strict=True)")
        session.warn_once(message)
        return out

    return call


def _unrouted_generate(model: torch.nn.Module, session: Session):
    """generate() on the compiled model: Hugging Face's loop calls the original module's forward,
    which the pass never sees. Until generation goes through the pass, say so (strict: refuse)."""
    message = ("ppcompile: generate() runs the original, unpruned model: Hugging Face's generation loop "
               "calls the module's own forward, which does not go through the pass; call the compiled "
               "model directly (prefill) to prune")

    @functools.wraps(model.generate)
    def generate(*args, **kwargs):
        if session.config.strict:
            raise RuntimeError(message + " (strict=True)")
        session.runtime.counts["unpruned_calls"] += 1
        session.warn_once(message)
        return model.generate(*args, **kwargs)

    return generate


def _mark_dynamic(args, kwargs):
    """The call's (batch, sequence) inputs with both dims marked dynamic: on aliases (detach: no
    copy), so that the caller's tensors stay unmarked for other compiled models."""
    def marked(t):
        t = t.detach()
        for d in range(min(2, t.dim())):
            torch._dynamo.maybe_mark_dynamic(t, d)  # "maybe": a size-1 dim stays specialized
        return t

    if args and isinstance(args[0], torch.Tensor):
        args = (marked(args[0]),) + tuple(args[1:])
    kwargs = {k: marked(v) if k in BATCH_BY_SEQUENCE and isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
    return args, kwargs


def _fallback_cause(model: torch.nn.Module) -> str:
    """Why Dynamo ran the original forward, and what to do about it."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, _stance
    if _stance.stance != "default":
        return (f"torch.compiler.set_stance({_stance.stance!r}) is in effect; set the stance back to "
                "'default' to prune")
    if dynamo_config.disable:
        return "Dynamo is disabled (torch._dynamo.config.disable / TORCHDYNAMO_DISABLE); enable it to prune"
    cached = len(_debug_get_cache_entry_list(type(model).forward))
    if cached >= dynamo_config.recompile_limit:
        return (f"Dynamo reached its recompile limit ({dynamo_config.recompile_limit} graphs of "
                f"{type(model).__name__}.forward); inputs other than batch and sequence length change "
                "between calls (other keyword arguments, dtypes, devices): keep them fixed, or raise "
                "torch._dynamo.config.recompile_limit")
    return ("Dynamo did not run a compiled graph (a graph break or a guard it could not compile); "
            "run with TORCH_LOGS=graph_breaks,recompiles to see where, or compile with strict=True "
            "to make it an error")

"""Probe Pruning as vLLM's compile backend: one engine step is one call of the compiled backbone.

vLLM's CPU build compiles the model's backbone once (mode DYNAMO_TRACE_ONCE), as one graph over
the step's tokens, (T, hidden), guards dropped, and calls it for every step: prompt chunks and
decode tokens of many requests packed together. The pass sees that graph as one sequence of T
tokens (passes/graph.py) and this backend compiles it in two phases:

  prefill  a step with prompt tokens: probe a share of the step's tokens, fuse with the history,
           select, run on compact weights and store the selection and those weights
  decode   a step of decode tokens only (vLLM's attention metadata: max_query_len 1): reuse what
           the last prefill step stored, compact matmuls only, no probe

One selection per step serves every request in it (Probe Pruning is batch-wise), and a decode
step reuses the selection of the last step that had prompt tokens. The step's kind is read off
vLLM's forward context (host values: no device sync). vLLM's warm-up and profile runs have no
attention metadata and run on uninitialised attention outputs: they leave the state as they found it.
Every step is counted by what it ran (`StepBackend.counts`); one that runs unpruned warns.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

import torch
from torch import fx

from . import progress
from .backend import Session, session_from_options
from .report import site_rows

# what vLLM's compilation_config names as its backend: a qualified name, which vLLM imports in the
# worker (no Dynamo registration to depend on)
QUALNAME = "ppcompile.vllm_backend.compile_step"
OPTIONS_ENV = "PPCOMPILE_VLLM"  # ppcompile's options as JSON: what every vLLM process reads
PLAIN_MARK = "ppcompile_plain_linears"  # on vLLM's CPU linear dispatch once the plugin replaced it
# vLLM's attention is one opaque op that owns its KV cache, laid out by K/V head: heads cannot be pruned
DEFAULTS = {"blocks": "mlp"}

_BACKEND: "StepBackend | None" = None


def options_from_env() -> dict | None:
    """The options of $PPCOMPILE_VLLM (a JSON object), with DEFAULTS under them; None if unset."""
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return None
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"${OPTIONS_ENV} must hold ppcompile's options as a JSON object, e.g. "
                         f"'{{\"ratio\": 0.4}}': {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"${OPTIONS_ENV} must be a JSON object such as '{{\"ratio\": 0.4}}', got {raw!r}")
    return {**DEFAULTS, **options}


def backend() -> "StepBackend":
    """This process's backend (one per vLLM worker), made from $PPCOMPILE_VLLM."""
    global _BACKEND
    if _BACKEND is None:
        options = options_from_env()
        if options is None:
            raise ValueError(f"{QUALNAME} reads its options from ${OPTIONS_ENV}, which is unset: use "
                             "ppcompile.vllm_plugin.engine_args(ratio=...) to configure vLLM")
        _BACKEND = StepBackend(options)
    return _BACKEND


def plain_linears() -> bool:
    """Whether this process runs the linears outside attention as F.linear: vLLM's CPU linear
    dispatch carries the mark the plugin (vllm_plugin.py) sets on its replacement."""
    from vllm.model_executor.layers import utils
    return getattr(utils.dispatch_cpu_unquantized_gemm, PLAIN_MARK, False)


def compile_step(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The backend vLLM calls (QUALNAME), in its worker."""
    if not plain_linears():
        raise RuntimeError("ppcompile's vLLM plugin did not run in this worker, so its linears are vLLM's opaque "
                           "CPU GEMMs and nothing could be pruned. The plugin loads through the entry point "
                           "vllm.general_plugins: install ppcompile in vLLM's environment (pip install -e . or "
                           "ppcompile[vllm]); a stale ppcompile.egg-info in the working directory can hide it")
    return backend()(gm, example_inputs)


class StepBackend:
    def __init__(self, options: dict):
        self.session: Session = session_from_options(dict(options))
        # steps by what they ran: prefill / decode (pruned), warmup (vLLM's dummy runs), dense (unpruned)
        self.counts = {"prefill": 0, "decode": 0, "warmup": 0, "dense": 0}

    @property
    def runtime(self):
        return self.session.runtime

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        sizes_from_one(gm)
        prefill = self.session.backend(gm, example_inputs, phase="prefill")
        result = self.session.passes[-1]
        self._report(result)
        pruned = result.active_sites
        decode = self.session.backend(gm, example_inputs, phase="decode", stored=frozenset(pruned)) \
            if pruned else None

        def step(*args):
            kind = step_kind()
            if kind == "decode" and decode is not None and self.runtime.stored_sites:
                out = decode(*args)
            elif kind == "warmup":  # its attention ran on uninitialised outputs: keep nothing it wrote
                before = {name: t.clone() for name, t in self.runtime.slots.items()}
                out = prefill(*args)
                self.runtime.slots = before
            else:  # (a decode step before any prefill stored, e.g. of one-token prompts: it selects)
                out = prefill(*args)
                kind = "prefill"
            if not pruned and kind != "warmup":
                kind = "dense"
                self.session.warn_once("ppcompile: a vLLM step ran unpruned: no block of this model was pruned "
                                       "(see the blocks left dense above)")
            self.counts[kind] += 1
            self._log_counts()
            return out

        return step

    def _report(self, result) -> None:
        """One line on stderr: how many blocks each step prunes, and why the rest stay dense."""
        if not progress.enabled(self.session.quiet):
            return
        rows = site_rows(result)
        dense: dict[str, int] = {}
        for r in rows:
            if r["reason"] is not None:
                what = f"{r['kind']} ({r['status'].removeprefix('dense: ')})"
                dense[what] = dense.get(what, 0) + 1
        why = ", ".join(f"{n} {what}" for what, n in dense.items())
        pruned = len(result.active_sites)
        print(f"[ppcompile] vLLM: {pruned} of {len(rows)} blocks pruned at ratio {self.session.config.ratio}"
              + (f"; dense: {why}" if why else ""), file=sys.stderr, flush=True)

    def _log_counts(self) -> None:
        """A line on stderr at 1, 2, 4, 8, ... served steps: what they ran (a server's log shows it)."""
        c = self.counts
        served = c["prefill"] + c["decode"] + c["dense"]
        if served & (served - 1) == 0 and served and progress.enabled(self.session.quiet):
            print(f"[ppcompile] vLLM steps: {c['prefill'] + c['decode']} pruned ({c['prefill']} prefill, "
                  f"{c['decode']} decode), {c['dense']} unpruned", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        """What a worker reports back (collective_rpc): step counts and each site's status."""
        return {"counts": dict(self.counts), "sites": self.session.summary()}


def step_kind() -> str:
    """decode (every request of the step decodes one token), prefill (prompt tokens in it), or
    warmup (no attention metadata: vLLM's compile warm-up and profile runs)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return "warmup"
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batches: one dict each
        metadata = metadata[0] if metadata else None
    if not metadata:
        return "warmup"
    longest = getattr(next(iter(metadata.values())), "max_query_len", None)
    return "decode" if longest == 1 else "prefill"


def sizes_from_one(gm: fx.GraphModule) -> None:
    """vLLM calls its one dynamic graph at every token count, 1 included: it drops the guards that
    would specialize 1, so a size Dynamo ranged from 2 may be 1. Widen those ranges before the pass
    reads them (ops.least_value), so that no min/max the probe sizes need at 1 is left out."""
    from torch.utils._sympy.value_ranges import ValueRanges
    for n in gm.graph.nodes:
        v = n.meta.get("example_value") if n.op == "placeholder" else None
        sizes = [v] if isinstance(v, torch.SymInt) else list(v.shape) if isinstance(v, torch.Tensor) else []
        for s in sizes:
            if not isinstance(s, torch.SymInt):
                continue
            env = s.node.shape_env
            for sym in s.node.expr.free_symbols:
                r = env.var_to_range.get(sym)
                if r is not None and r.lower == 2:
                    env.var_to_range[sym] = ValueRanges(1, r.upper)

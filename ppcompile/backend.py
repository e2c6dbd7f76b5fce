"""The torch.compile backend: run the pass, then hand the graph to Inductor (or run it as is)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from .config import PPConfig
from .passes.probe_prune import PassResult, StaticChoice, run_pass
from .runtime import Runtime


def make_backend(config: PPConfig, runtime: Runtime, *, static: dict[str, StaticChoice] | None = None,
                 inductor: bool = True, on_pass: Callable[[PassResult], None] | None = None):
    def backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        result = run_pass(gm, config, static)
        if on_pass is not None:
            on_pass(result)
        channels = {s.name: s.channels for s in result.sites}

        def state_inputs() -> list[torch.Tensor]:
            tables = [runtime.table(name, result.seq_len, channels[name]) for name in result.history_sites]
            return ([runtime.seeded, runtime.step] if result.uses_step else []) + tables

        n = result.n_outputs
        if inductor:
            from torch._inductor.compile_fx import compile_fx
            compiled = compile_fx(result.gm, list(example_inputs) + state_inputs())
        else:
            compiled = result.gm.forward

        def run(*args):
            out = compiled(*args, *state_inputs())
            runtime.record(dict(zip(result.selected_sites, out[n:n + len(result.selected_sites)])))
            return out[:n]

        return run

    return backend


def ppcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """`torch.compile(model, backend="ppcompile", options={...})`: every PPConfig field, plus
    `runtime` (a Runtime to keep the history in; by default a new one, see `last_runtime()`)."""
    options = dict(options or {})
    runtime = options.pop("runtime", None)
    inductor = options.pop("inductor", True)
    config = PPConfig.from_options(options)
    global _LAST_RUNTIME
    _LAST_RUNTIME = runtime = runtime or Runtime(config.momentum)
    return make_backend(config, runtime, inductor=inductor)(gm, example_inputs)


_LAST_RUNTIME: Runtime | None = None


def last_runtime() -> Runtime | None:
    return _LAST_RUNTIME

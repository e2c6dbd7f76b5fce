"""The torch.compile backend: run the pass, then hand the graph to Inductor (or run it as is)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import fx

from .calibration import Calibration
from .config import PPConfig
from .dump import Dumper, dump_dir, inductor_code
from .passes.graph import input_device
from .passes.probe_prune import PassResult, run_pass
from .runtime import Runtime


def real_tensors(gm: fx.GraphModule, example_inputs: list) -> Callable[[fx.Node], torch.Tensor | None]:
    """A graph node -> the real tensor behind it (a placeholder's example input, a get_attr's attribute)."""
    index = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}

    def real(node: fx.Node) -> torch.Tensor | None:
        if node.op == "placeholder" and node.name in index:
            t = example_inputs[index[node.name]]
        elif node.op == "get_attr":
            t = getattr(gm, node.target, None)
        else:
            return None
        real_tensor = isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)
        return t if real_tensor else None

    return real


def make_backend(config: PPConfig, runtime: Runtime, *,
                 calibration: Callable[[], Calibration | None] = lambda: None,
                 inductor: bool = True, on_pass: Callable[[PassResult], None] | None = None,
                 dumper: Dumper | None = None):
    """`calibration` is read when a graph is compiled (a static policy scores its weights then);
    `dumper` writes what the pass did (see ppcompile.dump)."""
    def backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        result = run_pass(gm, config, calibration=calibration(), real=real_tensors(gm, example_inputs))
        folder = dumper.next_graph() if dumper else None
        if folder:
            dumper.write_pass(folder, gm, result, config)
        if on_pass is not None:
            on_pass(result)
        for s in result.sites:
            if s.name in result.selected_sites:
                runtime.sites[s.name] = {"layer": s.layer, "kind": s.kind, "total": s.heads or s.channels,
                                         "pruned_flops": s.info["pruned_flops"]}
        history, device = result.history_channels(), input_device(example_inputs)

        def state_inputs() -> list[torch.Tensor]:
            return runtime.inputs(history, result.seq_len, device, result.uses_step)

        n, k = result.n_outputs, len(result.selected_sites)
        if inductor:
            from torch._inductor.compile_fx import compile_fx
            codes: list[str] = []
            with inductor_code(codes) if folder else contextlib.nullcontext():
                compiled = compile_fx(result.gm, list(example_inputs) + state_inputs())
            if folder:
                dumper.write_inductor(folder, codes)
        else:
            compiled = result.gm.forward

        def run(*args):
            out = compiled(*args, *state_inputs())
            shares = dict(zip(result.selected_sites, out[n + k:n + 2 * k])) if result.shares else None
            runtime.record(dict(zip(result.selected_sites, out[n:n + k])), shares)
            return out[:n]

        return run

    return backend


def ppcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """`torch.compile(model, backend="ppcompile", options={...})`: every PPConfig field, plus
    `runtime` (a Runtime to keep the history in; by default a new one, see `last_runtime()`),
    `calibration` (a Calibration or the path of a saved one: seeds the history, and the static
    policies score with it), `inductor` (False: run the rewritten graph without Inductor) and
    `dump_dir` (write what the pass did there; also $PPCOMPILE_DUMP)."""
    options = dict(options or {})
    runtime = options.pop("runtime", None)
    inductor = options.pop("inductor", True)
    folder = dump_dir(options.pop("dump_dir", None))
    cal = options.pop("calibration", None)
    config = PPConfig.from_options(options)
    if cal is not None and not isinstance(cal, Calibration):
        cal = Calibration.load(cal)
    global _LAST_RUNTIME
    _LAST_RUNTIME = runtime = runtime or Runtime()
    runtime.telemetry = runtime.telemetry or config.telemetry
    if cal is not None and config.policy == "pp" and not bool(runtime.seeded):
        runtime.seed(cal.histories())
    dumper = Dumper(folder) if folder else None
    return make_backend(config, runtime, calibration=lambda: cal, inductor=inductor, dumper=dumper)(gm, example_inputs)


_LAST_RUNTIME: Runtime | None = None


def last_runtime() -> Runtime | None:
    return _LAST_RUNTIME

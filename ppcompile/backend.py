"""The torch.compile backend and the session behind it: one per compiled model.

`pp.compile(model, ...)` and `torch.compile(model, backend="ppcompile", options={...})` take the
same path: a `Session` (config, one runtime for all of the model's graphs, the calibration, what
each pass did) whose `backend` runs the pass on every graph Dynamo hands over, enforces `strict`,
warns on blocks left dense, checks a calibration against the weights it meets, and hands the
rewritten graph to Inductor (or runs it as is). Each call of a compiled graph fetches its state
slots from the runtime and reports its named outputs back (see passes/seam.py).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

from torch import fx
from torch._dynamo.utils import dynamo_timed

from . import cache, progress
from .calibration import Calibration, resolve
from .config import PPConfig
from .dump import Dumper, dump_dir, inductor_code
from .passes.graph import real_tensors
from .passes.probe_prune import PassResult, run_pass
from .report import left_dense_unmatched, site_rows
from .runtime import Runtime


class Session:
    """Everything one compiled model shares across its graphs and calls."""

    def __init__(self, config: PPConfig, *, runtime: Runtime | None = None, inductor: bool = True,
                 dumper: Dumper | None = None, model_fingerprint: str | None = None,
                 skip_layers_named: bool = True, quiet: bool = False):
        self.config = config
        self.quiet = quiet  # no progress lines on stderr (progress.py)
        self.skip_layers_named = skip_layers_named  # the user chose skip_layers: each must exist
        self.runtime = runtime or Runtime(telemetry=config.telemetry)
        self.runtime.telemetry = self.runtime.telemetry or config.telemetry
        self.inductor = inductor
        self.dumper = dumper
        self.model_fingerprint = model_fingerprint
        self.calibration: Calibration | None = None
        self.passes: list[PassResult] = []
        self.derived: dict = {}  # constants made from weights alone, shared by every graph (run_pass)
        self._warned: set[str] = set()

    def warn_once(self, message: str) -> None:
        """Warn about something the user should know once, not on every call."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    # ---- calibration ----
    def use_calibration(self, cal: Calibration) -> None:
        """Seed the history from `cal` (policies with a history); static policies score with it
        when a graph compiles."""
        if self.model_fingerprint is not None:
            cal.check(self.model_fingerprint)
        if self.config.policy.needs_calibration and self.passes:
            raise ValueError(f"policy '{self.config.policy}' already chose its heads and channels when the model "
                             "was compiled; pass the calibration to pp.compile(..., calibration=...)")
        self.calibration = cal
        if self.config.uses_history:
            self.runtime.seed(cal.histories())

    # ---- what torch.compile calls for every graph ----
    def backend(self, gm: fx.GraphModule, example_inputs: list, phase: str = "forward",
                stored: frozenset[str] | None = None) -> Callable:
        """Rewrite and compile one graph for `phase` (forward, prefill or decode: see run_pass);
        a decode graph reuses the selections of `stored` sites (default: those a prefill stored)."""
        real = real_tensors(gm, example_inputs, self.derived)
        if self.config.policy.needs_calibration and self.calibration is None:
            raise ValueError(f"policy '{self.config.policy}' is static: it needs calibration=<token batches, a "
                             "Calibration from pp.calibrate, or the path of a saved one>")
        with dynamo_timed("ppcompile_pass"):  # a phase of Dynamo's compile metrics (compile_times())
            result = run_pass(gm, self.config, calibration=self.calibration, real=real, phase=phase,
                              stored=self.runtime.stored_sites if stored is None else stored, derived=self.derived,
                              for_inductor=self.inductor)
        if result.whole_model:
            self.config.check_layers(result.n_layers, named=self.skip_layers_named)
        if self.calibration is not None:
            self.calibration.check_weights({s.name: real(s.final.args[1]) for s in result.sites})
        self.passes.append(result)
        folder = self.dumper.next_graph() if self.dumper else None
        if folder:
            self.dumper.write_pass(folder, gm, result, self.config)
        self._report(result)
        for s in result.sites:
            if s.pruned:
                self.runtime.sites[s.name] = {"layer": s.layer, "kind": s.kind, "total": s.units,
                                              "pruned_flops": s.pruned_flops}
        seam, runtime = result.seam, self.runtime
        n_cost_dense = len(result.dense_by_cost)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx
            codes: list[str] = []
            with inductor_code(codes) if folder else contextlib.nullcontext(), cache.cacheable(), \
                    progress.compiling(self._describe(result), self.quiet):
                compiled = compile_fx(result.compiled, list(example_inputs) + seam.examples())
            if folder:
                self.dumper.write_inductor(folder, codes)
        else:
            compiled = result.compiled.forward

        def run(*args):
            out, named = seam.call(compiled, args, runtime.provide)
            runtime.record(named)
            runtime.counts["graph_runs"] += 1
            runtime.counts["site_runs"] += len(result.active_sites)
            runtime.cost_dense_site_runs += n_cost_dense
            return out

        return run

    def _describe(self, result: PassResult) -> str:
        """What a progress line says a compile is: "graph 2 (decode, batch 1 x any length, 54 of 60
        blocks pruned) with Inductor"."""
        size = [str(s) if isinstance(s, int) else "any" for s in (result.batch, result.seq_len)]
        return (f"graph {len(self.passes)} ({result.phase}, batch {size[0]} x length {size[1]}, "
                f"{len(result.active_sites)} of {len(result.sites)} blocks pruned) with Inductor")

    def _report(self, result: PassResult) -> None:
        """Strict: any block left dense that the config did not ask for is an error; else a warning.
        Blocks the cost rule leaves dense are a choice, told once per size."""
        if result.dense_by_cost:
            first = result.dense_by_cost[0]
            self.warn_once(f"ppcompile: {len(result.dense_by_cost)} of {len(result.sites)} blocks run dense in this "
                           f"graph: pruning cannot pay at {first.status.detail}; a larger call compiles a pruned "
                           "graph, and gather_cost=0 prunes at every size")
        unmatched = [f"{r['site']}: {r['status']}" for r in site_rows(result) if left_dense_unmatched(r)]
        if not result.sites and self.config.strict:
            raise ValueError("ppcompile (strict): no attention or MLP block of this model could be matched")
        if unmatched and self.config.strict:
            raise ValueError("ppcompile (strict): blocks left dense:\n  " + "\n  ".join(unmatched))
        if unmatched:
            warnings.warn("ppcompile: blocks left dense:\n  " + "\n  ".join(unmatched), stacklevel=2)

    def summary(self) -> list[dict]:
        """One row per site of the last compiled graph: layer, kind, module, kept/total, status."""
        return site_rows(self.passes[-1]) if self.passes else []


# The backend's options beyond PPConfig's fields (session_from_options says what each does).
SESSION_OPTIONS = ("runtime", "inductor", "quiet", "dump_dir", "calibration")
# torch.compile passes the same `options` dict for every graph of one compile: one session each.
_SESSIONS: dict[int, tuple[dict, Session]] = {}
_LAST_RUNTIME: Runtime | None = None


def session_from_options(options: dict | None) -> Session:
    """The session of a `torch.compile(..., backend="ppcompile", options=...)` call: every PPConfig
    field, plus `runtime` (a Runtime to keep the history in; by default a new one, see
    `last_runtime()`), `calibration` (a Calibration or the path of a saved one: seeds the history,
    and the static policies score with it), `inductor` (False: run the rewritten graph without
    Inductor), `dump_dir` (write what the pass did there; also $PPCOMPILE_DUMP) and `quiet` (no
    progress lines on stderr)."""
    global _LAST_RUNTIME
    key = id(options)
    if options is not None and key in _SESSIONS and _SESSIONS[key][0] is options:
        return _SESSIONS[key][1]
    opts = dict(options or {})
    runtime, inductor, quiet = opts.pop("runtime", None), opts.pop("inductor", True), opts.pop("quiet", False)
    folder, cal = dump_dir(opts.pop("dump_dir", None)), opts.pop("calibration", None)
    session = Session(PPConfig.from_options(opts), runtime=runtime, inductor=inductor,
                      dumper=Dumper(folder) if folder else None, skip_layers_named="skip_layers" in opts, quiet=quiet)
    if cal is not None:
        session.use_calibration(resolve(cal))
    if options is not None:
        _SESSIONS[key] = (options, session)
    _LAST_RUNTIME = session.runtime
    return session


def ppcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """`torch.compile(model, backend="ppcompile", options={...})`: see `session_from_options`.
    The model's `generate` is routed through the same session (see _route_generation)."""
    session = session_from_options(options)
    _route_generation(session)
    return session.backend(gm, example_inputs)


def _route_generation(session: Session) -> None:
    """`generate` on what torch.compile returns reaches the module's own method, whose forwards
    would bypass the compiled one: unpruned, and silently. The module being compiled (the `self`
    of the frame Dynamo traces) gets, as its own attribute, the generate pp.compile gives, on this
    session. If that module cannot be found, the session says so once."""
    model = _traced_module()
    if model is None:
        session.warn_once("ppcompile: generate() on a model compiled with torch.compile(backend='ppcompile') "
                          "could not be routed through the pass and would run unpruned; use pp.compile")
        return
    from .generation import Router
    current = model.__dict__.get("generate")  # a user's own generate is left alone
    routed = getattr(current, "__self__", None)
    if callable(getattr(model, "generate", None)) and (
            current is None or (isinstance(routed, Router) and routed.session is not session)):
        model.__dict__["generate"] = Router(model, session).generate
        model.__dict__["pp"] = session


def _traced_module():
    """The nn.Module Dynamo is tracing now, or None: found among the root frame's locals (`self`
    of a forward; `fn`, a module or its bound method, in torch.compile's wrapper frame; the first
    of `args` in a decorator's wrapper, as transformers puts around forward)."""
    import torch
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        local = InstructionTranslator.current_tx().output.root_tx.f_locals
    except Exception:  # a private API: if it changes, the caller says generation is not routed
        return None
    fn, args = local.get("fn"), local.get("args")
    first = args[0] if isinstance(args, tuple) and args else None
    for v in (local.get("self"), fn, getattr(fn, "__self__", None), first):
        if isinstance(v, torch.nn.Module):
            return v
    return None


def last_runtime() -> Runtime | None:
    """The runtime of the last session the `ppcompile` backend made."""
    return _LAST_RUNTIME

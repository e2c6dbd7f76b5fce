"""Every call of a compiled model through the pass, generation included, and accounted for.

A call is routed by its KV cache to one of the pass's phases (passes/probe_prune.PHASES):
  no cache passed              forward   select and compute (a DynamicCache made inside is returned)
  a static cache, empty        prefill   select, compute, store the selection and compact weights
  a static cache holding tokens decode   reuse the stored selection: compact matmuls only
`generate()` runs Hugging Face's loop with a static cache sized to a bucket (so that prompts of
different lengths share graphs) and the model's forward swapped for the router for its duration:
its first forward is the prefill, every later one a decode step.

Each phase is its own torch.compile region over the model class's forward (so that swapping the
instance's forward cannot recurse). Every call counts as pruned or unpruned; a call no compiled
graph ran warns once with its cause and the fix, and raises under strict=True.
"""
from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

import torch

from .inputs import check_call, check_training
from .passes.select import selector_for
from .torch_compat import compile_isolated

if TYPE_CHECKING:
    from .backend import Session

# Inputs whose first two dims are (batch, sequence): marked dynamic on a dynamic call (Router._dynamic_now).
BATCH_BY_SEQUENCE = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels")
CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5 / 4
# Hugging Face's static-cache generate as the routing is built and tested on; 5.19 (what vLLM's CPU
# build pins) names the cache past_key_values and its decode steps differ (tests fail there)
GENERATE_NEEDS = "5.24"


class Router:
    """The compiled entry points of one model, by phase, and the accounting of every call."""

    def __init__(self, model: torch.nn.Module, session: Session, forward=None):
        self.model, self.session = model, session
        self._entries = {"forward": forward} if forward else {}  # the compiled module's own forward
        self._class_forward = type(model).forward.__get__(model)
        self._max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._first_shape: dict[str, tuple] = {}  # phase -> its first call's (batch, sequence) (dynamic=None)

    def entry(self, phase: str):
        if phase not in self._entries:
            session = self.session
            # decode: automatic dynamic, for what changes every step besides tensors (a sliding cache's
            # position counter is a Python int): it is made symbolic on its first change
            self._entries[phase] = compile_isolated(
                self._class_forward, backend=functools.partial(session.backend, phase=phase),
                dynamic=None if phase == "decode" else False, fullgraph=session.config.strict)
        return self._entries[phase]

    # ---- plain calls ----
    def forward(self, *args, **kwargs):
        """model(...) on the compiled model: the phase follows from the cache it is given."""
        return self.call(_phase_of(_cache_of(kwargs)), args, kwargs)

    def call(self, phase: str, args: tuple, kwargs: dict, *, user: bool = True):
        """Run one call in `phase`, counted. `user`: the caller's own inputs, checked first (the
        calls generate makes carry the masks it builds)."""
        session, runtime, config = self.session, self.session.runtime, self.session.config
        check_training(self.model.training)
        for message in check_call(args, kwargs, max_positions=self._max_positions) if user else ():
            session.warn_once(f"ppcompile: {message}")
        if phase == "decode" and config.policy.prunes and not selector_for(config.policy).fixed and \
                not runtime.stored_sites:
            raise ValueError("a decode call (its static cache holds tokens) before any prefill: the decode reuses a "
                             "prefill's selection; run the prompt first into an empty cache (generate() does)")
        if self._dynamic_now(phase, args, kwargs):
            args, kwargs = _mark_dynamic(args, kwargs)
        graphs, sites, by_cost = runtime.counts["graph_runs"], runtime.counts["site_runs"], runtime.cost_dense_site_runs
        out = self.entry(phase)(*args, **kwargs)
        ran_graph = runtime.counts["graph_runs"] > graphs
        if ran_graph and (runtime.counts["site_runs"] > sites or not config.policy.prunes):
            runtime.counts["pruned_calls"] += 1
            return out
        if ran_graph and runtime.cost_dense_site_runs > by_cost:  # too small to pay: the choice was warned of
            runtime.counts["dense_by_cost_calls"] += 1
            return out
        runtime.counts["unpruned_calls"] += 1
        cause = _fallback_cause(self.model) if not ran_graph else (
            "its compiled graphs held no whole attention or MLP block (graph breaks split them); run "
            "with TORCH_LOGS=graph_breaks to see where, or compile with strict=True to make it an error")
        message = f"ppcompile: this call ran the original, unpruned forward: {cause}"
        if config.strict:
            raise RuntimeError(message + " (strict=True)")
        session.warn_once(message)
        return out

    def _dynamic_now(self, phase: str, args: tuple, kwargs: dict) -> bool:
        """Whether this call's batch and sequence are marked dynamic. config.dynamic None (automatic,
        as torch.compile's default): a phase's first shape compiles a static graph, which keeps
        serving that shape (2-3x faster to compile, and all a fixed-shape job needs); every other
        shape is marked, so that one dynamic graph serves all of them."""
        dynamic = self.session.config.dynamic
        if dynamic is not None:
            return dynamic
        shape = _batch_shape(args, kwargs)
        return self._first_shape.setdefault(phase, shape) != shape

    # ---- generation ----
    def generate(self, *args, **kwargs):
        """Hugging Face's `generate`, every forward through the pass: the prefill selects, the
        decode steps reuse its selection. Takes what `model.generate` takes; the KV cache is a
        static one (made here unless a static, empty one is passed)."""
        _check_transformers()
        model = self.model
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("generate() on a ppcompile model takes input_ids (batch, prompt length), e.g. "
                             "model.generate(**tokenizer(prompts, return_tensors='pt', padding=True))")
        check_call((ids,), {k: v for k, v in kwargs.items() if k != "input_ids"})
        batch, prompt = ids.shape
        new = _new_tokens(model, prompt, kwargs)
        impl = kwargs.pop("cache_implementation", None)
        if impl not in (None, "static"):
            raise ValueError(f"cache_implementation={impl!r}: ppcompile generates with a static KV cache (every "
                             "decode step one graph); leave it unset or pass 'static'")
        cache = _given_cache(kwargs)
        need = prompt + new
        if cache is None:
            cache = self._new_cache(batch, need)
        else:
            _check_cache(cache, need)
        kwargs["cache"] = cache
        kwargs["disable_compile"] = True  # Hugging Face's own compile of the forward would bypass the pass
        calls = 0

        def routed(*a, **k):
            nonlocal calls
            calls += 1
            return self.call("prefill" if calls == 1 else "decode", a, k, user=False)

        had_own = "forward" in model.__dict__
        own = model.__dict__.get("forward")
        model.forward = routed
        try:
            return type(model).generate(model, *args, **kwargs)  # the class's: model.generate may be this
        finally:
            if had_own:
                model.forward = own
            else:
                del model.forward

    def _new_cache(self, batch: int, tokens: int):
        from transformers import StaticCache
        model, bucket = self.model, self.session.config.cache_bucket
        length = math.ceil(tokens / bucket) * bucket
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and tokens > limit:
            raise ValueError(f"the prompt and the new tokens ({tokens}) exceed the model's max_position_embeddings "
                             f"({limit}): shorten the prompt or ask for fewer new tokens")
        if limit is not None:
            length = min(length, max(limit, tokens))
        return StaticCache(config=model.config, max_cache_len=length)


def _cache_of(kwargs: dict):
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def _check_transformers() -> None:
    import transformers
    from packaging.version import Version
    if Version(transformers.__version__) < Version(GENERATE_NEEDS):
        raise RuntimeError(f"generate() through ppcompile needs transformers >= {GENERATE_NEEDS}, this is "
                           f"{transformers.__version__} (vLLM's CPU build pins < 5.20: generate through vLLM there, "
                           "or install ppcompile without the vllm extra)")


def _given_cache(kwargs: dict):
    given = [c for c in (kwargs.pop(k, None) for k in CACHE_KWARGS) if c is not None]
    return given[0] if given else None


def _is_static(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(getattr(layer, "max_cache_len", None) for layer in layers) \
        and getattr(cache, "is_compileable", False)


def _cached_tokens(cache) -> int:
    return int(cache.get_seq_length())


def _phase_of(cache) -> str:
    """forward without a cache (or with an empty dynamic one); prefill into an empty static cache;
    decode once the static cache holds tokens."""
    if cache is None:
        return "forward"
    held = _cached_tokens(cache)
    if not _is_static(cache):
        if held == 0:
            return "forward"
        raise ValueError(f"a {type(cache).__name__} that holds tokens: ppcompile decodes with a static KV cache "
                         "(every step one graph, the prefill's selection reused); pass "
                         "cache=transformers.StaticCache(config=model.config, max_cache_len=...) or use generate()")
    return "decode" if held else "prefill"


def _check_cache(cache, need: int) -> None:
    if not _is_static(cache):
        raise ValueError(f"generate() got a {type(cache).__name__}: ppcompile generates with a static KV cache; "
                         "pass none (one is made) or a transformers.StaticCache")
    if _cached_tokens(cache):
        raise ValueError("generate() got a cache that already holds tokens: ppcompile's prefill selects from the "
                         "whole prompt; pass an empty cache (cache.reset()) and the whole prompt")
    length = min(layer.max_cache_len for layer in cache.layers)
    if length < need:
        raise ValueError(f"the static cache holds {length} tokens, the prompt and the new tokens need {need}: "
                         "pass a larger cache, or none (one is made)")


def _new_tokens(model, prompt: int, kwargs: dict) -> int:
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        new = kwargs.get("max_length", config.max_length) - prompt
    if new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={new} for a prompt of {prompt} tokens; pass "
                         "max_new_tokens=N")
    return new


def _batch_shape(args, kwargs) -> tuple:
    """The call's (batch, sequence): the first two dims of its first (batch, sequence) input."""
    first = args[0] if args and isinstance(args[0], torch.Tensor) else next(
        (kwargs[k] for k in BATCH_BY_SEQUENCE if isinstance(kwargs.get(k), torch.Tensor)), None)
    return tuple(first.shape[:2]) if first is not None else ()


def _mark_dynamic(args, kwargs):
    """The call's (batch, sequence) inputs with both dims marked dynamic: on aliases (detach: no
    copy), so that the caller's tensors stay unmarked for other compiled models. A 4-d mask
    (B, 1, L, K), as generate passes, has its sequence in dim 2."""
    def marked(t):
        t = t.detach()
        for d in ((0, 2) if t.dim() == 4 else range(min(2, t.dim()))):
            torch._dynamo.maybe_mark_dynamic(t, d)  # "maybe": a size-1 dim stays specialized
        return t

    if args and isinstance(args[0], torch.Tensor):
        args = (marked(args[0]),) + tuple(args[1:])

    def mark(k, v):
        if k not in BATCH_BY_SEQUENCE:
            return v
        if isinstance(v, dict):  # one mask per kind of layer (full / sliding attention)
            return {name: marked(m) if isinstance(m, torch.Tensor) else m for name, m in v.items()}
        return marked(v) if isinstance(v, torch.Tensor) else v

    kwargs = {k: mark(k, v) for k, v in kwargs.items()}
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


def timed_generate(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, new: int,
                   warm: bool = False, **kwargs) -> tuple[torch.Tensor, float, float]:
    """(sequences, prefill seconds, decode seconds per step): greedy `generate` of exactly `new`
    tokens, timed by a streamer that stamps each new token (the prefill ends at the first).
    `warm`: the call is a measurement after a warm-up; a graph compiled inside it (its time would
    be in the figures) is an error, by Dynamo's own count of the graphs it compiled (any compiled
    model, pp's or plain torch.compile's). Warm up with as many new tokens as are timed: a sliding
    cache's decode recompiles on its second step (automatic dynamic)."""
    graphs = _graphs_compiled()
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):  # the first put is the prompt
            self.calls += 1
            if self.calls > 1:
                if ids.device.type == "cuda":
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         streamer=stamps, **kwargs)
    step = (stamps.times[-1] - stamps.times[0]) / (new - 1) if new > 1 else float("nan")
    if warm and _graphs_compiled() > graphs:
        raise RuntimeError(f"{_graphs_compiled() - graphs} graph(s) compiled inside a timed generate() of {new} "
                           "tokens: its timings would include the compile; warm up with as many new tokens first")
    return out, stamps.times[0] - start, step


def _graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (its own counter, as torch._dynamo.utils keeps it)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

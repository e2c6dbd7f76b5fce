"""ppcompile as a vLLM general plugin (entry point `vllm.general_plugins`), which vLLM loads in
each of its processes (the API server or LLM's, the engine core, every worker).

With $PPCOMPILE_VLLM unset it does nothing: installing ppcompile leaves vLLM as it was. Set
(engine_args() sets it, the processes vLLM spawns inherit it), the plugin
- keeps the weights of the linears outside attention and runs them as F.linear: vLLM's CPU build
  otherwise swaps every linear for an opaque oneDNN op on a packed copy and frees the weight,
  which leaves the pass nothing to select from. Attention's projections keep vLLM's GEMM (its
  attention op is opaque: those blocks stay dense, and are reported so);
- turns vLLM's AOT-compiled artifact off (VLLM_USE_AOT_COMPILE=0) unless the user set it: that
  path needs a serializable compiled function, which a backend holding state between steps is not.
"""
from __future__ import annotations

import json
import os
import warnings

from .backend import SESSION_OPTIONS
from .config import PPConfig
from .vllm_backend import OPTIONS_ENV, PLAIN_MARK, QUALNAME, options_from_env, plain_linears

# vLLM's DYNAMO_TRACE_ONCE (2): the backbone traced once, by the backend named (vllm_backend.py);
# the CPU platform keeps a user's mode 2 and backend (it rewrites only its default mode, 3). Custom
# ops off, as the CPU platform sets them for its own compile: norms and activations as torch ops.
COMPILATION_CONFIG = {"mode": 2, "backend": QUALNAME, "custom_ops": ["none"]}


def engine_args(ratio: float = 0.4, **options) -> dict:
    """What vllm.LLM(...) needs to run pruned: `LLM(model, **engine_args(ratio=0.4), ...)`.
    Checks the options here (a typo fails in the caller, not in a worker), stores them in
    $PPCOMPILE_VLLM for vLLM's processes, and returns the compilation_config that names the
    backend. For a server: set $PPCOMPILE_VLLM yourself and pass --compilation-config (vllm_server.py)."""
    options = {"ratio": ratio, **options}
    PPConfig.from_options({k: v for k, v in options.items() if k not in SESSION_OPTIONS})
    os.environ[OPTIONS_ENV] = json.dumps(options)
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return {"compilation_config": dict(COMPILATION_CONFIG)}


def register() -> None:
    """vLLM's plugin hook: in every process, before any model is built."""
    if options_from_env() is None:
        return
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    _keep_plain_linears()
    _require_compiled()


def in_attention(prefix: str) -> bool:
    """A linear of an attention module, by its path ("model.layers.0.self_attn.qkv_proj")."""
    return any("attn" in part or "attention" in part for part in prefix.split("."))


def _keep_plain_linears() -> None:
    import torch.nn.functional as F
    from vllm.model_executor.layers import utils
    if plain_linears():
        return
    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer, remove_weight: bool) -> None:
        if layer.weight.ndim != 2 or layer.weight.is_meta or in_attention(getattr(layer, "prefix", "")):
            return original(layer, remove_weight)
        layer.cpu_linear = F.linear  # the weight stays a Parameter: the graph reads it

    setattr(dispatch, PLAIN_MARK, True)
    utils.dispatch_cpu_unquantized_gemm = dispatch  # linear.py imports it at call time


def _require_compiled() -> None:
    """When vLLM loads the model, its compilation must go through ppcompile's backend: a worker
    whose vLLM runs the model eagerly (enforce_eager, another mode or backend) would serve every
    step unpruned. It warns then, or raises under strict."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    original = CPUModelRunner.load_model
    if getattr(original, "ppcompile", False):
        return

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        cc = self.vllm_config.compilation_config
        if int(cc.mode) == COMPILATION_CONFIG["mode"] and cc.backend == QUALNAME:
            return
        message = (f"ppcompile: vLLM runs this model without ppcompile's backend (compilation mode {int(cc.mode)}, "
                   f"backend {cc.backend!r}), so every step runs unpruned; pass **engine_args(...) to LLM, or "
                   f"--compilation-config '{json.dumps(COMPILATION_CONFIG)}' to the server, and no enforce_eager")
        if (options_from_env() or {}).get("strict", False):
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=2)

    load_model.ppcompile = True
    CPUModelRunner.load_model = load_model

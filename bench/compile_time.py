"""Where a compile's time goes, from Dynamo's and Inductor's own timers
(`torch._dynamo.utils.compilation_time_metrics`, what `compile_times()` prints), and a cold
versus a warm compile: the first in an empty Inductor cache folder of its own, the second in the
same folder once the process has forgotten the first (`forget_in_memory`), when Inductor's FX
graph and AOT autograd caches hold its graphs, as a second process finds them on disk
(tests/test_cache.py asserts that it does)."""
from __future__ import annotations

import contextlib
import tempfile

import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch._inductor.utils import clear_caches

# (phase, the timer it is read from, the timers inside it that belong to a later phase): each
# phase's seconds are its timer's minus those, so the phases add up to the total. (Inductor's
# compile_file timer is left out: its kernels compile on worker threads, beside other phases.)
PHASES = [
    ("dynamo", "_compile.compile_inner", ["OutputGraph.call_user_compiler"]),  # tracing, guards
    ("pass", "ppcompile_pass", []),  # the rewrite (backend.Session)
    ("aot", "create_aot_dispatcher_function", ["compile_fx_inner"]),  # functionalize, joint-graph passes
    ("lowering", "compile_fx_inner", ["Scheduler.codegen", "async_compile.wait"]),  # post-grad, lowering, scheduling
    ("codegen", "Scheduler.codegen", []),  # the kernels' code, and the kernels compiled while it runs
    ("kernel_wait", "async_compile.wait", []),  # waiting on the kernels still compiling
]
TOTAL = "_compile.compile_inner"


def snapshot() -> dict[str, float]:
    """Seconds per timer so far in this process."""
    return {k: sum(v) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}


def phases_since(before: dict[str, float]) -> dict[str, float]:
    """Seconds per phase (PHASES) since `before`, with "total" (Dynamo's whole compile, backend
    included) and "other" (what no phase's timer covers: the backend's own work around Inductor)."""
    now = snapshot()

    def spent(timer: str) -> float:
        return now.get(timer, 0.0) - before.get(timer, 0.0)

    out = {name: spent(timer) - sum(spent(t) for t in inner) for name, timer, inner in PHASES}
    out["total"] = spent(TOTAL)
    out["other"] = out["total"] - sum(out[name] for name, _, _ in PHASES)
    return out


class OwnCaches:
    """While open, one new, empty Inductor cache folder per method (`use(key)`: torch's own
    `temporary_cache_dir`, which also empties the in-memory caches on the way in and out): each
    method's first compile is cold, finding nothing of another method's (dense's kernels would
    otherwise serve pp's unpruned parts), and its second, in the same folder, is warm."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._folders: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def use(self, key):
        if key not in self._folders:
            self._folders[key] = self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="ppcompile-bench-inductor-"))
        return temporary_cache_dir(self._folders[key])


def forget_in_memory() -> None:
    """Drop what this process holds in memory of compiled graphs and kernels (torch._dynamo.reset()
    and Inductor's clear_caches()): the next compile is warm only through the on-disk caches, as a
    second process's would be."""
    torch._dynamo.reset()
    clear_caches()

"""Where a compile's time goes, from Dynamo's and Inductor's own timers
(`torch._dynamo.utils.calculate_time_spent`, the phases `compile_times()` reports), and a cold
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

# Dynamo's compile phases (torch._dynamo.utils.calculate_time_spent: each counted once, where the
# per-timer lists of compilation_time_metrics count a nested call again, as Inductor's codegen of
# an outlined subgraph inside the graph's), and the pass's own timer (backend.Session).
def snapshot() -> dict[str, float]:
    """Seconds per phase so far in this process."""
    out = dict(torch._dynamo.utils.calculate_time_spent())
    out["ppcompile_pass"] = sum(torch._dynamo.utils.compilation_time_metrics.get("ppcompile_pass", []))
    return out


# (phase, what it is read from, what inside that belongs to a later phase): the phases add up to
# the total, Dynamo's whole compile of the frame
PHASES = [
    ("dynamo", "entire_frame_compile", ["backend_compile"]),  # tracing, guards
    ("pass", "ppcompile_pass", []),  # the rewrite
    ("aot", "backend_compile", ["ppcompile_pass", "inductor_compile"]),  # functionalize, partition, joint passes
    ("lowering", "inductor_compile", ["code_gen"]),  # post-grad passes, lowering, scheduling
    ("codegen", "code_gen", ["async_compile.wait"]),  # the kernels' and the wrapper's code
    ("kernel_wait", "async_compile.wait", []),  # waiting on the kernels' C++ (or Triton) compile
]
TOTAL = "entire_frame_compile"


def phases_since(before: dict[str, float]) -> dict[str, float]:
    """Seconds per phase (PHASES) since `before`, with "total" (Dynamo's whole compile, backend
    included)."""
    now = snapshot()

    def spent(key: str) -> float:
        return now.get(key, 0.0) - before.get(key, 0.0)

    out = {name: spent(key) - sum(spent(k) for k in inner) for name, key, inner in PHASES}
    out["total"] = spent(TOTAL)
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

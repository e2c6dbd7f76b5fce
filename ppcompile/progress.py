"""One line on stderr when a compile the user waits on starts, and one with its time when it ends.

Off with quiet=True (pp.compile, the backend's options) or PPCOMPILE_QUIET=1 in the environment.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager


def enabled(quiet: bool = False) -> bool:
    return not quiet and os.environ.get("PPCOMPILE_QUIET", "") in ("", "0")


@contextmanager
def compiling(what: str, quiet: bool = False):
    """Around a compile of `what` (a graph, its phase and shape)."""
    if not enabled(quiet):
        yield
        return
    print(f"[ppcompile] compiling {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[ppcompile] compiled {what} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

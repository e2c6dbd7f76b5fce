"""Inductor's caches for the pass's graphs: a second process that compiles the same model with the
same config loads the compiled code instead of compiling it again.

Inductor's FX graph cache and AOT autograd cache are on by default (under $TORCHINDUCTOR_CACHE_DIR,
by default /tmp/torchinductor_<user>). The AOT autograd cache refuses a graph that calls a plain
Python function (torch/_functorch/_aot_autograd/autograd_cache.py, `is_cacheable_function`), and the
rewritten graphs call ppcompile's own tensor functions (ops.ema_rows, the probe designs' token
choices, ...): every new process then traced, partitioned and ran the joint-graph passes again.
`cacheable()` marks every function of ppcompile's modules cacheable, tagged with the hash of
ppcompile's source: the tag enters both caches' keys (through Inductor's config), so a changed
ppcompile misses instead of loading stale code. A user's own function in a graph (a policy or probe
design of their own) is not marked: such a graph bypasses the AOT cache, as torch decides.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from pathlib import Path

import torch


@functools.cache
def source_tag() -> str:
    """The hash of every source file of the package: what a cached graph was compiled by."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"ppcompile-{digest.hexdigest()[:16]}"


def _package_functions() -> dict[str, str]:
    """'<module>.<function>' -> source_tag() for every function defined in a loaded ppcompile module."""
    out = {}
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "ppcompile" or name.startswith("ppcompile.")):
            for fn in vars(module).values():
                if inspect.isfunction(fn) and fn.__module__ == name:
                    out[f"{name}.{fn.__name__}"] = source_tag()
    return out


def cacheable():
    """A context in which Inductor may cache graphs that call ppcompile's functions (see above)."""
    marked = torch._inductor.config.unsafe_marked_cacheable_functions
    return torch._inductor.config.patch(unsafe_marked_cacheable_functions={**marked, **_package_functions()})

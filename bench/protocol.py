"""What the benches share: the quality protocol's arguments (the text, the calibration windows,
the window length and the batches); how a method is named (`label`, read back by `parse_label`,
which also reads the spellings of earlier runs' JSON files); the provenance every JSON row records
(the policy and the PPConfig fields it ran with, the probe design, the dtype, torch and
transformers, the CPU); and the sessions of the methods `build_method` makes, so that a bench can
check that what it measured ran pruned (ppcompile.guard)."""
from __future__ import annotations

import argparse
import contextlib
import platform
import re
from functools import lru_cache
from pathlib import Path

import torch
import transformers

from ppcompile import methods
from ppcompile.backend import Session
from ppcompile.config import PPConfig
from ppcompile.guard import assert_pruned, session_of
from ppcompile.policies import POLICIES

# the policies whose choices depend on the calibration sample (its history is seeded, or its
# kept units are chosen from it): what a bench calibrates, and runs once per calibration seed
CALIBRATED = {name for name, p in POLICIES.items() if p.history or p.needs_calibration}


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="brown:a")
    p.add_argument("--calibration", default="brown:fgh")
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)


# ---- method labels ----
# One name per method, in every bench's rows, tables and messages: ppcompile.methods.label,
# POLICY[@RATIO][ FIELD=VALUE ...] ("pp", "pp@0", "pp probe=paper", "pp backend=eager",
# "pp@0.2 shards=3"); the fields are pp.compile options.
label = methods.label
# How earlier runs' JSON files in bench/results/ spell some methods (read, never written now):
# speed.py's variants of pp, and shards.py's RATIO/SHARDS of pp
_OLD_SPELLINGS = {"pp-eager": "pp backend=eager", "pp-static": "pp dynamic=false"}
_OLD_SHARDS = re.compile(r"(\d*\.?\d+)/(\d+)")


def parse_label(text: str, ratio: float | None = None) -> tuple[str, float | None, dict]:
    """(policy, ratio, pp.compile options) of a method's label (see ppcompile.methods.parse_label:
    the ratio is the label's own, 0.0 for dense, else `ratio`), old spellings included."""
    old = _OLD_SHARDS.fullmatch(text)
    text = label("pp", float(old[1]), shards=int(old[2])) if old else _OLD_SPELLINGS.get(text, text)
    return methods.parse_label(text, ratio)


def canonical(text: str) -> str:
    """A label as `label` writes it now: 'pp-eager' -> 'pp backend=eager'; a label made by
    `label` is unchanged."""
    policy, ratio, options = parse_label(text)
    return label(policy, ratio, **options)


# ---- provenance ----
@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16() -> str:
    """What runs the CPU's bf16 matmuls, by torch's own detection: "AMX" (tiles), "AVX-512 BF16"
    (dot products only: slower matmuls, so pp's own work weighs less), or "none". Two CPUs of one
    model name can differ in it."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() else "none"


def provenance(compiled=None, *, dtype, config: PPConfig | None = None) -> dict:
    """What a row was measured with: `compiled` (what pp.compile returned, or its Session) or
    `config`; neither: the model unpruned (dense, plain or through torch.compile). `options` are
    the PPConfig fields besides policy and probe that differ from the defaults (`backend`: how
    the rewritten graph ran, where a session is known); `probe` is the design the policy's probe
    ran ("all": the whole batch; None: no probe); `graph`, static or dynamic, the graph it compiled
    last (pp.compile's default compiles the first shape static since dynamic=None)."""
    session = session_of(compiled) if compiled is not None else None
    config = session.config if session is not None else config
    out = {"policy": "dense", "probe": None, "options": {}} if config is None else {
        "policy": config.policy.name,
        "probe": getattr(config.policy.design(config.probe), "name", None),
        "options": _changed(config)}
    if session is not None:
        out["backend"] = "inductor" if session.inductor else "eager"
        if session.passes:  # the last graph compiled: the one the row's calls ran
            out["graph"] = "dynamic" if session.passes[-1].dynamic else "static"
    out.update(dtype=dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."),
               torch=torch.__version__, transformers=transformers.__version__, cpu=cpu_model(),
               cpu_bf16=cpu_bf16(), threads=torch.get_num_threads())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _changed(config: PPConfig) -> dict:
    """The PPConfig fields besides the policy and probe that differ from the defaults."""
    default = PPConfig().as_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.as_dict().items()
            if default[k] != v and k not in ("policy", "probe")}


# ---- the sessions of methods made by name ----
class Methods:
    """The ppcompile session of every method `build_method` made while recorded, by label (a
    method built without one, such as dense run eagerly, has none): build_method returns a logits
    function, and the session is what pp.compile leaves on the model (`model.pp`)."""

    def __init__(self):
        self.sessions: dict[str, Session] = {}

    def build(self, label: str, build, name: str, model, *args, **kwargs):
        """`build(name, model, *args, **kwargs)`, recording the session it made under `label`."""
        before = model.__dict__.get("pp")
        fn = build(name, model, *args, **kwargs)
        made = model.__dict__.get("pp")
        if made is not before and isinstance(made, Session):
            self.sessions[label] = made
        return fn

    @contextlib.contextmanager
    def recording(self, module, name_of=label):
        """While open, every `module.build_method(name, model, ratio, ...)` call is recorded under
        `name_of(name, ratio)`, by default its label (for code that builds its methods itself, e.g.
        ppcompile.workloads.run_eval, which names them so too)."""
        original = module.build_method

        def build_method(name, model, ratio, *args, **kwargs):
            return self.build(name_of(name, ratio), original, name, model, ratio, *args, **kwargs)

        module.build_method = build_method
        try:
            yield self
        finally:
            module.build_method = original

    def check(self) -> None:
        """assert_pruned on every recorded method (after its measured calls), named by its label
        and the PPConfig fields it changed."""
        for label, session in self.sessions.items():
            assert_pruned(session, method=f"{label} {_changed(session.config)}")


    def provenance(self, label: str, *, dtype) -> dict:
        return provenance(self.sessions.get(label), dtype=dtype)

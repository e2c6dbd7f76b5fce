"""Calibration: dense passes over calibration text that record, for every block, statistics of
its final projection's input x (o_proj / down_proj / fc2).

Per site: the mean of x^2 per absolute position and channel (the history Probe Pruning starts
from), and per channel the exact mean and variance of x over all real tokens (what Wanda-sp and
FLAP score with). The statistics depend on the model and the text only, not on a PPConfig, so one
calibration serves every ratio and policy; it is keyed to the model by a weight fingerprint.
"""
from __future__ import annotations

import hashlib
import inspect
import pickle
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .evaluate import log_progress, unpack_batch
from .inputs import check_batches
from .passes.collect_stats import run_stats_pass
from .passes.graph import real_tensors
from .passes.seam import CALIBRATION_STATS, Slot, parse
from .torch_compat import compile_isolated

FORMAT = "ppcompile.calibration/1"
NO_BATCHES = "calibration got no batches: pass a list of at least one token batch (B, L)"


def weight_fingerprint(t: torch.Tensor) -> str:
    """A short hash of one weight: shape, dtype and a sample of its values."""
    flat = t.detach().flatten()
    sample = flat[:: max(1, flat.numel() // 64)][:64]
    h = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(sample.cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class, parameter names and shapes, and a sample of every weight:
    equal for the same weights, different for another model, another checkpoint or another dtype."""
    model = getattr(model, "_orig_mod", model)
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):  # its sample could not be read: torch's NotImplementedError
        raise ValueError("the model's weights are on the meta device (not loaded): load real weights (e.g. "
                         "from_pretrained without device_map='meta' / init_empty_weights) before pp.compile")
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in state.items():
        flat = t.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


class Calibration:
    def __init__(self, model_fingerprint: str, meta: dict | None = None):
        self.fingerprint = model_fingerprint
        self.meta = dict(meta or {})  # provenance (text, windows, sequence length), for the record
        self.stats: dict[str, dict[str, torch.Tensor]] = {}  # site -> {sq, count, total, total_sq}
        self.batches = 0
        self.weights: dict[str, str] = {}  # site -> fingerprint of its final projection's weight

    # ---- collection ----
    def provide(self, slot: Slot, rows: int, device) -> torch.Tensor:
        """The table a stats slot ("<stat>/<site>") names (rows [0, rows) of a per-position one),
        created or grown (new rows zero) as needed."""
        stat, site, _ = parse(slot.name)
        tables = self.stats.setdefault(site, {})
        t = tables.get(stat)
        if t is None or (slot.per_position and t.shape[0] < rows):
            grown = slot.new(rows, device)
            if t is not None:
                grown[: t.shape[0]] = t
            tables[stat] = t = grown
        return t[:rows] if slot.per_position else t

    # ---- what the policies read ----
    def _site(self, site: str) -> dict[str, torch.Tensor]:
        if site not in self.stats:
            raise ValueError(f"the calibration has no statistics for {site}; it has {len(self.stats)} "
                             "sites: recompute it for this model with pp.calibrate(model, batches)")
        return self.stats[site]

    def history(self, site: str) -> torch.Tensor:
        """(L, C) mean of x^2 per position over the calibration tokens at that position."""
        s = self._site(site)
        return (s["sq"] / s["count"].clamp(min=1).unsqueeze(-1)).float()

    def histories(self) -> dict[str, torch.Tensor]:
        """Every site's history: what Probe Pruning's runtime is seeded with."""
        return {site: self.history(site) for site in self.stats}

    def energy(self, site: str) -> torch.Tensor:
        """(C,) S_j: the sum over positions of the mean of x^2."""
        return self.history(site).double().sum(0)

    def mean(self, site: str) -> torch.Tensor:
        """(C,) mu_j: the exact mean of x over all calibration tokens (float64)."""
        s = self._site(site)
        return s["total"] / s["count"].double().sum().clamp(min=1)

    def variance(self, site: str) -> torch.Tensor:
        """(C,) V_j: the variance of x around its mean (float64)."""
        s = self._site(site)
        n = s["count"].double().sum().clamp(min=1)
        return (s["total_sq"] / n - self.mean(site).pow(2)).clamp(min=0)

    def check_weights(self, weights: dict[str, torch.Tensor | None]) -> None:
        """Refuse a calibration whose sites saw other final-projection weights than `weights`
        (site -> the weight a compiled graph holds): the check a graph can make without the model."""
        for site, w in weights.items():
            theirs = self.weights.get(site)
            if theirs is not None and w is not None and weight_fingerprint(w) != theirs:
                raise ValueError(f"this calibration was computed on another model: the weights of {site} "
                                 "differ (other weights, shapes or dtype); recompute it with "
                                 "pp.calibrate(model, batches) on this model")

    def check(self, model_fingerprint: str) -> None:
        if model_fingerprint != self.fingerprint:
            raise ValueError(f"this calibration was computed on another model (fingerprint {self.fingerprint}, "
                             f"this model {model_fingerprint}: other weights, shapes or dtype); recompute "
                             "it with pp.calibrate(model, batches)")

    # ---- persistence ----
    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "meta": self.meta,
                    "batches": self.batches, "weights": self.weights,
                    "stats": {k: {n: t.cpu() for n, t in v.items()} for k, v in self.stats.items()}}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no calibration at {path}: compute one with pp.calibrate(model, batches) "
                                    "and .save(path)")
        if path.is_dir():
            raise ValueError(f"{path} is not a ppcompile calibration (a folder): pass the file .save(path) wrote")
        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
                warnings.simplefilter("ignore")
                state = torch.load(path, weights_only=True)
        except _UNREADABLE as e:  # what torch's unpickler raises on bytes it cannot read
            raise ValueError(f"{path} is not a ppcompile calibration (torch.load cannot read it: "
                             f"{type(e).__name__}): pass a file written by Calibration.save") from None
        problem = _state_problem(state)
        if problem:
            raise ValueError(f"{path} is not a ppcompile calibration ({problem}): pass a file written by "
                             "Calibration.save, or recompute it with pp.calibrate(model, batches)")
        cal = cls(state["fingerprint"], state["meta"])
        cal.stats, cal.batches, cal.weights = state["stats"], state["batches"], state.get("weights", {})
        return cal


# torch.load on garbage: a bad zip (RuntimeError), a truncated or empty file (EOFError), a pickle
# with globals weights_only refuses (UnpicklingError), random bytes (IndexError, KeyError, ...)
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, LookupError, TypeError,
               AttributeError, struct.error, OverflowError)


def _state_problem(state) -> str | None:
    """What makes a loaded object something other than a saved calibration, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    if state.get("format") != FORMAT:
        return f"format {state.get('format')!r}, expected {FORMAT!r}"
    types = {"fingerprint": str, "meta": dict, "batches": int, "stats": dict}
    wrong = [k for k, t in types.items() if not isinstance(state.get(k), t)]
    if wrong:
        return f"missing or malformed {', '.join(wrong)}"
    for site, tables in state["stats"].items():
        if not isinstance(tables, dict) or set(tables) != set(CALIBRATION_STATS) or \
                not all(isinstance(t, torch.Tensor) for t in tables.values()):
            return f"malformed statistics of {site}"
    return None


def collect(model: torch.nn.Module, batches: Iterable, *, meta: dict | None = None,
            progress: bool = False) -> Calibration:
    """Run dense forward passes over `batches` (token tensors (B, L), or dicts with `input_ids` and
    optionally `attention_mask`) and return their statistics."""
    check_batches(batches)
    if isinstance(batches, Sequence):  # a list is checked whole, before the first (compiling) pass
        if not batches:
            raise ValueError(NO_BATCHES)
        for i, batch in enumerate(batches):
            unpack_batch(batch, i, "calibration batch")
    base = getattr(model, "_orig_mod", model)
    cal = Calibration(fingerprint(base), meta)
    passes = []  # the graphs Dynamo handed over: none means the model ran uncompiled

    def backend(gm, example_inputs):
        r = run_stats_pass(gm)
        passes.append(r)
        real = real_tensors(gm, example_inputs)
        cal.weights.update({site.name: weight_fingerprint(w) for site in r.sites
                            if (w := real(site.final.args[1])) is not None})

        def run(*args):
            return r.seam.call(r.gm.forward, args, cal.provide)[0]

        return run

    # Batch and sequence dynamic, as in pp.compile: one graph for batches of any shape (batch >= 2).
    compiled = compile_isolated(base, backend=backend, dynamic=False)
    takes_cache = "use_cache" in inspect.signature(base.forward).parameters
    with torch.no_grad():
        for i, batch in enumerate(batches):
            ids, mask = unpack_batch(batch, i, "calibration batch")
            kwargs = {"attention_mask": mask} if mask is not None else {}
            for t in (ids, mask) if mask is not None else (ids,):
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
            if takes_cache:
                kwargs["use_cache"] = False
            compiled(input_ids=ids, **kwargs)
            cal.batches += 1
            log_progress(progress, f"calibration batch {i + 1}")
    if cal.batches == 0:
        raise ValueError(NO_BATCHES)
    if not passes:
        raise RuntimeError("Dynamo never handed the model's graph to the calibration pass; most likely it hit "
                           "torch._dynamo.config.recompile_limit after many compiles of this forward in one process: "
                           "call torch._dynamo.reset() first (or raise the limit)")
    if not cal.stats:
        raise ValueError("calibration found no attention or MLP block to record in this model")
    return cal


def resolve(calibration, model: torch.nn.Module | None = None) -> Calibration:
    """A Calibration from what a user may pass: a Calibration, the path of a saved one, or token
    batches to calibrate `model` on now; checked against the model when there is one (without
    one, each compiled graph checks the weights it meets: Calibration.check_weights)."""
    if isinstance(calibration, (str, Path)):
        calibration = Calibration.load(calibration)
    elif not isinstance(calibration, Calibration):
        if model is None:
            raise ValueError("calibration batches need the model to run on: pass a Calibration from "
                             "pp.calibrate(model, batches), or the path of a saved one")
        calibration = collect(model, calibration)
    if model is not None:
        calibration.check(fingerprint(model))
    return calibration

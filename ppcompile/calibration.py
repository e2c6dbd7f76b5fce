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
from pathlib import Path
from typing import Iterable

import torch

from .evaluate import log_progress, unpack_batch
from .passes.collect_stats import run_stats_pass
from .passes.graph import input_device

FORMAT = "ppcompile.calibration/1"


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class, parameter names and shapes, and a sample of every weight:
    equal for the same weights, different for another model, another checkpoint or another dtype."""
    model = getattr(model, "_orig_mod", model)
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
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

    # ---- collection ----
    def tables(self, site: str, seq_len: int, channels: int, device) -> list[torch.Tensor]:
        """The four sums of a site (rows [0, seq_len) of the per-position ones), grown as needed."""
        s = self.stats.get(site)
        if s is None:
            s = self.stats[site] = {
                "sq": torch.zeros(0, channels, device=device), "count": torch.zeros(0, device=device),
                "total": torch.zeros(channels, dtype=torch.float64, device=device),
                "total_sq": torch.zeros(channels, dtype=torch.float64, device=device)}
        if s["sq"].shape[0] < seq_len:
            for key in ("sq", "count"):
                grown = s[key].new_zeros((seq_len,) + tuple(s[key].shape[1:]))
                grown[: s[key].shape[0]] = s[key]
                s[key] = grown
        return [s["sq"][:seq_len], s["count"][:seq_len], s["total"], s["total_sq"]]

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

    def check(self, model_fingerprint: str) -> None:
        if model_fingerprint != self.fingerprint:
            raise ValueError(f"this calibration was computed on another model (fingerprint {self.fingerprint}, "
                             f"this model {model_fingerprint}: other weights, shapes or dtype); recompute "
                             "it with pp.calibrate(model, batches)")

    # ---- persistence ----
    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "meta": self.meta,
                    "batches": self.batches,
                    "stats": {k: {n: t.cpu() for n, t in v.items()} for k, v in self.stats.items()}}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not a ppcompile calibration (expected format {FORMAT})")
        cal = cls(state["fingerprint"], state["meta"])
        cal.stats, cal.batches = state["stats"], state["batches"]
        return cal


def collect(model: torch.nn.Module, batches: Iterable, *, meta: dict | None = None,
            progress: bool = False) -> Calibration:
    """Run dense forward passes over `batches` (token tensors (B, L), or dicts with `input_ids` and
    optionally `attention_mask`) and return their statistics."""
    base = getattr(model, "_orig_mod", model)
    cal = Calibration(fingerprint(base), meta)
    passes = []  # the graphs Dynamo handed over: none means the model ran uncompiled

    def backend(gm, example_inputs):
        r = run_stats_pass(gm)
        passes.append(r)
        device = input_device(example_inputs)

        def run(*args):
            tables = [t for site, c in r.sites.items() for t in cal.tables(site, r.seq_len, c, device)]
            return r.gm.forward(*args, *tables)[: r.n_outputs]

        return run

    compiled = torch.compile(base, backend=backend, dynamic=False)
    takes_cache = "use_cache" in inspect.signature(base.forward).parameters
    with torch.no_grad():
        for i, batch in enumerate(batches):
            ids, mask = unpack_batch(batch)
            kwargs = {"attention_mask": mask} if mask is not None else {}
            if takes_cache:
                kwargs["use_cache"] = False
            compiled(input_ids=ids, **kwargs)
            cal.batches += 1
            log_progress(progress, f"calibration batch {i + 1}")
    if cal.batches == 0:
        raise ValueError("calibration got no batches")
    if not passes:
        raise RuntimeError("Dynamo never handed the model's graph to the calibration pass; most likely it hit "
                           "torch._dynamo.config.recompile_limit after many compiles of this forward in one process: "
                           "call torch._dynamo.reset() first (or raise the limit)")
    if not cal.stats:
        raise ValueError("calibration found no attention or MLP block to record in this model")
    return cal


def resolve(calibration, model: torch.nn.Module) -> Calibration:
    """A Calibration from what a user may pass: a Calibration, the path of a saved one, or token
    batches to calibrate `model` on now; checked against the model."""
    if isinstance(calibration, (str, Path)):
        calibration = Calibration.load(calibration)
    elif not isinstance(calibration, Calibration):
        calibration = collect(model, calibration)
    calibration.check(fingerprint(model))
    return calibration

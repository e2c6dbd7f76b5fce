"""The runtime: the state Probe Pruning carries between calls, as tensors, by slot name.

One runtime per compiled model, shared by all of its graphs: slots with a row per token position
(the histories, one per site: position x channel, mean of the final projection's input squared)
are one table each, grown to the longest sequence seen, and a graph of length L reads and updates
rows [0, L). Compiled graphs take the slots as inputs and update them in place; nothing here is a
Python counter the graph would specialize on.

A prefill (generation) writes its selection and the compact weights it gathered into `stored/...`
slots, in place; every decode graph of that generation reads them.

Telemetry keeps running aggregates per site (calls, kept-set overlaps, probe shares, how often each
unit was kept), so its memory does not grow with the number of calls.
"""
from __future__ import annotations

import torch

from .passes.seam import HISTORY, KEPT, SEEDED, SHARE, STEP, STORED, Slot, by_site, parse, slot_name


class Runtime:
    def __init__(self, key: dict | None = None, telemetry: bool = False):
        self.key = key  # what the state belongs to ({"model": fingerprint, "config": {...}}); checked on load
        self.telemetry = telemetry  # aggregate every call's selections for stats()
        self.sites: dict[str, dict] = {}  # site -> layer, kind, total units, pruned FLOPs fraction
        self.slots: dict[str, torch.Tensor] = {s.name: s.new(0, "cpu") for s in (STEP, SEEDED)}
        # calls of the compiled model that ran pruned / unpruned / dense by the cost rule (every block
        # of their graphs too small to pay, passes/cost.py: a choice, warned once), compiled graphs
        # run, pruned sites run
        self.counts = {"pruned_calls": 0, "unpruned_calls": 0, "dense_by_cost_calls": 0, "graph_runs": 0,
                       "site_runs": 0}
        self.cost_dense_site_runs = 0  # sites run dense by the cost rule (what tells such a call apart)
        self._last: dict[str, torch.Tensor] = {}
        self._agg: dict[str, dict[str, torch.Tensor | int]] = {}  # site -> running telemetry sums

    # ---- state slots ----
    @property
    def step(self) -> torch.Tensor:
        """Calls so far through a graph with a history; call 0 is the warm-up."""
        return self.slots[STEP.name]

    @property
    def seeded(self) -> torch.Tensor:
        """Whether the history holds real statistics (from calibration or served calls)."""
        return self.slots[SEEDED.name]

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """Site -> its history table (positions seen so far, channels)."""
        return by_site(self.slots, HISTORY)

    @property
    def stored_sites(self) -> frozenset[str]:
        """Sites whose selection a prefill stored (what a decode graph reuses)."""
        return frozenset(by_site(self.slots, STORED, "kept"))

    def provide(self, slot: Slot, rows: int, device) -> torch.Tensor:
        """The tensor of `slot` for a call (rows [0, rows) of a per-position one), on `device`;
        created with the slot's initial value, grown (new rows initial) as sequences grow."""
        t = self.slots.get(slot.name)
        if slot.required and t is None:
            raise ValueError(f"{slot.name}: a decode step ran before any prefill stored a selection; "
                             "start each generation with a prefill (generate() does)")
        if t is not None and tuple(t.shape[1 if slot.per_position else 0:]) != slot.shape:
            raise ValueError(f"state {slot.name} has shape {tuple(t.shape)}, the graph expects "
                             f"{slot.shape} per row: state from another model or config")
        if t is not None and t.device != torch.device(device):
            self.slots[slot.name] = t = t.to(device)
        if t is None or (slot.per_position and t.shape[0] < rows):
            grown = slot.new(rows, device)
            if t is not None:
                grown[: t.shape[0]] = t
            self.slots[slot.name] = t = grown
        return t[:rows] if slot.per_position else t

    def seed(self, histories: dict[str, torch.Tensor]) -> None:
        """Start from calibration: site -> (L, C) mean of x^2 per position; the history is seeded."""
        for site, h in histories.items():
            self._put(slot_name(HISTORY, site), h)
        self.seeded.fill_(True)

    def _put(self, name: str, value: torch.Tensor) -> None:
        cur = self.slots.get(name)
        if cur is not None and cur.shape == value.shape:
            cur.copy_(value)  # in place: compiled graphs may hold views of it
        elif cur is not None and cur.dim() == value.dim() == 2 and cur.shape[0] >= value.shape[0]:
            cur.zero_()[: value.shape[0]] = value
        else:
            self.slots[name] = value.to(cur.dtype if cur is not None else value.dtype).clone()

    # ---- what calls report ----
    def record(self, outputs: dict[str, torch.Tensor]) -> None:
        """After a call: its named extra outputs (kept/<site>, share/<site>). Selections stay on
        their device; telemetry aggregates on the device too, so recording never waits for it."""
        kept, shares = by_site(outputs, KEPT), by_site(outputs, SHARE)
        self._last.update(kept)
        if self.telemetry:
            for site, k in kept.items():
                self._aggregate(site, k, shares.get(site))

    def _aggregate(self, site: str, kept: torch.Tensor, share: torch.Tensor | None) -> None:
        a = self._agg.get(site)
        if a is None:
            total = self.sites.get(site, {}).get("total", int(kept.max()) + 1)
            zero = torch.zeros((), dtype=torch.float64, device=kept.device)
            a = self._agg[site] = {"calls": 0, "overlaps": 0, "shares": 0, "jaccard": zero.clone(),
                                   "share": zero.clone(), "counts": torch.zeros(total, device=kept.device),
                                   "prev": None}
        if a["prev"] is not None:
            a["jaccard"] += _jaccard_t(a["prev"], kept)
            a["overlaps"] += 1
        if share is not None:
            a["share"] += share.double()
            a["shares"] += 1
        a["counts"].index_add_(0, kept, torch.ones(len(kept), device=kept.device))
        a["prev"] = kept
        a["calls"] += 1

    def stats(self) -> list[dict]:
        """Per site over the recorded calls: kept/total, the mean Jaccard overlap of consecutive
        calls' kept sets, the probe's mean share of the fused energy (pp: the rest is history),
        and the fraction of the block's projection FLOPs pruned."""
        if not self.telemetry:
            raise ValueError("telemetry is off: compile with telemetry=True to record every call")
        rows = []
        for site, info in self.sites.items():
            a = self._agg.get(site)
            if a is None:
                continue
            rows.append({"site": site, **info, "calls": a["calls"], "kept": len(a["prev"]),
                         "jaccard": float(a["jaccard"]) / a["overlaps"] if a["overlaps"] else None,
                         "probe_share": float(a["share"]) / a["shares"] if a["shares"] else None})
        return rows

    def kept_frequency(self, site: str) -> torch.Tensor:
        """(units,) the fraction of recorded calls that kept each head or channel of `site`."""
        a = self._agg.get(site)
        if a is None:
            raise ValueError(f"no recorded call selected at {site}")
        return (a["counts"] / a["calls"]).cpu()

    def last_selection(self) -> dict[str, torch.Tensor]:
        """Site name -> kept head (attention) or channel (MLP) indices of the last call."""
        return dict(self._last)

    # ---- persistence ----
    def state_dict(self) -> dict:
        """The history tables (by slot name, "history/<site>"), step, seeded and the key."""
        state = {slot_name(HISTORY, k): v.clone() for k, v in self.tables.items()}
        state.update({STEP.name: self.step.clone(), SEEDED.name: self.seeded.clone(), "key": self.key})
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = {STEP.name, SEEDED.name} - set(state)
        if missing:
            raise ValueError(f"runtime state lacks {sorted(missing)}")
        theirs = state.get("key")
        if self.key is not None and theirs is not None and theirs != self.key:
            what = [k for k in self.key if self.key.get(k) != theirs.get(k)]
            raise ValueError(f"this runtime state belongs to another {' and '.join(what)} "
                             f"(saved {theirs}, here {self.key})")
        for site, t in _histories(state).items():
            cur = self.tables.get(site)
            if cur is not None and cur.shape[1] != t.shape[1]:
                raise ValueError(f"history of {site}: {t.shape[1]} channels in the state, "
                                 f"{cur.shape[1]} in the model")
            self._put(slot_name(HISTORY, site), t.float())
        self.step.copy_(state[STEP.name])
        self.seeded.copy_(state[SEEDED.name])

    def reset(self) -> None:
        self.slots = {n: t for n, t in self.slots.items() if parse(n)[0] != STORED}  # no prefill ran
        for t in self.slots.values():
            t.zero_()
        self._last.clear()
        self._agg.clear()


def _histories(state: dict) -> dict[str, torch.Tensor]:
    """Site -> history table of a saved state: "history/<site>" keys, or "history.<site>" as states
    saved by earlier versions spelled them."""
    old = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(HISTORY + ".")}
    return old | by_site(state, HISTORY)


def _jaccard_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = torch.isin(a, b).sum().double()
    return inter / (len(a) + len(b) - inter)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_jaccard_t(a.cpu(), b.cpu()))

"""The runtime: the state Probe Pruning carries between calls, as tensors.

History tables (one per site: absolute position x channel, mean of the final projection's input
squared), the call count and whether the history is seeded. Compiled graphs take them as inputs
and update them in place; nothing here is a Python counter the graph would specialize on.
"""
from __future__ import annotations

import torch


class Runtime:
    def __init__(self, key: dict | None = None, telemetry: bool = False):
        self.key = key  # what the state belongs to ({"model": fingerprint, "config": {...}}); checked on load
        self.telemetry = telemetry  # keep every call's selections for stats()
        self.calls: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []  # site -> (kept, probe share)
        self.sites: dict[str, dict] = {}  # site -> layer, kind, total units, pruned FLOPs fraction
        self.tables: dict[str, torch.Tensor] = {}
        self.step = torch.zeros((), dtype=torch.long)  # calls so far; call 0 is the warm-up
        self.seeded = torch.zeros((), dtype=torch.bool)  # the history holds real statistics
        self._last: dict[str, torch.Tensor] = {}

    def inputs(self, sites: dict[str, int], seq_len: int, device, with_step: bool) -> list[torch.Tensor]:
        """What a compiled graph takes after its own inputs: [seeded, step] and the history rows
        [0, seq_len) of each site (site -> channels), on the graph's device."""
        if self.step.device != torch.device(device):
            self.step, self.seeded = self.step.to(device), self.seeded.to(device)
        tables = [self.table(site, seq_len, channels, device) for site, channels in sites.items()]
        return ([self.seeded, self.step] if with_step else []) + tables

    def table(self, site: str, seq_len: int, channels: int, device="cpu") -> torch.Tensor:
        """The history rows [0, seq_len) of a site; a longer sequence grows the table (new rows 0)."""
        t = self.tables.get(site)
        if t is not None and t.shape[1] != channels:
            raise ValueError(f"history of {site} has {t.shape[1]} channels, the graph {channels}: "
                             "state from another model or config")
        if t is not None and t.device != torch.device(device):
            self.tables[site] = t = t.to(device)
        if t is None or t.shape[0] < seq_len:
            grown = torch.zeros(seq_len, channels, dtype=torch.float32, device=device)
            if t is not None:
                grown[: t.shape[0]] = t
            self.tables[site] = t = grown
        return t[:seq_len]

    def seed(self, histories: dict[str, torch.Tensor]) -> None:
        """Start from calibration: site -> (L, C) mean of x^2 per position; the history is seeded."""
        for site, h in histories.items():
            cur = self.tables.get(site)
            if cur is not None and cur.shape == h.shape:
                cur.copy_(h)  # in place: compiled graphs hold views of it
            else:
                self.tables[site] = h.float().clone()
        self.seeded.fill_(True)

    def record(self, selections: dict[str, torch.Tensor], shares: dict[str, torch.Tensor] | None = None) -> None:
        """After a call: its kept indices (and probe shares). Only references are kept here, so
        recording never waits for the device; stats() reads them later."""
        self._last.update(selections)
        if self.telemetry:
            self.calls.append({site: (kept, (shares or {}).get(site)) for site, kept in selections.items()})

    def stats(self) -> list[dict]:
        """Per site over the recorded calls: kept/total, the mean Jaccard overlap of consecutive
        calls' kept sets, the probe's mean share of the fused energy (pp: the rest is history),
        and the fraction of the block's projection FLOPs pruned."""
        if not self.telemetry:
            raise ValueError("telemetry is off: compile with telemetry=True to record every call")
        rows = []
        for site, info in self.sites.items():
            seq = [call[site] for call in self.calls if site in call]
            if not seq:
                continue
            kept = [k for k, _ in seq]
            overlaps = [_jaccard(a, b) for a, b in zip(kept, kept[1:])]
            shares = [float(s) for _, s in seq if s is not None]
            rows.append({"site": site, **info, "calls": len(seq), "kept": len(kept[-1]),
                         "jaccard": sum(overlaps) / len(overlaps) if overlaps else None,
                         "probe_share": sum(shares) / len(shares) if shares else None})
        return rows

    def kept_frequency(self, site: str) -> torch.Tensor:
        """(units,) the fraction of recorded calls that kept each head or channel of `site`."""
        seq = [call[site][0] for call in self.calls if site in call]
        if not seq:
            raise ValueError(f"no recorded call selected at {site}")
        counts = torch.zeros(self.sites[site]["total"])
        for kept in seq:
            counts[kept.cpu()] += 1
        return counts / len(seq)

    def last_selection(self) -> dict[str, torch.Tensor]:
        """Site name -> kept head (attention) or channel (MLP) indices of the last call."""
        return dict(self._last)

    def state_dict(self) -> dict:
        state = {f"history.{k}": v.clone() for k, v in self.tables.items()}
        state.update(step=self.step.clone(), seeded=self.seeded.clone(), key=self.key)
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = {"step", "seeded"} - set(state)
        if missing:
            raise ValueError(f"runtime state lacks {sorted(missing)}")
        theirs = state.get("key")
        if self.key is not None and theirs is not None and theirs != self.key:
            what = [k for k in self.key if self.key.get(k) != theirs.get(k)]
            raise ValueError(f"this runtime state belongs to another {' and '.join(what)} "
                             f"(saved {theirs}, here {self.key})")
        for name, t in state.items():
            if name.startswith("history."):
                site = name[len("history."):]
                cur = self.tables.get(site)
                if cur is not None and cur.shape[1] != t.shape[1]:
                    raise ValueError(f"history of {site}: {t.shape[1]} channels in the state, "
                                     f"{cur.shape[1]} in the model")
                if cur is not None and cur.shape[0] >= t.shape[0]:
                    cur.zero_()[: t.shape[0]] = t  # in place: compiled graphs hold views of it
                else:
                    self.tables[site] = t.clone().float()
        self.step.copy_(state["step"])
        self.seeded.copy_(state["seeded"])

    def reset(self) -> None:
        for t in self.tables.values():
            t.zero_()
        self.step.zero_()
        self.seeded.zero_()
        self._last.clear()
        self.calls.clear()


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu(), b.cpu()
    inter = int(torch.isin(a, b).sum())
    return inter / (len(a) + len(b) - inter)

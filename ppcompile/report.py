"""What the pass did, as rows: one per block found (rewritten or left dense, and why)."""
from __future__ import annotations

from tabulate import tabulate

from .passes.probe_prune import PassResult
from .passes.sites import module_path
from .passes.status import Dense, Reason

COLUMNS = ["site", "layer", "kind", "module", "total", "kept", "status", "selects"]


def site_rows(result: PassResult) -> list[dict]:
    """Every site of a pass: layer, kind, final projection's module, units (heads or channels),
    kept units, status ("pruned" or "dense: <why>", and the reason's name), what chose a pruned
    site's units (passes/select.py: "probe"; "whole batch" where a probe would cost more; "prompt",
    GRIFFIN's dense prompt; "calibration", a static policy's; "prefill" in a decode graph, which reads
    the selection its prefill stored); then every block the pass could not match."""
    rows = [{"site": s.name, "layer": s.layer, "kind": s.kind, "module": module_path(s.final),
             "total": s.units, "kept": s.kept, **_status(s.status),
             "selects": s.selected_by if s.pruned else None} for s in result.sites]
    rows += [{"site": p.name, "layer": p.layer, "kind": p.kind, **_status(p.status)} for p in result.problems]
    return rows


def _status(status) -> dict:
    return {"status": str(status), "reason": status.reason.name if isinstance(status, Dense) else None}


def left_dense_unmatched(row: dict) -> bool:
    """A block left dense because the pass could not handle it (not by the config's choice)."""
    return row["reason"] is not None and not Reason[row["reason"]].chosen


def format_rows(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    return tabulate([[r.get(c, "") for c in columns] for r in rows], headers=columns)

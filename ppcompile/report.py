"""What the pass did, as rows: one per block found (rewritten or left dense, and why)."""
from __future__ import annotations

from tabulate import tabulate

from .passes.probe_prune import PassResult
from .passes.sites import module_path

COLUMNS = ["site", "layer", "kind", "module", "total", "kept", "status"]


def site_rows(result: PassResult) -> list[dict]:
    """Every site of a pass: layer, kind, final projection's module, units (heads or channels),
    kept units, status ("pruned" or "dense: <why>"); then every block the pass could not match."""
    rows = [{"site": s.name, "layer": s.layer, "kind": s.kind, "module": module_path(s.final),
             "total": s.heads or s.channels, "kept": s.kept, "status": s.status} for s in result.sites]
    for p in result.problems:
        site, why = p.split(": ", 1)
        rows.append({"site": site, "status": f"dense: {why}"})
    return rows


def left_dense_unmatched(status: str) -> bool:
    """A block left dense because the pass could not handle it (not by the config's choice)."""
    return status.startswith("dense") and not any(
        why in status for why in ("skipped layer", ": policy ", "blocks="))


def format_rows(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    return tabulate([[r.get(c, "") for c in columns] for r in rows], headers=columns)

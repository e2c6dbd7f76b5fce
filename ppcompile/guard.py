"""A check for whoever measures a compiled model: were the measured calls really pruned?

A bench that times or scores `pp.compile(model, ...)` measures the pass only if every call ran a
rewritten graph and every block the config prunes was rewritten. Neither is guaranteed: Dynamo
runs the original forward past its recompile limit or a graph break (the runtime counts such a
call as unpruned, and warns once), and a block the pass cannot match stays dense (a warning). A
warning scrolls by in a long bench; `assert_pruned` makes both an error, after the measured calls.
"""
from __future__ import annotations

from collections.abc import Iterable

from .backend import Session
from .report import left_dense_unmatched, site_rows


class NotPruned(RuntimeError):
    """What a bench measured is not (all) the pruned model it names."""


def session_of(model) -> Session:
    """The session of a model compiled by pp.compile (what it returned, or the model itself: its
    last compile) or by torch.compile(backend="ppcompile"); a Session is returned as is."""
    if isinstance(model, Session):
        return model
    # what pp.compile returned holds its own session; getattr would reach the model's (the last compile's)
    session = getattr(model, "__dict__", {}).get("pp") or getattr(model, "pp", None)
    if not isinstance(session, Session):
        raise TypeError(f"{type(model).__name__} was not compiled by ppcompile (no .pp session): pass what "
                        "pp.compile returned, or its Session")
    return session


def problems(model, expect_dense: Iterable[str] = ()) -> list[str]:
    """Why the calls of `model` so far were not all pruned as its config asks; [] when they were.
    `expect_dense`: site names the caller knows stay dense (e.g. a block the pass cannot match).
    The model's layers are its config's num_hidden_layers where it has one (a Session has none)."""
    session = session_of(model)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    n_layers = n_layers if isinstance(n_layers, int) else None
    return _call_problems(session) + _site_problems(session, set(expect_dense), n_layers)


def assert_pruned(model, *, method: str = "", expect_dense: Iterable[str] = ()) -> dict:
    """Raise NotPruned, naming `method`, if a call of `model` ran unpruned, if no call ran through
    the pass, or if a block its config prunes stayed dense (a status other than "pruned" that the
    config did not choose, or a layer past the skipped ones that no graph held); else return the
    runtime's counts. Call it after the measured calls."""
    found = problems(model, expect_dense)
    if found:
        config = session_of(model).config
        name = method or f"policy {config.policy.name}"
        raise NotPruned(f"{name} (ratio {config.ratio}): not measured as pruned:\n  " + "\n  ".join(found))
    return dict(session_of(model).runtime.counts)


def _call_problems(session: Session) -> list[str]:
    counts = session.runtime.counts
    pruned, unpruned = counts["pruned_calls"], counts["unpruned_calls"]
    if unpruned:
        return [f"{unpruned} of {pruned + unpruned} calls ran the original, unpruned forward (runtime counts "
                f"unpruned_calls={unpruned}): their figures are the dense model's. ppcompile warned with the "
                "cause (Dynamo's recompile limit, a graph break, a torch.compiler stance); fix it, e.g. "
                "torch._dynamo.reset() between models or a higher torch._dynamo.config.recompile_limit, and rerun"]
    if not pruned and not counts["dense_by_cost_calls"]:  # dense by the cost rule: a choice, in the counts
        return ["no call ran through the pass (pruned_calls=0): call the compiled model before checking"]
    return []


def _site_problems(session: Session, allowed: set[str], n_layers: int | None) -> list[str]:
    """Blocks left dense against the config, in every graph the session compiled (a block the pass
    found no match for is a row too: see report.site_rows), and layers no graph held."""
    found: dict[str, str] = {}  # one line per site, in order
    skipped = set(session.config.skip_layers)  # dense by the config, whatever else their status says
    for result in session.passes:
        for row in site_rows(result):
            if row["site"] not in allowed and row["layer"] not in skipped and left_dense_unmatched(row):
                found.setdefault(row["site"], f"{row['site']} ({result.phase} graph): {row['status']}")
    return list(found.values()) + _missing_layers(session, n_layers)


def _missing_layers(session: Session, n_layers: int | None) -> list[str]:
    """Per phase: layers the config prunes that no compiled graph of that phase held (graph breaks
    can leave a layer to a frame Dynamo ran as is). `n_layers`: the model's, else the graphs'."""
    config, out = session.config, []
    if not config.policy.prunes:
        return out
    for phase in dict.fromkeys(r.phase for r in session.passes):
        results = [r for r in session.passes if r.phase == phase]
        held = {s.layer for r in results for s in r.sites}
        total = n_layers or max([r.n_layers for r in results] + [max(held, default=-1) + 1])
        lost = [i for i in range(total) if i not in held and i not in config.skip_layers]
        if lost:
            out.append(f"layers {lost} ({phase}): no compiled graph held their blocks, so they ran unpruned "
                       "(graph breaks? run with TORCH_LOGS=graph_breaks)")
    return out

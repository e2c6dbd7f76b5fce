"""Dumps of what the pass did, per compiled graph, in pass order:

    <dump_dir>/graph_00/00_captured.py    the graph Dynamo captured, as readable Python
                        01_sites.txt      every block found: layer, kind, module, kept/total, status
                        02_rewritten.py   the rewritten graph (node names say site and step)
                        03_inductor.py    the code Inductor generated (C++ kernels on CPU, Triton on GPU)
                        report.json       the same facts for machines

Graphs are numbered in compile order and files have fixed names, so two runs' dumps diff.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from torch import fx

from .config import PPConfig
from .passes.probe_prune import PassResult
from .report import format_rows, site_rows

ENV = "PPCOMPILE_DUMP"


def dump_dir(explicit: str | os.PathLike | None) -> Path | None:
    """The folder to dump into: the explicit one, else $PPCOMPILE_DUMP, else none."""
    folder = explicit or os.environ.get(ENV)
    return Path(folder) if folder else None


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=True)


class Dumper:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.graphs = 0

    def next_graph(self) -> Path:
        folder = self.root / f"graph_{self.graphs:02d}"
        self.graphs += 1
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def write_pass(folder: Path, captured: fx.GraphModule, result: PassResult, config: PPConfig) -> None:
        rows = site_rows(result)
        (folder / "00_captured.py").write_text(readable(captured))
        (folder / "01_sites.txt").write_text(
            f"policy {config.policy}, ratio {config.ratio}, batch {_size(result.batch)}, "
            f"sequence {_size(result.seq_len)}, "
            f"{result.n_layers} decoder layers\n\n{format_rows(rows)}\n")
        (folder / "02_rewritten.py").write_text(readable(result.gm))
        report = {"config": config.as_dict(), "batch": _size(result.batch), "seq_len": _size(result.seq_len),
                  "n_layers": result.n_layers, "sites": rows,
                  "pruned": sum(r["reason"] is None for r in rows)}
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    @staticmethod
    def write_inductor(folder: Path, codes: list[str]) -> None:
        text = "\n\n".join(codes)
        (folder / "03_inductor.py").write_text(text)
        report = json.loads((folder / "report.json").read_text())
        report["inductor_code"] = "03_inductor.py" if codes else None
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def _size(size) -> int | str:
    """A graph's batch or sequence length: an int, or "dynamic (s0)" for a symbol."""
    return size if isinstance(size, int) else f"dynamic ({size})"


@contextmanager
def inductor_code(codes: list[str]):
    """Collect the code Inductor generates inside the block (its own hook, the one
    `torch._inductor.utils.run_and_get_code` uses; the FX graph and AOT autograd caches are off
    so that a cached graph is generated again rather than loaded: see cache.py)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.graph import GraphLowering

    with mock.patch.object(GraphLowering, "save_output_code", codes.append), \
            inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield

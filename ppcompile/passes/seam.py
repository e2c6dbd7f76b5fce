"""The state seam: what crosses a rewritten graph's boundary besides the model's own inputs and
outputs, by name.

A pass declares each extra input as a `Slot` (name, fixed trailing shape, whether it has a row per
token position, dtype, initial value) and names each extra output. The `Seam` is the one place that
knows their order: it makes the placeholders and outputs while the pass runs, and at call time
fetches the slots' tensors from a provider (the runtime, a calibration) and splits the outputs
back into the model's own and the named extras.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from .graph import input_device

SeqSource = "tuple[int, int | None] | int"


@dataclass(frozen=True)
class Slot:
    name: str  # e.g. "history/model.layers.3.mlp", "step": see slot_name()
    shape: tuple[int, ...] = ()  # the trailing dims
    per_position: bool = False  # a leading dim of one row per token position: (L, *shape)
    dtype: torch.dtype = torch.float32
    init: float = 0.0
    required: bool = False  # must exist already (what a decode reads, a prefill wrote): never created

    def new(self, rows: int, device) -> torch.Tensor:
        lead = (rows,) if self.per_position else ()
        return torch.full(lead + self.shape, self.init, dtype=self.dtype, device=device)


# A provider returns the tensor a slot holds now, with `rows` rows if it is per position.
Provider = Callable[[Slot, int, torch.device], torch.Tensor]


# ---- every name that crosses the seam: made here, and taken apart here ----
#   slots    step, seeded, history/<site>, stored/<site>/<what>, <stat>/<site> (calibration)
#   outputs  kept/<site>, share/<site>, update/<site>, stats/<site>, advance
STEP = Slot("step", dtype=torch.long)  # calls so far; call 0 is the warm-up
SEEDED = Slot("seeded", dtype=torch.bool)  # the history holds real statistics
ADVANCE = "advance"
HISTORY, STORED, KEPT, SHARE, UPDATE, STATS = "history", "stored", "kept", "share", "update", "stats"


def slot_name(family: str, site: str, part: str | None = None) -> str:
    """"kept/<site>", "stored/<site>/<part>": a site's slot or output in `family`."""
    return f"{family}/{site}" if part is None else f"{family}/{site}/{part}"


def parse(slot_or_output: str) -> tuple[str, str | None, str | None]:
    """"stored/<site>/kept" -> ("stored", "<site>", "kept"); "step" -> ("step", None, None)."""
    family, _, rest = slot_or_output.partition("/")
    site, _, part = rest.partition("/")
    return family, site or None, part or None


def by_site(named: dict, family: str, part: str | None = None) -> dict:
    """The entries of `named` (slot or output name -> value) in `family` (and `part`), by site."""
    out = {}
    for key, v in named.items():
        fam, site, p = parse(key)
        if fam == family and site is not None and p == part:
            out[site] = v
    return out


def history_slot(site: str, channels: int) -> Slot:
    """A site's history: mean of its final projection's input squared, per position and channel."""
    return Slot(slot_name(HISTORY, site), (channels,), per_position=True)


def stored_slot(site: str, part: str, shape: tuple[int, ...], dtype: torch.dtype) -> Slot:
    """What a prefill stores for `site` ("kept", "q_w", ...), which its decode steps read."""
    return Slot(slot_name(STORED, site, part), shape, dtype=dtype)


CALIBRATION_STATS = ("sq", "count", "total", "total_sq")  # the calibration's tables per site


def stat_slots(site: str, channels: int) -> list[Slot]:
    """A site's calibration tables: per position and channel sums of x^2, token counts per
    position, per channel sums of x and of x^2."""
    return [Slot(slot_name("sq", site), (channels,), per_position=True),
            Slot(slot_name("count", site), (), per_position=True),
            Slot(slot_name("total", site), (channels,), dtype=torch.float64),
            Slot(slot_name("total_sq", site), (channels,), dtype=torch.float64)]


@dataclass
class Seam:
    slots: list[Slot] = field(default_factory=list)  # extra inputs, in order
    outputs: list[str] = field(default_factory=list)  # extra outputs, in order
    n_outputs: int = 0  # the graph's own outputs (before the extras)
    seq_source: SeqSource = 0  # where a call finds the sequence length (see graph.size_source)
    _nodes: list[fx.Node] = field(default_factory=list, repr=False)
    _extra: list[fx.Node] = field(default_factory=list, repr=False)

    # ---- while the pass runs ----
    def input(self, g: fx.Graph, slot: Slot, seq_len=None) -> fx.Node:
        """A new placeholder for `slot`, after the graph's inputs and the slots before it. Its
        recorded value is a fake tensor of the slot's shape (symbolic rows in a dynamic graph)."""
        last = self._nodes[-1] if self._nodes else [n for n in g.nodes if n.op == "placeholder"][-1]
        with g.inserting_after(last):
            node = g.placeholder(slot.name.replace("/", "_").replace(".", "_"))
        node.meta["val"] = node.meta["example_value"] = _fake(g, slot, seq_len)
        self.slots.append(slot)
        self._nodes.append(node)
        return node

    def output(self, name: str, node: fx.Node) -> None:
        self.outputs.append(name)
        self._extra.append(node)

    def close(self, g: fx.Graph) -> None:
        """Append the named outputs to the graph's own (as outputs, no pass drops them as dead code)."""
        out_node = next(n for n in g.nodes if n.op == "output")
        outputs = out_node.args[0]
        outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        self.n_outputs = len(outs)
        if self._extra:
            out_node.args = (outs + tuple(self._extra),)

    # ---- at call time ----
    def seq_len(self, args) -> int:
        src = self.seq_source
        if isinstance(src, int):
            return src
        i, d = src
        return int(args[i]) if d is None else args[i].shape[d]

    def state(self, args, provide: Provider) -> list[torch.Tensor]:
        """The slots' tensors for a call with `args` (the graph's own inputs)."""
        if not self.slots:
            return []
        rows, device = self.seq_len(args), input_device(args)
        return [provide(s, rows, device) for s in self.slots]

    def examples(self) -> list:
        """Example values of the slots (fake tensors), for Inductor to compile with."""
        return [n.meta["val"] for n in self._nodes]

    def split(self, out) -> tuple[tuple, dict[str, torch.Tensor]]:
        """The graph's own outputs, and the named extras."""
        return tuple(out[: self.n_outputs]), dict(zip(self.outputs, out[self.n_outputs:]))

    def call(self, fn: Callable, args, provide: Provider) -> tuple[tuple, dict[str, torch.Tensor]]:
        return self.split(fn(*args, *self.state(args, provide)))


def _fake(g: fx.Graph, slot: Slot, seq_len):
    """A fake tensor for a slot, in the fake mode of the graph's recorded values (so that its rows
    are the graph's sequence symbol when the graph is dynamic); None in a graph without one."""
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("example_value") for n in g.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    device = next((v.device for v in vals if isinstance(v, torch.Tensor)), "cpu")
    lead = (seq_len,) if slot.per_position else ()
    with mode:
        return torch.empty(lead + slot.shape, dtype=slot.dtype, device=device)

"""FLOPs of a graph, counted by torch's FlopCounterMode, with the probe's share apart.

The probe's nodes are the ones the pass names `<site>_probe_*`; everything else (the compact
matmuls, the dense blocks, the head) is the rest. Outlined subgraphs are counted node by node.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode


class _Counting(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops = {"probe": 0, "rest": 0}

    def run_node(self, n: fx.Node):
        if n.target is torch.ops.higher_order.invoke_subgraph:
            inner = _Counting(getattr(self.module, n.args[0].target))
            out = inner.run(*self.map_nodes_to_values(n.args[2:], n))
            for k, v in inner.flops.items():
                self.flops[k] += v
            return out
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops["probe" if "_probe_" in n.name else "rest"] += counter.get_total_flops()
        return out


def graph_flops(gm: fx.GraphModule, args: list) -> dict[str, int]:
    """{"total", "probe"}: FLOPs of one call of `gm` on `args`."""
    counting = _Counting(gm)
    counting.run(*args)
    return {"total": counting.flops["probe"] + counting.flops["rest"], "probe": counting.flops["probe"]}


def weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the weights one call of `gm` reads in its linear ops (the recorded values of their
    weight arguments: a compact projection's is its compact weight). In a decode step, where the
    batch is a few tokens, reading them is most of the time."""
    import math
    from .passes.graph import hint
    from .passes.sites import is_linear, value
    total = 0
    for n in gm.graph.nodes:
        w = value(n.args[1]) if is_linear(n) else None
        if w is not None:
            total += math.prod(hint(s) for s in w.shape) * w.element_size()
    return total

"""A boolean attention mask that several attentions read becomes additive once, where it is made.

Inductor lowers each CPU flash attention on a boolean mask with the mask made additive first
(0 where True, -inf where False), in the query's dtype. Inline, the layers read one mask node, and
Inductor makes it once. Outlined (outline.py), each layer's subgraph gets the boolean mask as an
input and makes its own copy: at batch 8 x 512 in bf16, a 4 MiB tensor written once per layer.
Made here, in the graph, right after the mask, every attention reads the same additive tensor.
The values are the ones Inductor would make: the attentions' results are unchanged.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import fx

from .. import ops
from .graph import body_start, call
from .sites import SDPA, sdpa_params, value


def additive_masks(g: fx.Graph) -> int:
    """Each boolean mask that two or more SDPA calls of `g` read as their `attn_mask`, made
    additive once in the query's dtype, and those calls reading it: the number of masks made."""
    readers: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = defaultdict(list)
    for n in g.nodes:
        if n.op != "call_function" or n.target not in SDPA:
            continue
        params = sdpa_params(n)
        mask, q = params.get("attn_mask"), value(params["query"])
        m = value(mask)
        if m is not None and m.dtype == torch.bool and q is not None:
            readers[mask, q.dtype].append(n)
    made = 0
    for (mask, dtype), uses in readers.items():
        if len(uses) < 2:
            continue
        with g.inserting_before(body_start(g)) if mask.op == "placeholder" else g.inserting_after(mask):
            additive = call(g, ops.additive_mask, mask, dtype, name=f"{mask.name}_additive")
        m = value(mask)
        with getattr(m, "fake_mode", None) or contextlib.nullcontext():
            additive.meta["example_value"] = ops.additive_mask(m, dtype)
        for n in uses:
            n.replace_input_with(mask, additive)
        made += 1
    return made

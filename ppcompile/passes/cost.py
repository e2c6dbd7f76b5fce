"""The cost rule: where a forward graph's compact weights cannot pay for themselves, the site stays dense.

Pruning a site on a call saves the pruned units' multiply-adds on every token, and costs a fixed
amount: gathering the kept weights, the energy and history over the (L, C) positions, scores and
top-k. At few tokens the fixed part wins (SmolLM2 at 1 x 128: each MLP's compact down projection
saves about what gathering its kept columns costs). The rule compares the two for the cheapest
selection there is, the block's own activations with only its final projection compact:

    saved  = T * (units - kept) * unit_width * d_out              multiply-adds, T = B * L tokens
    cost   = c * (kept * unit_width * d_out + FIXED + (T + L) * C / 4)

where c (`PPConfig.gather_cost`) is what one gathered weight element costs in multiply-adds on the
device, and the (T + L) * C elements of the energy and history run vectorized, about 4x cheaper
each than a gather. A site prunes where saved > cost. Only forward graphs apply it: a prefill's
gathered weights serve every decode step after it, and a decode step gathers nothing.

In a dynamic graph the decision is made at the example's sizes and becomes one of Dynamo's guards
(the same inequality over the batch and sequence symbols), so a call on the other side of it
compiles its own graph: small calls run dense, large ones pruned, each graph right for its sizes.
"""
from __future__ import annotations

import os

import sympy
import torch
from torch._guards import detect_fake_mode

from .compact import unit_width
from .sites import Site, value

FIXED = 1 << 16  # a site's dozen small kernels (scores, top-k, index arithmetic), as gathered elements
# c by device and element size where gather_cost is "auto", one gathered element in multiply-adds.
# float32, 96: on an AVX2 CPU SmolLM2's MLPs pruned at batch 1 did not pay at 128 tokens (1.01-1.07x
# dense over three runs) and did at 256 (0.95x) (docs/results.md, "The cost rule"): c between 69 and
# 121 puts the rule's break-even between the two; 96 puts it at about 190 tokens. 2-byte dtypes, 256:
# on a CPU with AVX-512 BF16 and no AMX, SmolLM2 at batch 1 with every block pruned ran 0.97x, 1.01x
# and 0.93x dense at 256, 512 and 1024 tokens (docs/results.md, "The cost rule in bf16"): within
# that machine's +-4% below 1024. 256 prunes those MLPs from about 970 tokens and the attention
# from about 2000, so what it leaves dense costs at most that spread. Not measured on AMX, whose
# faster matmuls may want a larger c. Elsewhere (CUDA), 512: not measured.
AUTO_COST = {("cpu", 4): 96, ("cpu", 2): 256}
AUTO_COST_ELSEWHERE = 512


def gather_cost(setting, weight: torch.Tensor) -> int:
    """c for a weight: the configured number; for "auto", $PPCOMPILE_GATHER_COST where set (the
    test suite sets 0: its tiny models would pay at no size), else the device's default. 0 turns
    the rule off."""
    if setting == "auto":
        setting = os.environ.get("PPCOMPILE_GATHER_COST") or \
            AUTO_COST.get((weight.device.type, weight.element_size()), AUTO_COST_ELSEWHERE)
    return int(setting)


def margin(site: Site, c: int, batch, seq_len):
    """4 * (saved - cost) in multiply-adds at `batch` x `seq_len` (ints, or a dynamic graph's
    symbols: then a symbolic expression, with integer arithmetic only, so that it can be a guard)."""
    d_out = value(site.final.args[1]).shape[0]
    pruned, kept = (site.units - site.kept) * unit_width(site), site.kept * unit_width(site)
    tokens = batch * seq_len
    return 4 * tokens * pruned * d_out - c * (4 * (kept * d_out + FIXED) + (tokens + seq_len) * site.channels)


def break_even(site: Site, c: int, seq_len: int) -> int:
    """The fewest tokens at which `site` pays, for sequences of `seq_len` (the batch grows)."""
    batch = 1
    while margin(site, c, batch, seq_len) <= 0 and batch < 1 << 20:
        batch *= 2
    lo, hi = batch // 2, batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if margin(site, c, mid, seq_len) > 0 else (mid, hi)
    return hi * seq_len


def cannot_pay(site: Site, setting, batch, seq_len, example: tuple[int, int]) -> str | None:
    """Why `site` stays dense at the graph's sizes (the detail of its status), or None where it
    pays. A dynamic graph's decision is made at `example` (the hints) and guarded."""
    c = gather_cost(setting, value(site.final.args[1]))
    if c == 0:
        return None
    pays = margin(site, c, *example) > 0
    if not (isinstance(batch, int) and isinstance(seq_len, int)):
        _guard(sympy.Gt(margin(site, c, batch, seq_len), 0), pays)
    if pays:
        return None
    b, L = example
    return (f"batch {b} x length {L} (gather_cost={c}: its compact weights would save less than selecting and "
            f"gathering them costs; it prunes from about {break_even(site, c, L)} tokens of length {L})")


def _guard(condition: sympy.Basic, expected: bool) -> None:
    """Make `condition` over a dynamic graph's size symbols one of Dynamo's guards (it holds at the
    example, as `expected` says), so that a call where it does not compiles a graph of its own.
    Outside Dynamo (no shape environment) the graph is only ever run at its example."""
    mode = detect_fake_mode()
    shape_env = getattr(mode, "shape_env", None)
    if shape_env is None:
        return
    held = bool(shape_env.evaluate_expr(condition))
    if held != expected:
        raise AssertionError(f"the cost rule's guard {condition} disagrees with its decision at the example")

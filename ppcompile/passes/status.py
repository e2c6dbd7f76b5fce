"""What became of a block: pruned, or dense for a named reason. Made here, and only here.

A site's status is data (`PRUNED` or `Dense(Reason.X, detail)`), printed as the one line users
read ("pruned", "dense: blocks=mlp"); code decides by the reason, never by the text.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Reason(Enum):
    """Why a block stays dense: the line's text ({} takes the detail) and whether the config chose
    it (a choice is no failure: strict mode and the benches' guard let it pass)."""

    def __init__(self, text: str, chosen: bool):
        self.text, self.chosen = text, chosen

    # chosen by the config
    SKIPPED_LAYER = ("skipped layer", True)
    BLOCKS = ("blocks={}", True)
    POLICY = ("policy {}", True)  # the policy prunes nothing, or not this kind of block
    CANNOT_PAY = ("pruning cannot pay at {}", True)  # the cost rule (passes/cost.py; gather_cost=0: off)
    # the block finder (sites.py)
    UNMATCHED = ("no {} block matched in this layer", False)
    OPAQUE_ATTENTION = ("its attention is one opaque op, {}: no head can be pruned inside it", False)
    NO_SDPA = ("attention without scaled_dot_product_attention (load the model with "
               "attn_implementation='sdpa' where it has one)", False)
    SPLIT_INPUT = ("its first projections read different inputs", False)
    MANY_SDPA = ("more than one attention op in the block", False)
    CHAINED = ("its first projection is the final projection of {}", False)
    QKV_UNKNOWN = ("q/k/v projections not identified", False)
    HEAD_LAYOUT = ("head layout of the attention op is not (B, H, L, D)", False)
    GQA_RATIO = ("query heads are not a multiple of key/value heads", False)
    # the pass
    UNEVEN_SHARDS = ("{}", False)  # its units do not split over shards=N
    UNSUPPORTED = ("{}", False)  # a dimension rule does not cover one of its ops
    NOT_STORED = ("no prefill stored a selection for it", False)
    DOES_NOT_RUN = ("the rewritten block does not run ({})", False)


@dataclass(frozen=True)
class Pruned:
    def __str__(self) -> str:
        return "pruned"


@dataclass(frozen=True)
class Dense:
    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return "dense: " + self.reason.text.format(self.detail)


PRUNED = Pruned()

"""Tensor parallelism through torch.distributed, as gpt-fast's tp.py does it: plain tensors in each
rank's local shapes, and an all-reduce (a functional collective, which Dynamo traces into the
graph) after each block's final projection.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py

`shard(model)` splits every attention by heads (q rows of this rank's query heads, k/v rows of its
K/V heads, the final projection's matching input columns) and every MLP by channels, in place.
Which modules those are comes from the pass's own block finder on one traced call: no per-model
code. A block whose heads, K/V heads or channels do not divide by the world size stays
replicated: every rank holds it whole and runs it whole, with no all-reduce after it (its input is
the same on every rank, so its output is too); `shard` warns naming it and why, and
`model.tp_blocks` says what became of each block. Each rank then runs the pass on its shard: its
probe reads the residual (the same on every rank after the all-reduce), it scores and keeps its own
heads and channels, and keeps its own history: no communication beyond the model's own
all-reduces. A replicated block is pruned on every rank as one process prunes it, from equal
inputs, so every rank keeps the same units. Each rank keeps what one block of its size would,
which is `PPConfig(shards=world)` in one process (tests/test_tp.py checks they are the same) where
every block splits. Static policies score once, at compile time, on every rank's statistics
gathered (passes/static.py `whole_blocks`): FLAP's one threshold is over all ranks' units, and a
rank keeps its part of it; they refuse a model with sharded and replicated blocks together
(`shard_group`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .torch_compat import compile_isolated


@dataclass
class Block:
    kind: str  # "attention" | "mlp"
    projections: dict[str, int]  # first projection's module path -> its units (heads or channels)
    unit: int  # rows per unit: head_dim (attention) or 1 (MLP)
    final: str  # the final projection's module path
    name: str = ""  # the pass's site name: "<layer path>.attention" / "<layer path>.mlp"
    units: dict[str, int] | None = None  # what must divide by the world size: {"query heads": 9, "K/V heads": 3}
    replicated: str = ""  # set by shard(): why this block is whole on every rank; "": sharded


def shard(model: nn.Module, group: dist.ProcessGroup | None = None, *, uneven: str = "replicate") -> nn.Module:
    """Shard `model` in place over the ranks of `group` (default: all), each rank keeping the
    consecutive run of heads and channels of its rank; returns it. A block whose heads, K/V heads
    or channels do not divide by the world size stays whole on every rank (`uneven="replicate"`,
    with a warning) or is an error (`uneven="raise"`). `model.tp_blocks`: every block, with why it
    is replicated ("" where sharded). Everything is checked before any weight changes."""
    if uneven not in ("replicate", "raise"):
        raise ValueError(f"uneven must be 'replicate' or 'raise', got {uneven!r}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    blocks = plan(model)
    for b in blocks:
        b.replicated = _why_replicated(b, world)
        if b.replicated and uneven == "raise":
            raise ValueError(f"{b.name}: {b.replicated.split(':')[0]}; pass uneven='replicate' to run it whole "
                             f"on every rank, or use a world size that divides it")
    attention = {bool(b.replicated) for b in blocks if b.kind == "attention"}
    if len(attention) > 1:  # the config's head counts (which caches size themselves from) are one for all
        raise ValueError(f"some attention blocks split over {world} ranks and some do not; the config holds one "
                         "head count for every layer, so either all or none can be sharded: use a world size that "
                         "divides every attention's heads and K/V heads, or none's")
    for b in blocks:
        if not b.replicated:
            _shard_block(model, b, rank, world, group)
    _local_config(model.config, world, heads=attention == {False})
    model.tp_blocks = blocks
    if rank == 0 and (message := _replicated_summary(blocks)):  # every rank decides the same: say it once
        warnings.warn(message, stacklevel=2)
    return model


def _why_replicated(block: Block, world: int) -> str:
    """Why `block` cannot be split evenly over `world` ranks ("" if it can)."""
    for what, n in block.units.items():
        if n % world:
            return (f"{n} {what} do not split over {world} ranks: {block.kind} replicated (every rank runs it "
                    "whole, no all-reduce after it)")
    return ""


def _replicated_summary(blocks: list[Block]) -> str:
    """One line per reason, naming the blocks it keeps whole; "" if every block is sharded."""
    by_reason: dict[str, list[str]] = {}
    for b in blocks:
        if b.replicated:
            by_reason.setdefault(b.replicated, []).append(b.name)
    lines = []
    for why, names in by_reason.items():
        shown = names[0] if len(names) == 1 else f"{len(names)} blocks, {names[0]} ... {names[-1]}"
        lines.append(f"ppcompile.tp.shard: {why}: {shown}")
    return "\n".join(lines)


def _shard_block(model: nn.Module, block: Block, rank: int, world: int, group) -> None:
    """This rank's rows of the first projections, its columns of the final one, and the all-reduce
    that sums the ranks' partial outputs."""
    for path in block.projections:
        _keep_rows(model.get_submodule(path), rank, world)
    final = model.get_submodule(block.final)
    _keep_columns(final, rank, world)
    final.register_forward_hook(_all_reduce(group))


def plan(model: nn.Module) -> list[Block]:
    """Every attention and MLP block of `model`, from the pass's block finder on one traced call;
    a block it cannot identify (or a fused projection) is an error naming it: half a model
    sharded would compute nonsense."""
    from .passes.sites import module_path
    from .passes.unfuse import WEIGHT_VIEW, prepare

    found = []

    def backend(gm, example_inputs):
        found.extend(prepare(gm)[0])
        return gm.forward

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compile_isolated(model, backend=backend, dynamic=False)(ids)
    blocks = []
    for s in found:
        bad = [p for p in s.projections if p.args[1].meta.get(WEIGHT_VIEW) or p.args[1].op != "placeholder"]
        if not s.pruned or bad or s.final.args[1].op != "placeholder":
            why = "a fused projection" if bad else str(s.status)
            raise ValueError(f"{s.name}: cannot be sharded ({why}); tensor parallelism here needs every block "
                             "found, with projections that are nn.Linear modules of their own")
        if s.kind == "attention":
            roles = s.qkv
            units = {module_path(roles["q"]): s.heads, module_path(roles["k"]): s.kv_heads,
                     module_path(roles["v"]): s.kv_heads}
            counts = {"K/V heads": s.kv_heads, "query heads": s.heads}  # K/V first: a GQA group keeps its queries
        else:
            units = {module_path(p): s.channels for p in s.projections}
            counts = {"channels": s.channels}
        blocks.append(Block(s.kind, units, s.head_dim or 1, module_path(s.final), s.name, counts))
    return blocks


def _keep_rows(linear: nn.Linear, rank: int, world: int) -> None:
    """This rank's run of output rows (its heads or channels)."""
    rows = linear.weight.shape[0] // world
    keep = slice(rank * rows, (rank + 1) * rows)
    linear.weight = nn.Parameter(linear.weight.detach()[keep].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[keep].clone(), requires_grad=False)
    linear.out_features = rows


def _keep_columns(linear: nn.Linear, rank: int, world: int) -> None:
    """This rank's run of input columns; the bias on rank 0 only (the all-reduce adds it once)."""
    cols = linear.weight.shape[1] // world
    linear.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone(),
                                 requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)
    linear.in_features = cols


def _all_reduce(group):
    from torch.distributed import _functional_collectives as funcol
    group = group if group is not None else dist.group.WORLD

    def hook(module, args, output):
        return funcol.all_reduce(output, "sum", group)

    return hook


def _local_config(config, world: int, heads: bool) -> None:
    """Heads per rank in the config, which caches (a static KV cache) size themselves from;
    `heads` False: the attention is replicated, its head counts stay the model's."""
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    if not heads:
        return
    config.num_attention_heads //= world
    if getattr(config, "num_key_value_heads", None):
        config.num_key_value_heads //= world

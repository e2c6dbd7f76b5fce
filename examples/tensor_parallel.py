"""Probe Pruning on a tensor-parallel model: each rank holds its part of every block of SmolLM2-135M
that splits over the ranks, probes, scores and keeps its own heads and channels, with no
communication beyond the model's own all-reduces. Any number of ranks:

    torchrun --nproc-per-node 3 examples/tensor_parallel.py
    torchrun --nproc-per-node 2 examples/tensor_parallel.py

On 3 ranks every block splits (3 of the 9 query heads, 1 of the 3 K/V heads, 512 of the 1536 MLP
channels per rank). On 2 the heads do not (3 K/V heads): tp.shard leaves every attention whole on
every rank (it warns once), each rank prunes it the same way from the same input, and the MLPs
split (768 channels per rank). CPU and gloo here; on GPUs, the same with the nccl backend and one
device per rank.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

import ppcompile as pp
from ppcompile import data, tp
from ppcompile.data import cache_dir
from ppcompile.models import load_model

MODEL, RATIO, LAYER = "smollm2-135m", 0.4, 3  # layer 3: the first pruned one (0-2 stay dense)


class CannotRun(RuntimeError):
    """A known reason this example cannot run, with its fix."""


@record  # a rank's exception reaches torchrun's summary ("Root Cause"), not only that rank's stderr
def main() -> None:
    if "RANK" not in os.environ:
        sys.exit(f"run it under torchrun, one process per rank: torchrun --nproc-per-node 2 {sys.argv[0]}")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # the ranks share this machine's cores
    try:
        run(dist.get_rank(), dist.get_world_size())
    except CannotRun as e:
        print(f"tensor_parallel.py, rank {dist.get_rank()}: error: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


def run(rank: int, world: int) -> None:
    model, tokenizer = load_on_ranks(rank)
    ids = data.token_windows("brown:a", tokenizer, seq_len=128, n_windows=4)  # (4, 128), the same on every rank
    with torch.no_grad():
        dense_loss = model(ids, labels=ids).loss.item()
        try:
            tp.shard(model)  # this rank's heads and channels; an all-reduce after each sharded block
        except ValueError as e:
            raise CannotRun(f"{MODEL} cannot be sharded over {world} ranks: {e}") from e
        pruned = pp.compile(model, ratio=RATIO, backend="eager")  # backend="inductor" compiles each rank's graph
        pruned(ids)  # the warm-up batch
        loss = pruned(ids, labels=ids).loss.item()
    lines = [None] * world  # printed by rank 0, in rank order: ranks writing at once interleave their lines
    dist.all_gather_object(lines, f"rank {rank} of {world}: {kept_line(model, world)}")
    if rank == 0:
        print(*lines, sep="\n")
        print(f"dense loss {dense_loss:.3f}, pp@{RATIO} on {world} ranks loss {loss:.3f}", flush=True)


def load_on_ranks(rank: int):
    """The model on every rank, rank 0 first: the first load converts the packaged GGUF into the
    cache, and Hugging Face writes a checkpoint's weights on rank 0 only once a process group
    exists, so a conversion on another rank would leave a folder without them. Rank 0 tells the
    others whether it loaded, so that they fail with its reason, not with a closed connection."""
    model, error = None, None
    if rank == 0:
        try:
            model = _load(rank)
        except CannotRun as e:
            error = e
    failed = [None if error is None else str(error)]
    dist.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise error or CannotRun(failed[0])
    return model if rank == 0 else _load(rank)


def _load(rank: int):
    try:
        return load_model(MODEL)
    except (ImportError, OSError, ValueError) as e:
        folder = cache_dir() / "models" / MODEL
        if folder.is_dir() and not (folder / "config.json").is_file():
            fix = (f"{folder} holds no config.json: a conversion that did not finish, or "
                   f"one run on a rank other than 0, left it; delete it (rm -r {folder}) "
                   "and run again")
        else:
            fix = f"it comes from its package (make data installs it) and is converted once into {folder}"
        raise CannotRun(f"{MODEL} did not load on rank {rank} ({type(e).__name__}: {e}); {fix}") from e


def kept_line(model, world: int) -> str:
    """What layer LAYER's attention and MLP keep on this rank, and of how many."""
    kept = model.pp.runtime.last_selection()
    blocks = {b.name: b for b in model.tp_blocks}
    attn, mlp = f"model.layers.{LAYER}.attention", f"model.layers.{LAYER}.mlp"
    heads = blocks[attn].units["query heads"]
    if blocks[attn].replicated:
        a = f"attention replicated ({heads} heads on every rank), keeps heads {kept[attn].tolist()}"
    else:
        a = f"attention keeps local heads {kept[attn].tolist()} of its {heads // world} (of {heads})"
    channels = blocks[mlp].units["channels"]
    local = channels if blocks[mlp].replicated else channels // world
    return f"layer {LAYER} {a}; MLP keeps {len(kept[mlp])} of its {local} channels (of {channels})"


if __name__ == "__main__":
    main()

"""Probe Pruning on a tensor-parallel model: each rank holds a third of every block (SmolLM2-135M:
3 of its 9 query heads, 1 of its 3 K/V heads, 512 of its 1536 MLP channels), probes, scores and
keeps its own heads and channels, with no communication beyond the model's own all-reduces.

    torchrun --nproc-per-node 3 examples/tensor_parallel.py

CPU and gloo here; on GPUs, the same with the nccl backend and one device per rank.
"""
import torch
import torch.distributed as dist

import ppcompile as pp
from ppcompile import data, tp
from ppcompile.models import load_model

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)  # the ranks share this machine's cores

model, tokenizer = load_model("smollm2-135m")
ids = data.token_windows("brown:a", tokenizer, seq_len=128, n_windows=4)  # (4, 128), the same on every rank
with torch.no_grad():
    dense_loss = model(ids, labels=ids).loss.item()
    tp.shard(model)  # this rank's heads and channels; an all-reduce after each block
    pruned = pp.compile(model, ratio=0.4, backend="eager")  # backend="inductor" compiles each rank's graph
    pruned(ids)  # the warm-up batch
    loss = pruned(ids, labels=ids).loss.item()

kept = model.pp.runtime.last_selection()
layer3 = kept["model.layers.3.attention"].tolist(), len(kept["model.layers.3.mlp"])
print(f"rank {rank}: layer 3 keeps local heads {layer3[0]} of 3 and {layer3[1]} of 512 channels", flush=True)
dist.barrier()
if rank == 0:
    print(f"dense loss {dense_loss:.3f}, pp@0.4 on {dist.get_world_size()} ranks loss {loss:.3f}")
dist.destroy_process_group()

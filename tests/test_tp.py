"""Tensor parallelism (tp.py) on CPU: two gloo ranks, spawned, each running the pass on its shard
of a tiny LLaMA (4 heads, 2 K/V heads, 128 MLP channels): ratio 0 is the single-process dense
model, and pp, wanda-sp and flap on ranks keep exactly what one process keeps with shards=2
(indices, logits, histories; FLAP's counts differ between ranks), and generate its tokens."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppcompile as pp
from ppcompile import tp
from ppcompile.models import random_model

WORLD = 2
OPTIONS = dict(backend="eager", strict=True, skip_layers=(0,), mlp_multiple=16)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (3, 20), generator=g), torch.randint(0, 128, (2, 24), generator=g)]


def _run(model, ratio: float, **options):
    """Compile, run both batches; the last logits, selection and history tables."""
    compiled = pp.compile(model, ratio, **OPTIONS, **options)
    with torch.no_grad():
        for ids in _batches():
            logits = compiled(ids).logits
    runtime = model.pp.runtime
    return {"logits": logits, "kept": runtime.last_selection(),
            "history": {k[len("history."):]: v for k, v in runtime.state_dict().items() if k.startswith("history.")}}


def _generate(model, ratio: float, **options):
    """generate() of 4 tokens after a padded prompt batch: the tokens and the prefill's selection."""
    compiled = pp.compile(model, ratio, **OPTIONS, **options)
    ids = _batches()[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        out = compiled.generate(ids.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=4,
                                do_sample=False, pad_token_id=0)
    return {"tokens": out, "kept": model.pp.runtime.last_selection()}


def _static(policy: str):
    def run(model, ratio: float, **options):
        """`policy`, calibrated on the model it prunes (on a rank: its shard's statistics)."""
        return _run(model, ratio, policy=policy, calibration=[_batches()[1]], **options)
    return run


# what the ranks run, each on a fresh sharded model, in one spawn (a spawn costs imports and compiles)
RUNS = {"dense": (_run, 0.0), "pp": (_run, 0.4), "wanda-sp": (_static("wanda-sp"), 0.4),
        "flap": (_static("flap"), 0.4), "generate": (_generate, 0.4)}


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, (run, ratio) in RUNS.items():
            torch._dynamo.reset()
            model = tp.shard(random_model("llama-gqa"))
            torch.save(run(model, ratio), os.path.join(folder, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Every run of RUNS on two ranks: name -> each rank's result."""
    folder = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(folder)), nprocs=WORLD, join=True)
    return {name: [torch.load(folder / f"{name}_{r}.pt") for r in range(WORLD)] for name in RUNS}


def test_ratio_zero_on_two_ranks_is_the_dense_model(ranks):
    with torch.no_grad():
        dense = random_model("llama-gqa")(_batches()[-1]).logits
    for r in ranks["dense"]:
        torch.testing.assert_close(r["logits"], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pp", "wanda-sp", "flap"])
def test_ranks_keep_what_one_process_keeps_with_shards(ranks, name):
    run, ratio = RUNS[name]
    one = run(random_model("llama-gqa"), ratio, shards=WORLD)
    assert set(one["kept"]) == set(ranks[name][0]["kept"]) and len(one["kept"]) == 8
    counts = set()
    for site, kept in one["kept"].items():
        units = (4 if site.endswith("attention") else 128) // WORLD  # per rank
        for rank, r in enumerate(ranks[name]):  # rank r's units are the r-th run of the block's
            assert torch.equal(r["kept"][site] + rank * units, kept[kept // units == rank])
        counts.add(tuple(len(r["kept"][site]) for r in ranks[name]))
        if site not in one["history"]:  # a static policy keeps none
            continue
        channels = one["history"][site].shape[-1] // WORLD  # each rank's history: its channels' columns
        for rank, r in enumerate(ranks[name]):
            torch.testing.assert_close(r["history"][site], one["history"][site][:, rank * channels:(rank + 1) * channels])
    # FLAP's global threshold gives ranks different counts somewhere; the others split evenly
    assert any(len(set(c)) > 1 for c in counts) == (name == "flap")
    for r in ranks[name]:
        torch.testing.assert_close(r["logits"], one["logits"], rtol=1e-4, atol=1e-4)


def test_generation_on_ranks_equals_one_process_with_shards(ranks):
    one = _generate(random_model("llama-gqa"), 0.4, shards=WORLD)
    for r in ranks["generate"]:
        assert torch.equal(r["tokens"], one["tokens"])
        assert set(r["kept"]) == set(one["kept"]) and len(one["kept"]) == 8


def test_a_block_that_does_not_split_is_refused_before_any_weight_changes():
    model = random_model("llama-gqa", num_key_value_heads=1)  # 1 K/V head over 2 ranks (shard() asks only these)

    original = model.model.layers[1].self_attn.k_proj.weight.clone()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dist, "get_rank", lambda group=None: 0)
        m.setattr(dist, "get_world_size", lambda group=None: WORLD)
        with pytest.raises(ValueError, match="k_proj: its 1 heads/channels do not split evenly over 2 ranks"):
            tp.shard(model)
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, original)

"""Tensor parallelism (tp.py) on CPU: two gloo ranks, spawned, each running the pass on its shard
of a tiny LLaMA (4 heads, 2 K/V heads, 128 MLP channels): ratio 0 is the single-process dense
model, and pp, wanda-sp and flap on ranks keep exactly what one process keeps with shards=2
(indices, logits, histories; FLAP's counts differ between ranks), and generate its tokens. And a
LLaMA whose attention does not split over two ranks (6 heads, 3 K/V heads, hidden 96): its attention stays
whole on every rank, its MLPs split, and the ranks keep what one process keeps."""
import os
import socket
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppcompile as pp
from ppcompile import tp
from ppcompile.passes.static import shard_group
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
            "history": {site: t.clone() for site, t in runtime.tables.items()}}


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


def _uneven_model():
    """3 K/V heads (6 query heads of 16) do not split over 2 ranks; 128 MLP channels do."""
    return random_model("llama-gqa", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)


# on _uneven_model, whose attention tp.shard replicates: what each run is checked against
UNEVEN = {"uneven dense": (_run, 0.0, {}), "uneven attention": (_run, 0.4, {"blocks": "attention"}),
          "uneven mlp": (_run, 0.4, {"blocks": "mlp"}), "uneven both": (_run, 0.4, {}),
          "uneven generate": (_generate, 0.4, {"blocks": "mlp"})}


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    runs = [(name, run, ratio, {}, random_model) for name, (run, ratio) in RUNS.items()]
    runs += [(name, run, ratio, options, None) for name, (run, ratio, options) in UNEVEN.items()]
    try:
        for name, run, ratio, options, even in runs:
            torch._dynamo.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the uneven model's "attention replicated", checked below
                model = tp.shard(random_model("llama-gqa") if even else _uneven_model())
            torch.save(run(model, ratio, **options), os.path.join(folder, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Every run of RUNS and UNEVEN on two ranks: name -> each rank's result."""
    folder = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(folder)), nprocs=WORLD, join=True)
    return {name: [torch.load(folder / f"{name}_{r}.pt") for r in range(WORLD)] for name in [*RUNS, *UNEVEN]}


@pytest.mark.slow  # spawns ranks
def test_ratio_zero_on_two_ranks_is_the_dense_model(ranks):
    with torch.no_grad():
        dense = random_model("llama-gqa")(_batches()[-1]).logits
    for r in ranks["dense"]:
        torch.testing.assert_close(r["logits"], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # spawns ranks
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


@pytest.mark.slow  # spawns ranks
def test_generation_on_ranks_equals_one_process_with_shards(ranks):
    one = _generate(random_model("llama-gqa"), 0.4, shards=WORLD)
    for r in ranks["generate"]:
        assert torch.equal(r["tokens"], one["tokens"])
        assert set(r["kept"]) == set(one["kept"]) and len(one["kept"]) == 8


def _one_rank_of_two(m: pytest.MonkeyPatch) -> None:
    """shard() as rank 0 of 2 would run it, in this process (it asks only these two)."""
    m.setattr(dist, "get_rank", lambda group=None: 0)
    m.setattr(dist, "get_world_size", lambda group=None: WORLD)


def test_a_block_that_does_not_split_is_refused_before_any_weight_changes_when_asked():
    model = random_model("llama-gqa", num_key_value_heads=1)  # 1 K/V head over 2 ranks
    original = model.model.layers[1].self_attn.k_proj.weight.clone()
    with pytest.MonkeyPatch.context() as m:
        _one_rank_of_two(m)
        with pytest.raises(ValueError, match="model.layers.0.attention: 1 K/V heads do not split over 2 ranks; "
                                             "pass uneven='replicate'"):
            tp.shard(model, uneven="raise")
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, original)
    assert model.model.layers[1].mlp.up_proj.weight.shape == (128, 64)  # the MLPs, which split, untouched too


def test_an_attention_that_does_not_split_stays_whole_and_the_mlps_split():
    model = _uneven_model()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, up, down = attn.q_proj.weight.clone(), mlp.up_proj.weight.clone(), mlp.down_proj.weight.clone()
    with pytest.MonkeyPatch.context() as m:
        _one_rank_of_two(m)
        with pytest.warns(UserWarning, match=r"3 K/V heads do not split over 2 ranks: attention replicated .*"
                                             r"5 blocks, model.layers.0.attention ... model.layers.4.attention"):
            tp.shard(model)
    assert torch.equal(attn.q_proj.weight, q) and not attn.o_proj._forward_hooks  # whole, no all-reduce
    assert torch.equal(mlp.up_proj.weight, up[:64]) and torch.equal(mlp.down_proj.weight, down[:, :64])  # rank 0's
    assert len(mlp.down_proj._forward_hooks) == 1
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 3)  # the cache's: whole
    why = {b.name: b.replicated for b in model.tp_blocks}
    assert len(why) == 10 and why["model.layers.2.attention"].startswith("3 K/V heads do not split over 2 ranks")
    assert why["model.layers.2.mlp"] == ""


def test_a_static_policy_refuses_sharded_and_replicated_blocks_together():
    sharded, whole = (SimpleNamespace(name=n, all_reduce=g) for n, g in (("l.mlp", "0"), ("l.attention", None)))
    assert shard_group([sharded]) == "0" and shard_group([whole]) is None
    with pytest.raises(ValueError, match="l.attention is replicated .* use policy 'pp'"):
        shard_group([sharded, whole])


@pytest.mark.slow  # spawns ranks
def test_uneven_ratio_zero_on_two_ranks_is_the_dense_model(ranks):
    with torch.no_grad():
        dense = _uneven_model()(_batches()[-1]).logits
    for r in ranks["uneven dense"]:
        torch.testing.assert_close(r["logits"], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # spawns ranks
@pytest.mark.parametrize("name, shards", [("uneven attention", 1), ("uneven mlp", WORLD)])
def test_uneven_ranks_keep_what_one_process_keeps(ranks, name, shards):
    """A replicated attention keeps on every rank what one process keeps of the whole block; a
    sharded MLP what one process keeps with shards=2."""
    run, ratio, options = UNEVEN[name]
    one = run(_uneven_model(), ratio, shards=shards, **options)
    assert len(one["kept"]) == 4 and set(one["kept"]) == set(ranks[name][0]["kept"])
    for site, kept in one["kept"].items():
        units = 6 if site.endswith("attention") else 128 // WORLD  # per rank: all heads, or its channels
        for rank, r in enumerate(ranks[name]):
            mine = kept if shards == 1 else kept[kept // units == rank] - rank * units
            assert torch.equal(r["kept"][site], mine)
    for r in ranks[name]:
        torch.testing.assert_close(r["logits"], one["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # spawns ranks
def test_uneven_ranks_prune_the_replicated_attention_alike(ranks):
    """Both blocks pruned: every rank keeps the same heads of the whole attention (its input is the
    same on every rank), the first pruned one what one process keeps (its input is the dense
    layer 0's), and each rank its rule's share of its MLP channels."""
    r0, r1 = ranks["uneven both"]
    whole = _run(_uneven_model(), 0.4)["kept"]["model.layers.1.attention"]
    config = pp.PPConfig(ratio=0.4, **{k: v for k, v in OPTIONS.items() if k in ("skip_layers", "mlp_multiple")})
    for site in r0["kept"]:
        if site.endswith("attention"):
            assert torch.equal(r0["kept"][site], r1["kept"][site]) and len(r0["kept"][site]) == config.kept_heads(6, 5)
        else:
            assert len(r0["kept"][site]) == len(r1["kept"][site]) == config.kept_channels(128 // WORLD, 5)
    assert torch.equal(r0["kept"]["model.layers.1.attention"], whole)
    torch.testing.assert_close(r0["logits"], r1["logits"], rtol=0, atol=0)


@pytest.mark.slow  # spawns ranks
def test_uneven_generation_on_ranks_equals_one_process_with_shards(ranks):
    """The static KV cache of a replicated attention sizes itself from the whole head counts."""
    run, ratio, options = UNEVEN["uneven generate"]
    one = run(_uneven_model(), ratio, shards=WORLD, **options)
    for r in ranks["uneven generate"]:
        assert torch.equal(r["tokens"], one["tokens"])

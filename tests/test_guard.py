"""ppcompile.guard: a bench's check that what it measured ran pruned, on tiny random models."""
import warnings

import pytest
import torch

import ppcompile as pp
from ppcompile.guard import NotPruned, assert_pruned, problems
from ppcompile.models import random_model

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _batch(b, L, seed=0):
    return torch.randint(0, 128, (b, L), generator=torch.Generator().manual_seed(seed))


def test_a_pruned_model_passes_and_its_counts_come_back():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad():
        c(_batch(2, 12))
        c(_batch(3, 9, 1))
    pruned_layers = model.config.num_hidden_layers - 1  # layer 0 skipped; an attention and an MLP each
    assert assert_pruned(c, method="pp") == {"pruned_calls": 2, "unpruned_calls": 0, "dense_by_cost_calls": 0,
                                             "graph_runs": 2,
                                             "site_runs": 2 * 2 * pruned_layers}
    assert problems(model) == []  # the model itself: its last compile's session


def test_a_call_dynamo_ran_unpruned_is_an_error_naming_the_method_and_the_count():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        c(_batch(2, 12))
        with pytest.warns(UserWarning, match="recompile limit"):
            c(_batch(1, 12))  # batch 1 needs a second graph, which the limit forbids: the original forward ran
    assert model.pp.runtime.counts["unpruned_calls"] == 1
    with pytest.raises(NotPruned, match=r"(?s)pp-static \(ratio 0.4\).*1 of 2 calls ran the original, unpruned forward"):
        assert_pruned(c, method="pp-static")


def test_no_call_through_the_pass_is_an_error():
    c = pp.compile(random_model("llama-gqa"), 0.4, backend="eager", **TINY)
    with pytest.raises(NotPruned, match="no call ran through the pass"):
        assert_pruned(c)


def test_a_block_left_dense_is_an_error_unless_expected():
    """Attention written out (no sdpa) stays dense while every MLP prunes: the calls count as
    pruned, but the attention blocks of the pruned layers are not."""
    model = random_model("llama-gqa", attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pass's own warning names the dense blocks
        c = pp.compile(model, 0.4, backend="eager", **TINY)
        with torch.no_grad():
            c(_batch(2, 12))
    assert model.pp.runtime.counts["unpruned_calls"] == 0 and model.pp.runtime.counts["pruned_calls"] == 1
    attention = [f"model.layers.{i}.attention" for i in range(1, model.config.num_hidden_layers)]
    found = problems(c)
    assert [line.split(" ")[0] for line in found] == attention  # layer 0 is skipped: dense by the config
    assert all("attention without scaled_dot_product_attention" in line for line in found)
    with pytest.raises(NotPruned, match=r"(?s)pp \(ratio 0.4\).*model.layers.1.attention \(forward graph\)"):
        assert_pruned(c, method="pp")
    assert assert_pruned(c, expect_dense=attention)["pruned_calls"] == 1
    with pytest.raises(NotPruned, match="model.layers.4.attention"):
        assert_pruned(c, expect_dense=attention[:-1])


def test_blocks_the_config_leaves_dense_are_not_errors():
    model = random_model("llama-gqa")
    mlp_only = pp.compile(model, 0.4, backend="eager", blocks="mlp", **TINY)
    dense = pp.compile(random_model("llama-gqa"), 0.0, policy="dense", backend="eager")
    with torch.no_grad():
        mlp_only(_batch(2, 12))
        dense(_batch(2, 12))
    assert problems(mlp_only) == [] and problems(dense) == []
    assert {r["status"] for r in mlp_only.pp.summary() if r["kind"] == "attention" and r["layer"]} == {"dense: blocks=mlp"}


def test_a_model_ppcompile_did_not_compile_is_a_type_error():
    with pytest.raises(TypeError, match="not compiled by ppcompile"):
        assert_pruned(random_model("llama-gqa"))

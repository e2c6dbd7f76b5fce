"""ppcompile.passes.cost: where compact weights cannot pay, a forward graph leaves the site dense;
a dynamic graph guards the decision, so a call across it compiles its own graph."""
import pytest
import torch

import ppcompile as pp
from ppcompile.config import PPConfig
from ppcompile.models import random_model
from ppcompile.passes import cost

TINY = dict(skip_layers=(0,), mlp_multiple=16, backend="eager")  # llama-gqa: hidden 64, MLP 128, 4 heads of 16


def _ids(b, L, seed=0):
    return torch.randint(0, 128, (b, L), generator=torch.Generator().manual_seed(seed))


def _by_hand_pays(kind: str, kept: int, c: int, b: int, L: int) -> bool:
    """The rule of cost.py for the tiny llama's blocks, from their sizes written out."""
    if kind == "mlp":  # 128 channels, down projection 128 -> 64
        units, width, d_out, channels = 128, 1, 64, 128
    else:  # 4 heads of 16, o_proj 64 -> 64
        units, width, d_out, channels = 4, 16, 64, 64
    saved = b * L * (units - kept) * width * d_out
    overhead = c * (kept * width * d_out + cost.FIXED + (b * L + L) * channels / 4)
    return saved > overhead


def _statuses(model):
    return {s.name: (s.kind, s.kept, str(s.status)) for s in model.pp.passes[-1].sites if s.layer > 0}


@pytest.mark.parametrize("c, b, L", [(1, 1, 8), (1, 2, 12), (1, 8, 64), (4, 8, 64), (1, 16, 128)])
def test_the_sites_left_dense_are_those_the_rule_written_out_says_cannot_pay(c, b, L):
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=c, dynamic=False, **TINY)
    with torch.no_grad():
        compiled(_ids(b, L))
    for name, (kind, k, status) in _statuses(compiled).items():
        if status == "pruned":
            assert _by_hand_pays(kind, k, c, b, L), name
        else:
            assert status.startswith("dense: pruning cannot pay at"), status
            full = model.config.num_attention_heads if kind == "attention" else model.config.intermediate_size
            kept_if_pruned = PPConfig(ratio=0.4, skip_layers=(0,), mlp_multiple=16).kept_units(
                kind, full, model.config.num_hidden_layers)
            assert not _by_hand_pays(kind, kept_if_pruned, c, b, L), name


def test_a_call_too_small_to_pay_runs_the_dense_model_and_a_larger_one_compiles_a_pruned_graph():
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=1, **TINY)
    small, large = _ids(1, 8), _ids(8, 64, 1)
    with torch.no_grad():
        dense_small = model(small).logits
        with pytest.warns(UserWarning, match="pruning cannot pay at batch 1 x length 8"):
            out = compiled(small).logits
        torch.testing.assert_close(out, dense_small)  # every block dense: the dense model's numbers
        assert model.pp.runtime.counts["dense_by_cost_calls"] == 1
        assert model.pp.runtime.counts["site_runs"] == 0
        compiled(large)  # past the guard: a graph of its own, every block pruned
        assert len(model.pp.passes) == 2
        assert all(s.pruned for s in model.pp.passes[-1].sites if s.layer > 0)
        assert model.pp.runtime.counts["pruned_calls"] == 1
        compiled(_ids(1, 8, 2))  # the small graph again: no third compile
    assert len(model.pp.passes) == 2
    assert model.pp.runtime.counts["dense_by_cost_calls"] == 2


def test_a_dynamic_graph_guards_the_decision_both_ways():
    """Compiled first at a size that pays, a dynamic graph must not serve a smaller call with
    pruned blocks that cannot pay there: Dynamo recompiles it at the guard."""
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=1, dynamic=True, **TINY)
    with torch.no_grad():
        compiled(_ids(8, 64))
        compiled(_ids(9, 60, 1))  # the same side of every guard: the same dynamic graph
        assert len(model.pp.passes) == 1
        with pytest.warns(UserWarning, match="pruning cannot pay"):
            compiled(_ids(2, 4, 2))
    assert len(model.pp.passes) == 2 and not model.pp.passes[-1].active_sites


def test_gather_cost_zero_prunes_at_every_size_and_prefill_ignores_the_rule():
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=0, dynamic=False, **TINY)
    with torch.no_grad():
        compiled(_ids(1, 4))
    assert all(s.pruned for s in model.pp.passes[-1].sites if s.layer > 0)
    # a prompt far too small to pay in a forward graph: generation's prefill and decode prune anyway
    torch._dynamo.reset()
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=1, **TINY)
    with torch.no_grad():
        compiled.generate(_ids(1, 4), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2,
                          do_sample=False, pad_token_id=0)
    phases = {r.phase: r for r in model.pp.passes}
    assert set(phases) == {"prefill", "decode"}
    for r in phases.values():
        assert not r.dense_by_cost and all(s.pruned for s in r.sites if s.layer > 0), r.phase


def test_auto_is_the_devices_default_unless_the_environment_sets_it(monkeypatch):
    w32, w16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16)
    monkeypatch.delenv("PPCOMPILE_GATHER_COST", raising=False)
    assert cost.gather_cost("auto", w32) == cost.AUTO_COST[("cpu", 4)]
    assert cost.gather_cost("auto", w16) == cost.AUTO_COST[("cpu", 2)]
    assert cost.gather_cost(7, w32) == 7
    monkeypatch.setenv("PPCOMPILE_GATHER_COST", "3")
    assert cost.gather_cost("auto", w32) == 3
    assert cost.gather_cost(7, w32) == 7  # a configured number wins


@pytest.mark.parametrize("bad", [-1, 1.5, "cheap", True])
def test_a_bad_gather_cost_is_an_error_naming_the_fix(bad):
    with pytest.raises((ValueError, TypeError), match="gather_cost must be 'auto' or an int >= 0"):
        PPConfig(gather_cost=bad)


def test_break_even_is_the_fewest_tokens_that_pay():
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=0, dynamic=False, **TINY)
    with torch.no_grad():
        compiled(_ids(1, 8))
    site = next(s for s in model.pp.passes[-1].sites if s.kind == "mlp" and s.layer > 0)
    tokens = cost.break_even(site, 2, 8)
    assert tokens % 8 == 0
    assert _by_hand_pays("mlp", site.kept, 2, tokens // 8, 8)
    assert not _by_hand_pays("mlp", site.kept, 2, tokens // 8 - 1, 8)


@pytest.mark.inductor
def test_with_inductor_the_guard_holds_beside_inductors_own():
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, gather_cost=1, skip_layers=(0,), mlp_multiple=16, quiet=True)
    small, large = _ids(1, 8), _ids(8, 64, 1)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="pruning cannot pay"):
            torch.testing.assert_close(compiled(small).logits, model(small).logits, rtol=1e-4, atol=1e-4)
        compiled(large)
        compiled(_ids(1, 8, 2))
    assert len(model.pp.passes) == 2 and model.pp.passes[-1].active_sites
    assert model.pp.runtime.counts["dense_by_cost_calls"] == 2 and model.pp.runtime.counts["pruned_calls"] == 1

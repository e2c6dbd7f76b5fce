"""pp.explain: the sites and FLOPs, the model untouched."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.probes import PROBES

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def test_explain_reports_sites_and_flops_and_leaves_the_model_alone():
    model = random_model("llama-gqa")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with FlopCounterMode(display=False) as counter:
            model(ids)
        e = pp.explain(model, ids, 0.4, **TINY)
        after = model(ids).logits
    assert torch.equal(before, after) and not hasattr(model, "pp")
    pruned = [r for r in e.rows if r["status"] == "pruned"]
    assert len(pruned) == 8 and not e.unmatched
    assert {r["kept"] for r in pruned if r["kind"] == "attention"} == {e.config.kept_heads(4, 5)}
    assert {r["kept"] for r in pruned if r["kind"] == "mlp"} == {e.config.kept_channels(128, 5)}
    assert e.flops["dense"] == counter.get_total_flops()
    assert 0 < e.flops["probe"] < e.flops["pruned"] < e.flops["dense"]
    assert "FLOPs per call" in str(e) and "model.layers.4.mlp" in str(e)


def test_explain_at_ratio_zero_with_the_dense_policy_costs_the_dense_flops():
    model = random_model("opt")
    ids = torch.randint(0, 128, (2, 10))
    e = pp.explain(model, {"input_ids": ids}, 0.0, policy="dense")
    assert e.flops["pruned"] == e.flops["dense"] and e.flops["probe"] == 0
    assert not [r for r in e.rows if r["status"] == "pruned"]


def _block_flops(B, L, hidden=64, heads=4, head_dim=16, kv_heads=4, mlp=128):
    """One layer's attention and MLP FLOPs as torch's counter counts them: 2 per multiply-add;
    attention's two matmuls over every (query, key) pair."""
    qkvo = hidden * head_dim * (2 * heads + 2 * kv_heads)
    attention = 2 * B * L * qkvo + 4 * B * heads * L * L * head_dim
    return attention + 2 * B * L * 3 * hidden * mlp


@pytest.mark.parametrize("probe", [p if p == pp.PPConfig().probe.name else pytest.param(p, marks=pytest.mark.slow)
                                   for p in PROBES])  # the default in the fast tier
def test_the_probe_stays_within_its_budget_at_every_batch_and_length(probe):
    model = random_model("llama-mha")
    budget = 0.03
    for B in (1, 2, 8, 16):
        for L in (64, 160):
            ids = torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(B * L))
            e = pp.explain(model, ids, 0.4, probe_budget=budget, probe=probe, **TINY)
            allowed = budget * 4 * _block_flops(B, L)  # layers 1..4 are pruned
            assert 0 < e.flops["probe"] <= allowed, (B, L)
            if B * L >= 512:  # far from the two-position floor: most of the budget is used
                assert e.flops["probe"] > 0.5 * allowed, (B, L)
            torch._dynamo.reset()

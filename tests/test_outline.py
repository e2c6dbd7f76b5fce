"""Outlining: a group of nodes becomes one invoke_subgraph call; identical groups share a subgraph."""
import torch
from torch import fx

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.passes import outline as outline_module
from ppcompile.passes.outline import Outliner

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _two_blocks(x, w1, w2):
    a = torch.relu(x @ w1).sum(0)
    b = torch.relu(x @ w2).sum(0)
    return a * 2 + b


def _traced(*example):
    gm = fx.symbolic_trace(_two_blocks)
    for n, t in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example):
        n.meta["example_value"] = t
    body = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return gm, body[:3], body[3:6]  # (matmul, relu, sum) of each block


def _outline_both(*example):
    gm, first, second = _traced(*example)
    outliner = Outliner(gm)
    assert outliner.outline(first, "a", "block") and outliner.outline(second, "b", "block")
    gm.graph.lint()
    gm.recompile()
    return gm


def test_identical_groups_share_one_subgraph_and_values_are_unchanged():
    x, w1, w2 = torch.randn(5, 4), torch.randn(4, 3), torch.randn(4, 3)
    gm = _outline_both(x, w1, w2)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 2 and len(dict(gm.named_children())) == 1
    assert calls[0].args[0].target == calls[1].args[0].target
    torch.testing.assert_close(gm(x, w1, w2), _two_blocks(x, w1, w2))


def test_groups_with_other_input_shapes_get_their_own_subgraph():
    x, w1, w2 = torch.randn(5, 4), torch.randn(4, 3), torch.randn(4, 6)
    gm = _outline_both(x, w1, w2)  # not run: (3,) and (6,) do not add
    assert len(dict(gm.named_children())) == 2


def test_a_group_that_reads_a_non_tensor_value_stays_inline():
    gm, first, _ = _traced(torch.randn(5, 4), 3, torch.randn(4, 3))  # w1 recorded as an int
    before = [n.name for n in gm.graph.nodes]
    assert not Outliner(gm).outline(first, "a", "block")
    assert [n.name for n in gm.graph.nodes] == before


def test_every_pruned_layer_calls_one_subgraph_per_block_kind_and_results_match_inline(monkeypatch):
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for outline in (True, False):
        torch._dynamo.reset()
        if not outline:
            monkeypatch.setattr(outline_module.Outliner, "outline", lambda *a: False)
        model = random_model("llama-gqa")
        c = pp.compile(model, 0.4, backend="eager", **TINY)
        with torch.no_grad():
            c(ids)
            logits = c(ids).logits
        runs.append((logits, model.pp.runtime.last_selection(), model.pp.passes[-1]))
    (outlined, kept_o, result), (inline, kept_i, _) = runs
    subgraphs = sorted(name for name, _ in result.gm.named_children())
    assert subgraphs == ["pp_attention_select_0", "pp_mlp_select_1"]
    calls = [n for n in result.gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == len(result.selected_sites) == 2 * (result.n_layers - 1)
    assert {k: v.tolist() for k, v in kept_o.items()} == {k: v.tolist() for k, v in kept_i.items()}
    torch.testing.assert_close(outlined, inline, rtol=0, atol=0)

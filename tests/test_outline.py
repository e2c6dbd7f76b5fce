"""Outlining: a group of nodes becomes one invoke_subgraph call; identical groups share a subgraph."""
import copy

import pytest
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


def test_a_group_whose_input_is_made_after_its_first_node_stays_inline():
    gm, first, second = _traced(torch.randn(5, 4), torch.randn(4, 3), torch.randn(4, 3))
    before = [n.name for n in gm.graph.nodes]
    # first[0] and second's sum: the call would stand before the relu of `second` that feeds it
    assert not Outliner(gm).outline([first[0], second[2]], "a", "block")
    assert [n.name for n in gm.graph.nodes] == before


def _named_graph(*steps):
    """A graph of `steps` ((name, op) in order, each op reading the previous node): the names say
    the layer (through the site tag `layer_N_mlp`), as they do for the nodes the pass makes."""
    g = fx.Graph()
    node = g.placeholder("x")
    for name, op in steps:
        node = g.call_function(op, (node,))
        node.name = name
    g.output(node)
    return g


# relu_ writes its input (its schema says so); a collective's order is every rank's
@pytest.mark.parametrize("cut", [torch.ops.aten.relu_.default, torch.ops._c10d_functional.wait_tensor.default])
def test_layer_segments_group_a_layers_nodes_and_cut_at_every_write_in_place_and_collective(cut):
    layer_of_site = {"layer_0_mlp": "layer_0", "layer_1_mlp": "layer_1"}
    relu = torch.relu
    g = _named_graph(*[(f"layer_0_mlp_{i}", relu) for i in range(5)], ("layer_0_mlp_update", cut),
                     *[(f"layer_0_mlp_after_{i}", relu) for i in range(2)],  # too few to share
                     *[(f"layer_1_mlp_{i}", relu) for i in range(4)], ("other", relu))
    segments = outline_module.layer_segments(g, layer_of_site)
    assert [([n.name for n in nodes], tag) for nodes, tag in segments] == [
        ([f"layer_0_mlp_{i}" for i in range(5)], "layer_0"), ([f"layer_1_mlp_{i}" for i in range(4)], "layer_1")]


def _copy_into(g, buf, node):
    return g.call_function(torch.ops.aten.copy_.default, (buf, node))


def _graph_writing_an_input(*, view_first: bool, read_after: bool, write=_copy_into):
    """x -> three relus -> (buf written in place with the last) -> three relus; `view_first` adds a
    view of buf to the layer before the write, `read_after` a node reading buf after it."""
    g = fx.Graph()
    x, buf = g.placeholder("x"), g.placeholder("buf")
    x.meta["val"], buf.meta["val"] = torch.randn(4), torch.zeros(4)
    node = x
    names = [f"layer_0_mlp_{i}" for i in range(6)]
    for i, name in enumerate(names):
        if i == 3:
            if view_first:
                view = g.call_function(torch.Tensor.view, (buf, 4))
                view.name = "layer_0_mlp_view"
            write(g, buf, node).name = "layer_0_mlp_store"
            if read_after:
                node = g.call_function(torch.add, (node, buf))
                node.name = "layer_0_mlp_read"
        node = g.call_function(torch.relu, (node,))
        node.name = name
    g.output(node)
    return g


@pytest.mark.parametrize("view_first, read_after, expected", [
    (False, False, [[f"layer_0_mlp_{i}" for i in range(6)]]),  # one segment across the write
    # reading buf after the write starts a new segment (the three nodes before are too few)
    (False, True, [["layer_0_mlp_read"] + [f"layer_0_mlp_{i}" for i in range(3, 6)]]),
    (True, False, [[f"layer_0_mlp_{i}" for i in range(3)] + ["layer_0_mlp_view"]]),  # a view of buf ends it
])
def test_a_write_of_a_graph_input_stays_outside_and_the_segment_goes_on_unless_it_reads_what_was_written(
        view_first, read_after, expected):
    g = _graph_writing_an_input(view_first=view_first, read_after=read_after)
    segments = outline_module.layer_segments(g, {"layer_0_mlp": "layer_0"})
    assert [[n.name for n in nodes] for nodes, _ in segments] == expected
    assert all(tag == "layer_0" for _, tag in segments)
    # outlined and run, the write still lands in buf, and the output is the inline graph's
    x = torch.randn(4)
    inline, buf_inline = fx.GraphModule(torch.nn.Module(), g), torch.zeros(4)
    want = inline(x, buf_inline)
    gm = outline_module.outlined(fx.GraphModule(torch.nn.Module(), copy.deepcopy(g)), [], {"layer_0_mlp": "layer_0"})
    buf = torch.zeros(4)
    torch.testing.assert_close(gm(x, buf), want, rtol=0, atol=0)
    torch.testing.assert_close(buf, buf_inline, rtol=0, atol=0)
    assert any(n.target is torch.ops.higher_order.invoke_subgraph for n in gm.graph.nodes)


def _copy_through(op):
    def write(g, buf, node):
        target = g.call_function(op, (buf, [4]) if op is torch.ops.aten.view.default else (buf,))
        target.name = "of_buf"  # untagged: in no layer
        return g.call_function(torch.ops.aten.copy_.default, (target, node))
    return write


# a write into a view of a graph input writes that input (a history's update through its (L, H,
# head_dim) view); into a copy of one, it writes no input: it cuts (3 and 3 nodes: too few each)
@pytest.mark.parametrize("op, expected", [
    (torch.ops.aten.view.default, [[f"layer_0_mlp_{i}" for i in range(6)]]), (torch.ops.aten.clone.default, [])])
def test_a_write_into_a_view_of_a_graph_input_is_a_write_of_that_input(op, expected):
    g = _graph_writing_an_input(view_first=False, read_after=False, write=_copy_through(op))
    segments = outline_module.layer_segments(g, {"layer_0_mlp": "layer_0"})
    assert [[n.name for n in nodes] for nodes, _ in segments] == expected


def test_a_collective_that_writes_a_graph_input_still_cuts():
    g = _graph_writing_an_input(view_first=False, read_after=False, write=lambda g, buf, node: g.call_function(
        torch.ops._c10d_functional.all_reduce_.default, (buf, "sum", "0")))
    assert outline_module.layer_segments(g, {"layer_0_mlp": "layer_0"}) == []  # 3 and 3: too few each


def _run(model, ids, backend):
    c = pp.compile(model, 0.4, backend=backend, **TINY)
    with torch.no_grad():
        c(ids)  # the second call prunes with a history
        return c(ids).logits


def test_inductor_gets_each_pruned_layer_as_shared_segments_and_results_match_the_eager_route(monkeypatch):
    """Inductor's graph: every pruned layer after the first calls the same one segment (its history
    writes stay outside, after it); run as is (Inductor replaced by the graph's own forward), it
    gives the eager route's values."""
    import torch._inductor.compile_fx as compile_fx_module
    given = []
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, example: given.append(gm) or gm.forward)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for backend in ("inductor", "eager"):
        torch._dynamo.reset()
        model = random_model("llama-gqa")
        runs.append((_run(model, ids, backend), model.pp.runtime.last_selection(), model.pp.passes[-1]))
    (layered, kept_l, result), (inline, kept_i, _) = runs
    assert {k: v.tolist() for k, v in kept_l.items()} == {k: v.tolist() for k, v in kept_i.items()}
    torch.testing.assert_close(layered, inline, rtol=0, atol=0)
    gm = given[-1]
    assert gm is result.compiled and gm is not result.gm
    assert all(name.startswith("pp_layer_segment_") for name, _ in gm.named_children())
    called = {}  # layer -> the subgraphs its calls run, in order
    for n in gm.graph.nodes:
        if n.target is torch.ops.higher_order.invoke_subgraph:
            called.setdefault(int(n.name.split("_")[2]), []).append(n.args[1])
    pruned = range(1, result.n_layers)
    assert set(called) == set(range(result.n_layers)) and all(len(called[i]) == 1 for i in pruned)
    updates = [n for n in gm.graph.nodes if n.name.endswith("_history_update")]
    assert len(updates) == len(result.selected_sites)  # outside every segment, each after its layer's call
    # each writes a graph input, through its view by units (as ops.units) where it writes kept units
    assert all(n.args[0].op == "placeholder" or n.args[0].args[0].op == "placeholder" for n in updates)
    # one copy of a pruned layer's code (the first one's reads what a dense layer left: its own)
    assert all(called[i] == called[2] for i in pruned[1:]) and len(dict(gm.named_children())) <= 5
    assert not any(s.final._erased for s in result.sites)  # the result's graph is whole: explain reads it


def test_the_eager_route_outlines_each_selection_once_per_block_kind():
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    model = random_model("llama-gqa")
    _run(model, ids, "eager")
    result = model.pp.passes[-1]
    assert sorted(name for name, _ in result.gm.named_children()) == ["pp_attention_select_0", "pp_mlp_select_1"]
    calls = [n for n in result.gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == len(result.selected_sites) == 2 * (result.n_layers - 1)


def test_nothing_is_outlined_for_inductors_cpp_wrapper_which_cannot_call_a_subgraph(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module
    given = []
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, example: given.append(gm) or gm.forward)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    model = random_model("llama-gqa")
    with torch._inductor.config.patch(cpp_wrapper=True):
        inline = _run(model, ids, "inductor")
    assert not any(n.target is torch.ops.higher_order.invoke_subgraph for n in given[-1].graph.nodes)
    assert len(model.pp.passes[-1].selected_sites) == 2 * (model.pp.passes[-1].n_layers - 1)
    torch._dynamo.reset()
    torch.testing.assert_close(inline, _run(random_model("llama-gqa"), ids, "eager"), rtol=0, atol=0)


@pytest.mark.inductor
def test_inductors_cpp_wrapper_compiles_and_runs_a_pruned_model():
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    model = random_model("llama-gqa")
    with torch._inductor.config.patch(cpp_wrapper=True):
        got = _run(model, ids, "inductor")
    assert model.pp.runtime.counts["graph_runs"] == 2 and model.pp.passes[-1].selected_sites
    torch._dynamo.reset()
    torch.testing.assert_close(got, _run(random_model("llama-gqa"), ids, "eager"), rtol=1e-4, atol=1e-4)

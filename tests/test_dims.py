"""Dimension rules: one tiny graph per registered rule, its labels worked out by hand."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from ppcompile.passes import opsets, sites
from ppcompile.passes.dims import RULES, Atom, Labeler, Labels, Unsupported, anon, dim_rule

B, S, H, C = Atom("b", 2), Atom("s", 3), Atom("h", 4), Atom("c", 8)  # batch, sequence, heads, channels
D = Atom(None, 6)  # a head's width: never resized
BSC: Labels = ((B,), (S,), (C,))  # (B, L, C)
BHSD: Labels = ((B,), (H,), (S,), (D,))  # (B, H, L, D)

COVERED: set[str] = set()  # the rules some test below labels a node with


def covers(rule: str):
    """Mark a test as one of `rule`'s (test_every_rule_has_a_test reads the marks)."""
    def mark(test):
        COVERED.add(rule)
        return test
    return mark


class _Record(fx.Interpreter):
    """Runs a traced graph and keeps each node's value in its meta, as Dynamo's graphs have them."""

    def run_node(self, n):
        out = super().run_node(n)
        n.meta["val"] = out
        return out


def run(fn, start: dict[str, Labels], **inputs) -> tuple[Labeler, fx.Node]:
    """Trace `fn`, record its nodes' values on `inputs` (by argument name), label from `start`
    (argument name -> labels): the labeler and the node `fn` returns."""
    gm = fx.symbolic_trace(fn)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    by_name = {n.name: n for n in nodes}
    _Record(gm).run(*(inputs[n.name] for n in nodes if n.op == "placeholder"))
    lab = Labeler({by_name[name]: labels for name, labels in start.items()}).run(nodes)
    return lab, next(n for n in gm.graph.nodes if n.op == "output").args[0]


def labels(rule: str, fn, start: dict[str, Labels], **inputs) -> Labels:
    """The labels `rule` gives the node `fn` returns (checking that it is that rule's node)."""
    lab, out = run(fn, start, **inputs)
    assert RULES[out.target].__name__ == rule
    return lab.labels[out]


# ---- the registry ----

@pytest.mark.parametrize("rule", sorted({r.__name__ for r in RULES.values()}))
def test_every_rule_has_a_test(rule):
    assert rule in COVERED


def test_a_spelling_has_one_rule():
    with pytest.raises(ValueError, match="already has the rule broadcast"):
        dim_rule(torch.mul, torch.cumsum)(lambda labeler, n: ())
    assert torch.cumsum not in RULES  # nothing registered by the refused rule


def test_an_op_without_a_rule_is_unsupported():
    with pytest.raises(Unsupported, match=r"op cumsum \(cumsum\) has no dimension rule"):
        run(lambda x: torch.cumsum(x, 1), {"x": BSC}, x=torch.randn(2, 3, 8))


def test_spellings_of_an_op():
    assert opsets.spellings("div", "operator=truediv torch method") == {operator.truediv, torch.div, "div"}
    assert opsets.spellings("_softmax", "aten") == {torch.ops.aten._softmax.default}
    assert opsets.ops("permute") == {"permute", torch.permute, torch.Tensor.permute}
    assert opsets.WRITES == set(sites._WRITES)  # the write rule covers every write sites follows


# ---- one test (or a few) per rule ----

@covers("reshape")
def test_reshape_splits_and_merges_atoms():
    x = torch.randn(2, 3, 24)  # (B, L, H*D)
    hd = ((B,), (S,), (H, D))
    assert labels("reshape", lambda x: x.view(2, 3, 4, 6), {"x": hd}, x=x) == ((B,), (S,), (H,), (D,))
    assert labels("reshape", lambda x: torch.reshape(x, (6, 24)), {"x": hd}, x=x) == ((B, S), (H, D))
    x4 = torch.randn(2, 3, 4, 6)  # (B, L, H, D)
    assert labels("reshape", lambda x: x.flatten(2), {"x": ((B,), (S,), (H,), (D,))}, x=x4) == hd
    # an anonymous size splits: 12 -> (2, 6)
    assert labels("reshape", lambda x: x.view(2, 3, 2, 6), {"x": ((B,), (S,), anon(12))}, x=torch.randn(2, 3, 12)) \
        == ((B,), (S,), anon(2), anon(6))


@covers("reshape")
def test_reshape_never_splits_a_named_atom():
    with pytest.raises(Unsupported, match="splits a batch/sequence/head"):
        run(lambda x: x.view(2, 3, 2, 12), {"x": ((B,), (S,), (H, D))}, x=torch.randn(2, 3, 24))


def test_view_as_a_submodule_has_no_rule():
    """"view" names the method on a call_method node only (a call_module's target is a submodule)."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.randn(2, 3, 24)  # (B, L, H*D)
    m = g.call_module("view", (x,))
    m.meta["val"] = torch.randn(2, 3, 4, 6)
    with pytest.raises(Unsupported, match="has no dimension rule"):
        Labeler({x: ((B,), (S,), (H, D))}).run([m])


@covers("transpose")
def test_transpose_swaps_two_dims():
    x = torch.randn(2, 4, 3, 6)  # (B, H, L, D)
    assert labels("transpose", lambda x: x.transpose(1, 2), {"x": BHSD}, x=x) == ((B,), (S,), (H,), (D,))
    assert labels("transpose", lambda x: torch.transpose(x, -1, -2), {"x": BHSD}, x=x) == ((B,), (H,), (D,), (S,))


@covers("permute")
def test_permute_reorders_dims():
    x = torch.randn(2, 4, 3, 6)  # (B, H, L, D)
    want = ((B,), (S,), (H,), (D,))
    assert labels("permute", lambda x: x.permute(0, 2, 1, 3), {"x": BHSD}, x=x) == want
    assert labels("permute", lambda x: torch.permute(x, (0, 2, 1, 3)), {"x": BHSD}, x=x) == want


@covers("unsqueeze")
def test_unsqueeze_adds_an_empty_dim():
    x = torch.randn(2, 3, 8)  # (B, L, C)
    assert labels("unsqueeze", lambda x: x.unsqueeze(1), {"x": BSC}, x=x) == ((B,), (), (S,), (C,))
    assert labels("unsqueeze", lambda x: torch.unsqueeze(x, -1), {"x": BSC}, x=x) == BSC + ((),)


@covers("expand")
def test_expand_grows_only_empty_dims():
    x = torch.randn(2, 1, 3, 6)  # (B, 1, L, D): K/V heads repeated for GQA
    start = {"x": ((B,), (), (S,), (D,))}
    assert labels("expand", lambda x: x.expand(2, 4, 3, 6), start, x=x) == ((B,), anon(4), (S,), (D,))
    assert labels("expand", lambda x: x.expand(5, 2, 1, 3, 6), start, x=x) == (anon(5), (B,), (), (S,), (D,))
    with pytest.raises(Unsupported, match="expand of a labelled"):
        run(lambda x: x.expand(2, 3, 4), {"x": ((B,), (S,), (Atom("h", 1),))}, x=torch.randn(2, 3, 1))


@covers("getitem")
def test_getitem_keeps_whole_dims_and_cuts_anonymous_ones():
    x = torch.randn(2, 4, 3, 6)  # (B, H, L, D)
    assert labels("getitem", lambda x: x[..., 0], {"x": BHSD}, x=x) == BHSD[:3]
    assert labels("getitem", lambda x: x[..., :2], {"x": BHSD}, x=x) == BHSD[:3] + (anon(2),)
    assert labels("getitem", lambda x: x[:, None], {"x": BHSD}, x=x) == ((B,), ()) + BHSD[1:]
    with pytest.raises(Unsupported, match="slices or reduces"):
        run(lambda x: x[:, :, 1:], {"x": BHSD}, x=x)
    with pytest.raises(Unsupported, match="indexing with tensors"):
        run(lambda x, i: x[:, i], {"x": BHSD}, x=x, i=torch.tensor([0, 1]))


@covers("getitem")
def test_getitem_of_a_cache_cut_to_the_block_is_its_sequence():
    def fn(x, cache):
        return cache[:, :, :3]  # the first L = 3 of a static cache's 10 positions
    cache = torch.randn(2, 4, 10, 6)  # (B, H, max positions, D)
    start = {"x": BSC, "cache": ((B,), (H,), (Atom("s", 10),), (D,))}  # x's S (3) is the block's
    assert labels("getitem", fn, start, x=torch.randn(2, 3, 8), cache=cache) == BHSD


@covers("reduce")
def test_reduce_drops_or_keeps_anonymous_dims():
    x = torch.randn(2, 3, 8)  # (B, L, hidden)
    start = {"x": ((B,), (S,), anon(8))}
    assert labels("reduce", lambda x: x.mean(-1), start, x=x) == ((B,), (S,))
    assert labels("reduce", lambda x: x.sum(-1, keepdim=True), start, x=x) == ((B,), (S,), ())
    assert labels("reduce", lambda x: torch.mean(x, dim=2), start, x=x) == ((B,), (S,))
    with pytest.raises(Unsupported, match="full reduction"):
        run(lambda x: x.sum(), start, x=x)
    with pytest.raises(Unsupported, match="slices or reduces"):
        run(lambda x: x.mean(1), start, x=x)


@covers("sdpa")
def test_sdpa_takes_q_dims_and_v_width_and_gathers_the_mask():
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    kv = Atom("kv", 4)
    v_width = Atom(None, 5)  # v's head width differs from q's: the output has v's
    lab, out = run(fn, {"q": BHSD, "k": ((B,), (kv,), (S,), (D,)), "v": ((B,), (kv,), (S,), (v_width,))},
                   q=torch.randn(2, 4, 3, 6), k=torch.randn(2, 4, 3, 6), v=torch.randn(2, 4, 3, 5),
                   mask=torch.zeros(2, 1, 3, 3))  # (B, 1, queries, keys), from outside the block
    assert RULES[out.target].__name__ == "sdpa"
    assert lab.labels[out] == ((B,), (H,), (S,), (v_width,))
    assert lab.side == {(out, "attn_mask"): {0: "b", 2: "s", 3: "s"}}  # dim 1 broadcasts over heads
    assert lab.side_batch == {(out, "attn_mask"): 0}


@covers("cat")
def test_cat_joins_an_anonymous_dim():
    x = torch.randn(2, 3, 6)  # (B, L, D)
    start = {"x": ((B,), (S,), (D,)), "y": ((B,), (S,), (D,))}
    assert labels("cat", lambda x, y: torch.cat([x, y], -1), start, x=x, y=x) == ((B,), (S,), anon(12))
    with pytest.raises(Unsupported, match="slices or reduces"):
        run(lambda x, y: torch.cat([x, y], 1), start, x=x, y=x)
    # an empty operand from outside (a fresh cache) changes nothing
    assert labels("cat", lambda e, x: torch.cat([e, x], dim=1), {"x": start["x"]},
                  e=torch.empty(2, 0, 6), x=x) == ((B,), (S,), (D,))


@covers("stack")
def test_stack_adds_an_anonymous_dim():
    x = torch.randn(2, 3, 6)  # (B, L, D)
    start = {"x": ((B,), (S,), (D,)), "y": ((B,), (S,), (D,))}
    assert labels("stack", lambda x, y: torch.stack([x, y], -1), start, x=x, y=x) == ((B,), (S,), (D,), anon(2))
    with pytest.raises(Unsupported, match="laid out differently"):
        run(lambda x, y: torch.stack([x, y]), {"x": start["x"], "y": ((S,), (B,), (D,))}, x=x, y=x)


@covers("view_as_complex")
def test_view_as_complex_drops_the_pair_dim():
    x = torch.randn(2, 3, 4, 2)  # (B, L, D/2, 2)
    assert labels("view_as_complex", lambda x: torch.view_as_complex(x), {"x": ((B,), (S,), anon(4), anon(2))},
                  x=x) == ((B,), (S,), anon(4))


@covers("view_as_real")
def test_view_as_real_adds_the_pair_dim():
    z = torch.randn(2, 3, 4, dtype=torch.complex64)  # (B, L, D/2) complex
    assert labels("view_as_real", lambda z: torch.view_as_real(z), {"z": ((B,), (S,), anon(4))},
                  z=z) == ((B,), (S,), anon(4), anon(2))


@covers("broadcast")
def test_broadcast_labels_like_the_operands():
    x = torch.randn(2, 4, 3, 6)  # (B, H, L, D)
    per_batch = ((B,), (), (), (D,))  # (B, 1, 1, D), labelled too
    assert labels("broadcast", lambda x, y: x * y, {"x": BHSD, "y": per_batch},
                  x=x, y=torch.randn(2, 1, 1, 6)) == BHSD
    assert labels("broadcast", lambda x: F.silu(x), {"x": BSC}, x=torch.randn(2, 3, 8)) == BSC
    assert labels("broadcast", lambda x: F.layer_norm(x, (8,)), {"x": ((B,), (S,), anon(8))},
                  x=torch.randn(2, 3, 8)) == ((B,), (S,), anon(8))
    with pytest.raises(Unsupported, match="operands disagree"):
        run(lambda x, y: x + y, {"x": BSC, "y": ((B,), (S,), (Atom("h", 8),))},
            x=torch.randn(2, 3, 8), y=torch.randn(2, 3, 8))


@covers("broadcast")
def test_broadcast_records_side_inputs():
    x = torch.randn(2, 4, 3, 6)  # (B, H, L, D)
    lab, out = run(lambda x, cos: x * cos, {"x": BHSD}, x=x, cos=torch.randn(1, 1, 3, 6))  # rotary (1, 1, L, D)
    assert lab.labels[out] == BHSD
    assert lab.side == {(out, 1): {2: "s"}} and lab.side_batch == {(out, 1): 0}
    lab, out = run(lambda x, cos: x * cos, {"x": BHSD}, x=x, cos=torch.randn(3, 6))  # (L, D): no batch dim
    assert lab.side == {(out, 1): {0: "s"}} and lab.side_batch == {(out, 1): -2}
    lab, out = run(lambda x, w: x * w, {"x": BSC}, x=torch.randn(2, 3, 8), w=torch.randn(8))  # a channel scale
    assert lab.side == {(out, 1): {0: "c"}} and lab.side_batch == {}


@covers("write")
def test_write_labels_the_cache_like_what_it_holds():
    def fn(cache, pos, k):
        return cache.index_copy_(2, pos, k)
    kv = Atom("kv", 4)
    k_lab = ((B,), (kv,), (S,), (D,))  # (B, KV, L, D)
    lab, out = run(fn, {"k": k_lab}, cache=torch.zeros(2, 4, 10, 6), pos=torch.tensor([0, 1, 2]),
                   k=torch.randn(2, 4, 3, 6))
    assert RULES[out.target].__name__ == "write"
    want = ((B,), (kv,), (Atom("s", 10),), (D,))  # the written dim: as long as the cache, still "s"
    assert lab.labels[out] == want and lab.labels[out.args[0]] == want
    with pytest.raises(Unsupported, match="writes into a cache with copy_"):
        run(lambda cache, k: cache.copy_(k), {"k": k_lab}, cache=torch.zeros(2, 4, 3, 6), k=torch.randn(2, 4, 3, 6))

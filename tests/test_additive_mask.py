"""A boolean mask that several attentions read becomes additive once; their results are unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from ppcompile.models import random_model
from ppcompile.passes.additive_mask import additive_masks
from ppcompile.passes.sites import SDPA, sdpa_params


def _captured(model, ids, **kwargs):
    """(Dynamo's graph of model(ids), its example inputs)."""
    got = []

    def capture(gm, example):
        got.append((gm, example))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(ids, use_cache=False, **kwargs)
    return got[-1]


def _masks_read(gm):
    return [sdpa_params(n).get("attn_mask") for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_the_layers_read_one_additive_mask_and_give_the_same_logits(dtype, padded):
    model = random_model("llama-gqa", dtype=dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {}
    if padded:  # the second sequence left-padded by 5: its mask is not only causal
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][1, :5] = 0
    gm, example = _captured(model, ids, **kwargs)
    before = _masks_read(gm)
    assert len(before) == model.config.num_hidden_layers and len(set(before)) == 1
    assert before[0].meta["example_value"].dtype == torch.bool
    rewritten = copy.deepcopy(gm)
    assert additive_masks(rewritten.graph) == 1
    rewritten.recompile()
    after = _masks_read(rewritten)
    assert len(set(after)) == 1 and after[0].name.endswith("_additive")
    made = after[0].meta["example_value"]
    assert made.dtype == dtype and made.shape == before[0].meta["example_value"].shape
    with torch.no_grad():
        want, got = gm(*example), rewritten(*example)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_mask_only_one_attention_reads_is_left_as_it_is():
    model = random_model("llama-gqa", num_hidden_layers=1)
    gm, _ = _captured(model, torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)))
    code = gm.code
    assert additive_masks(gm.graph) == 0
    gm.recompile()
    assert gm.code == code


def _two_attentions(mask, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, mask) + F.scaled_dot_product_attention(q, k * 2, v, attn_mask=mask)


def test_a_mask_given_as_a_graph_input_read_by_position_and_by_name_is_made_additive_after_the_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    mask[..., 0] = True  # every query attends somewhere
    gm = fx.symbolic_trace(_two_attentions)
    for node, t in zip([n for n in gm.graph.nodes if n.op == "placeholder"], (mask, q, k, v)):
        node.meta["example_value"] = t
    assert additive_masks(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    nodes = list(gm.graph.nodes)
    made = next(n for n in nodes if n.name.endswith("_additive"))
    assert not any(n.op == "placeholder" for n in nodes[nodes.index(made):])  # the inputs come first
    assert _masks_read(gm) == [made, made]
    torch.testing.assert_close(gm(mask, q, k, v), _two_attentions(mask, q, k, v), rtol=0, atol=0)

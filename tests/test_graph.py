"""Graph helpers: a rewritten node's recorded value stays true; a stream of tokens is one sequence."""
import copy

import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.passes.sites import value
from ppcompile.runtime import Runtime
from reference import zero_pruned
from token_stream import TokenStream

TINY = dict(skip_layers=(0,), mlp_multiple=16)


@pytest.mark.parametrize("dynamic", [True, False])
def test_rewritten_nodes_record_their_compact_shapes(dynamic):
    model = random_model("llama-gqa")  # 4 heads of 16, 2 K/V heads, MLP 128
    c = pp.compile(model, 0.4, backend="eager", dynamic=dynamic, **TINY)
    with torch.no_grad():
        c(torch.randint(0, 128, (3, 10)))
    result = model.pp.passes[-1]
    cfg = model.pp.config
    heads, channels = cfg.kept_heads(4, 5), cfg.kept_channels(128, 5)
    for site in result.sites:
        if not site.pruned:
            continue
        width = heads * 16 if site.kind == "attention" else channels
        assert value(site.final.args[0]).shape[-1] == width, site.name  # the final projection's input
        assert value(site.final).shape[-1] == 64  # its output: the model's width, as before
        q = site.qkv["q"] if site.kind == "attention" else site.projections[0]
        assert value(q).shape[-1] == width, site.name
        if site.kind == "attention":  # K/V are kept whole (GQA)
            assert value(site.qkv["k"]).shape[-1] == 2 * 16



def test_a_stream_of_tokens_is_one_sequence_pruned_like_the_dense_model_without_the_dropped_channels():
    torch.manual_seed(0)
    model = TokenStream().eval()
    runtime = Runtime()
    options = {"ratio": 0.5, "skip_layers": (), "mlp_multiple": 16, "blocks": "mlp", "inductor": False, "quiet": True,
               "runtime": runtime}
    compiled = torch.compile(model, backend="ppcompile", dynamic=True, options=options)
    for tokens in (7, 11, 5):  # one graph for every length
        ids = torch.randint(0, 64, (tokens,))
        with torch.no_grad():
            out = compiled(ids)
        kept = runtime.last_selection()
        assert sorted(kept) == [f"layers.{i}.mlp" for i in range(3)]
        assert all(len(k) == 64 for k in kept.values())  # 128 channels at 0.5
        reference = zero_pruned(copy.deepcopy(model), kept, head_dim=1)
        with torch.no_grad():
            torch.testing.assert_close(out, reference(ids), rtol=1e-5, atol=1e-5)
    assert runtime.counts["graph_runs"] == 3
    (result,) = pp.backend.session_from_options(options).passes  # one graph, batch 1 x any length
    assert result.batch == 1 and not isinstance(result.seq_len, int)

"""Graph helpers: a rewritten node's recorded value stays true."""
import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.passes.sites import value

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

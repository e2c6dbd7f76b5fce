"""Finding blocks on models whose attention is written out (no sdpa) or one opaque op (a serving
engine's): the attention is named and left dense with its reason, the MLP is pruned, and nothing
crashes."""
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import ppcompile as pp
from ppcompile.models import tiny_config
from token_stream import TokenStream


@pytest.mark.parametrize("model_type, mlp_final", [("bloom", "mlp.dense_4h_to_h"), ("mpt", "ffn.down_proj")])
def test_written_out_attention_stays_dense_by_name_and_the_mlp_prunes_exactly(model_type, mlp_final):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    c = pp.compile(model, 0.4, backend="eager", skip_layers=(0,), mlp_multiple=16, strict=False)
    with pytest.warns(UserWarning, match="attention without scaled_dot_product_attention"), torch.no_grad():
        out = c(ids).logits
    rows = model.pp.summary()
    assert len({r["site"] for r in rows}) == len(rows)  # one name per site
    status = {r["site"].rsplit(".", 1)[-1] + str(r.get("layer")): r["status"] for r in rows}
    assert status["mlp1"] == status["mlp2"] == "pruned"
    assert status["attention1"].startswith("dense: attention without scaled_dot_product_attention")
    # the independent check: dense with the pruned MLP channels zeroed in the final projections
    kept = model.pp.runtime.last_selection()
    blocks = getattr(model, "transformer", None)
    layers = blocks.h if hasattr(blocks, "h") else blocks.blocks
    with torch.no_grad():
        for site, idx in kept.items():
            final = layers[int(site.split(".")[-2])].get_submodule(mlp_final)
            cols = torch.ones(final.weight.shape[1], dtype=torch.bool)
            cols[idx] = False
            final.weight[:, cols] = 0.0
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_an_opaque_attention_op_is_named_and_a_config_pruning_mlps_alone_leaves_it_dense_by_choice():
    model = TokenStream(attention=True).eval()
    ids = torch.randint(0, 64, (6,))
    for blocks, reason, text in (("both", "OPAQUE_ATTENTION", "its attention is one opaque op, pptest.unified_attention"),
                                 ("mlp", "BLOCKS", "blocks=mlp")):
        torch._dynamo.reset()
        options = {"ratio": 0.4, "skip_layers": (), "mlp_multiple": 16, "blocks": blocks, "inductor": False}
        c = torch.compile(model, backend="ppcompile", dynamic=True, options=options)  # a (T,) stream: not pp.compile's
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c(ids)
        rows = {r["site"]: r for r in pp.backend.session_from_options(options).summary()}
        for i in range(3):
            assert rows[f"layers.{i}.mlp"]["status"] == "pruned"
            assert rows[f"layers.{i}.attention"]["reason"] == reason
            assert text in rows[f"layers.{i}.attention"]["status"]
        left_dense = [w for w in caught if "blocks left dense" in str(w.message)]
        assert bool(left_dense) is (blocks == "both")  # a choice is no warning

"""pp.compile end to end on tiny random models (eager route, plus one Inductor check)."""
import warnings

import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model

from reference import zero_pruned

ARCHS = ["llama-mha", "llama-gqa", "mistral", "qwen2", "opt"]
# 5 layers: skip layer 0 only, so that 4 layers prune (3 skipped would prune 100% at ratio 0.4)
TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _ids(b=3, L=20, seed=0):
    return torch.randint(0, 128, (b, L), generator=torch.Generator().manual_seed(seed))


def _calibration_batches():
    return [_ids(b=2, L=24, seed=10 + i) for i in range(2)]


@pytest.mark.parametrize("policy", ["pp", "full-batch", "wanda-sp", "flap", "dense"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_is_the_original_model(arch, policy):
    model = random_model(arch)
    ids, mask = _ids(), torch.ones(3, 20, dtype=torch.long)
    cal = _calibration_batches() if policy in ("wanda-sp", "flap") else None
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = pp.compile(model, 0.0, policy=policy, backend="eager", strict=True, calibration=cal,
                         **TINY)(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    pruned = [r for r in model.pp.summary() if r["status"] == "pruned"]
    assert len(pruned) == (0 if policy == "dense" else 8)  # attention + MLP of layers 1..4


def _masked_dense_logits(model, ids, selection, head_dim, mean=None):
    """An independent pruned forward: the dense model with the pruned columns zeroed."""
    with torch.no_grad():
        return zero_pruned(model, selection, head_dim, mean)(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["pp", "full-batch"])
def test_execution_of_its_own_selection_equals_dense_with_those_columns_zeroed(arch, policy):
    model = random_model(arch)
    ids = _ids()
    compiled = pp.compile(model, 0.4, policy=policy, backend="eager", strict=True, **TINY)
    with torch.no_grad():
        out = compiled(ids).logits
    sel = model.pp.runtime.last_selection()
    cfg = model.pp.config
    assert {len(v) for k, v in sel.items() if k.endswith("attention")} == {cfg.kept_heads(4, 5)}
    assert {len(v) for k, v in sel.items() if k.endswith("mlp")} == {cfg.kept_channels(128, 5)}
    ref = _masked_dense_logits(random_model(arch), ids, sel, head_dim=16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_both_final_layouts_prune_the_same_and_only_copy_adds_weights(arch):
    ids = _ids()
    outs, sels = {}, {}
    for layout in ("copy", "gather"):
        model = random_model(arch)
        with torch.no_grad():
            outs[layout] = pp.compile(model, 0.4, backend="eager", strict=True, final_layout=layout, **TINY)(ids).logits
        sels[layout] = model.pp.runtime.last_selection()
        copies = {name: b for name, b in model.pp.passes[-1].gm.named_buffers() if name.endswith("_transposed")}
        mlp_sites = [s for s in model.pp.passes[-1].sites if s.kind == "mlp" and s.pruned]
        assert len(copies) == (len(mlp_sites) if layout == "copy" else 0)
        finals = [w for name, w in model.named_parameters() if name.endswith(("down_proj.weight", "fc2.weight"))]
        for copy in copies.values():  # each is the down projection's weight of a pruned layer, transposed
            assert copy.is_contiguous() and any(torch.equal(copy, w.t()) for w in finals[1:])
    assert {k: v.tolist() for k, v in sels["copy"].items()} == {k: v.tolist() for k, v in sels["gather"].items()}
    torch.testing.assert_close(outs["copy"], outs["gather"], rtol=0, atol=0)
    ref = _masked_dense_logits(random_model(arch), ids, sels["copy"], head_dim=16)
    torch.testing.assert_close(outs["copy"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["wanda-sp", "flap"])
def test_static_policies_execute_their_own_selection_as_dense_with_those_columns_zeroed(arch, policy):
    model = random_model(arch)
    ids = _ids()
    compiled = pp.compile(model, 0.4, policy=policy, backend="eager", strict=True,
                          calibration=_calibration_batches(), **TINY)
    with torch.no_grad():
        out = compiled(ids).logits
    sel = model.pp.runtime.last_selection()
    cal = model.pp.calibration
    if policy == "wanda-sp":
        assert {len(v) for k, v in sel.items() if k.endswith("mlp")} == {model.pp.config.kept_channels(128, 5)}
    mean = {site: cal.mean(site) for site in sel} if policy == "flap" else None
    ref = _masked_dense_logits(random_model(arch), ids, sel, head_dim=16, mean=mean)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # indices fixed once: the weights were sliced at compile time, the graph gathers none
    gm = model.pp.passes[-1].gm
    assert not [n for n in gm.graph.nodes if n.target is torch.index_select and "_w" in n.name]


def test_flap_prunes_the_layer_ratio_of_the_prunable_flops():
    model = random_model("llama-gqa")
    pp.compile(model, 0.4, policy="flap", backend="eager", calibration=_calibration_batches(), **TINY)(_ids())
    rows = [r for r in model.pp.summary() if r["status"] == "pruned"]
    d = 64
    # GQA: a head costs its Q rows and O columns (2 * 16 * d), a channel gate + up + down (3 * d)
    cost = {"attention": 2 * 16 * d, "mlp": 3 * d}
    pruned = sum((r["total"] - r["kept"]) * cost[r["kind"]] for r in rows)
    target = model.pp.config.layer_ratio(5) * 4 * (4 * cost["attention"] + 128 * cost["mlp"])
    assert target <= pruned < target + cost["attention"]  # reached, overshooting by less than one head
    assert len({r["kept"] for r in rows if r["kind"] == "mlp"}) > 1  # not uniform across layers


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_full_batch_keeps_what_a_direct_computation_gives(block):
    # Only one block of the last layer prunes, so its input is the dense model's.
    model = random_model("llama-gqa")
    ids = _ids(b=2, L=12)
    layer = model.model.layers[4]
    final = layer.self_attn.o_proj if block == "attention" else layer.mlp.down_proj
    acts = []
    hook = final.register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    # r_l = round(0.12 * 5 / 1, 2) = 0.6: 2 of 4 heads pruned; floor(0.6 * 128) = 76 channels
    # pruned, 52 kept, rounded up to a multiple of 16: 64.
    c = pp.compile(model, 0.12, policy="full-batch", backend="eager", skip_layers=(0, 1, 2, 3),
                   mlp_multiple=16, blocks=block)
    with torch.no_grad():
        c(ids)
    (kept,) = model.pp.runtime.last_selection().values()
    energy = acts[0].pow(2).mean(0).sum(0)  # (C,): sum over positions of the batch mean of x^2
    W = final.weight
    if block == "attention":
        scores = torch.stack([(energy[h * 16:(h + 1) * 16, None] ** 2 * W[:, h * 16:(h + 1) * 16].T ** 4).sum().sqrt()
                              for h in range(4)])
        k = 2
    else:
        scores, k = energy * W.pow(4).sum(0).sqrt(), 64
    assert kept.tolist() == sorted(scores.topk(k).indices.tolist())


def test_pad_tokens_never_enter_the_probe():
    model = random_model("llama-gqa")
    ids = _ids(b=4, L=16)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[3, -5:] = 0  # right padding
    other = ids.clone()
    other[mask == 0] = (ids[mask == 0] + 7) % 128  # change what the pads hold
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad():
        c(ids, attention_mask=mask)
        first = model.pp.runtime.last_selection()
        model.pp.runtime.reset()
        c(other, attention_mask=mask)
        second = model.pp.runtime.last_selection()
    for site in first:
        assert first[site].tolist() == second[site].tolist(), site


def test_history_warms_up_then_updates_and_state_round_trips():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    rt = model.pp.runtime
    with torch.no_grad():
        c(_ids(seed=1))
        assert rt.step.item() == 1 and all(t.abs().sum() == 0 for t in rt.tables.values())  # warm-up
        c(_ids(seed=2))
        assert rt.seeded.item() and all(t.abs().sum() > 0 for t in rt.tables.values())
        state = rt.state_dict()
        nxt = c(_ids(seed=3)).logits
        c(_ids(seed=4))
        rt.load_state_dict(state)
        again = c(_ids(seed=3)).logits
    assert torch.equal(nxt, again)


def test_default_call_returns_a_usable_cache():
    model = random_model("llama-mha")
    ids = _ids(b=1, L=10)
    c = pp.compile(model, 0.4, backend="eager", strict=True, **TINY)
    with torch.no_grad():
        out = c(ids, use_cache=True)
        # MHA with a cache: K/V are kept whole, so the cache holds every head
        k = out.past_key_values.layers[2].keys
        assert k.shape[1] == 4
        dense = random_model("llama-mha")(ids, use_cache=True).past_key_values.layers[2].keys
    assert k.shape == dense.shape


def test_an_unreachable_ratio_warns_once_per_compiled_graph():
    model = random_model("llama-gqa")  # 5 layers, 3 skipped: 0.9 would need 225% of each of 2
    c = pp.compile(model, 0.9, backend="eager", skip_layers=(0, 1, 2), mlp_multiple=16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        c(_ids())
    assert [str(w.message) for w in caught if "cannot be reached" in str(w.message)] == \
        [f"ppcompile: {model.pp.config.unreachable(5)}"]


def test_strict_with_no_matchable_block_is_an_error():
    no_blocks = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)).eval()  # no decoder layer
    c = pp.compile(no_blocks, 0.4, backend="eager", strict=True, skip_layers=())
    with pytest.raises(Exception, match="no attention or MLP block"):
        c(torch.randint(0, 64, (1, 8)))


@pytest.mark.inductor
def test_inductor_and_eager_routes_agree():
    ids = _ids(b=2, L=16)
    outs, sels = [], []
    for backend in ("eager", "inductor"):
        model = random_model("llama-gqa")
        c = pp.compile(model, 0.4, backend=backend, **TINY)
        with torch.no_grad():
            c(ids)
            outs.append(c(ids).logits)
        sels.append({k: v.tolist() for k, v in model.pp.runtime.last_selection().items()})
    assert sels[0] == sels[1]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_pp_keeps_what_probe_and_history_give_by_hand():
    # Only the MLP of the last layer prunes, so its input is the dense model's.
    model = random_model("llama-gqa")
    ids = _ids(b=4, L=12)
    mlp = model.model.layers[4].mlp
    cap = {}
    hook = model.model.layers[4].post_attention_layernorm.register_forward_hook(
        lambda m, a, o: cap.update(x_res=a[0], x=o))
    c = pp.compile(model, 0.12, backend="eager", skip_layers=(0, 1, 2, 3), mlp_multiple=16, blocks="mlp",
                   sample_ratio=0.5, probe="paper")
    history = torch.rand(12, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c(ids)  # warm-up
        model.pp.runtime.seed({"model.layers.4.mlp": history.clone()})
        c(ids)
    hook.remove()
    (kept,) = model.pp.runtime.last_selection().values()
    # probe by hand: positions by the L2 norm over the batch of the residual norms, then samples
    norms = cap["x_res"].norm(dim=-1)  # (4, 12)
    kept_t = norms.norm(dim=0).topk(6).indices.sort().values
    kept_b = norms[:, kept_t].norm(dim=1).topk(2).indices.sort().values
    p = cap["x"][kept_b][:, kept_t]
    act = mlp.act_fn(mlp.gate_proj(p)) * mlp.up_proj(p)  # (2, 6, 128)
    P, H = act.pow(2).mean(0), history[kept_t]
    alpha = P / (P + H + 1e-6)
    energy = (alpha * P + (1 - alpha) * H).sum(0)
    scores = energy * mlp.down_proj.weight.pow(4).sum(0).sqrt()
    assert kept.tolist() == sorted(scores.topk(64).indices.tolist())


def test_bad_calls_are_refused_before_the_model_runs():
    model = random_model("llama-gqa", max_position_embeddings=24)
    with pytest.raises(ValueError, match=r"skip_layers names layer\(s\) \[7\] but the model has 5"):
        pp.compile(model, 0.4, backend="eager", skip_layers=(0, 7))
    with pytest.raises(ValueError, match="skips all 5 layers"):
        pp.compile(model, 0.4, backend="eager", skip_layers=range(5))
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad():
        with pytest.raises(TypeError, match="input_ids must be integer token ids"):
            c(_ids().float())
        with pytest.raises(ValueError, match="empty|size 0"):
            c(_ids(b=0))
        with pytest.warns(UserWarning, match=r"longer than the model's max_position_embeddings \(24\)"):
            c(_ids(L=30))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once
            c(_ids(L=30, seed=1))
    model.train()
    with pytest.raises(RuntimeError, match="prunes inference only"):
        c(_ids())
    assert model.pp.runtime.counts["pruned_calls"] == 2


# ---- half precision: the model's dtype end to end, the pass's statistics in fp32 ----
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("policy", ["pp", "flap"])
def test_ratio_zero_is_the_original_model_in_half_precision(dtype, policy):
    model = random_model("llama-gqa", dtype=dtype)
    ids = _ids()
    cal = _calibration_batches() if policy == "flap" else None
    with torch.no_grad():
        ref = model(ids).logits
        out = pp.compile(model, 0.0, policy=policy, backend="eager", strict=True, calibration=cal, **TINY)(ids).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same matmuls on the same (all) columns


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_execution_in_half_precision_equals_dense_with_its_own_selection_zeroed(dtype, arch):
    model = random_model(arch, dtype=dtype)
    ids = _ids()
    compiled = pp.compile(model, 0.4, backend="eager", strict=True, **TINY)
    with torch.no_grad():
        compiled(ids)  # the warm-up: the next call fuses a history learnt in half precision
        out = compiled(ids).logits
    rt = model.pp.runtime
    assert {t.dtype for t in rt.tables.values()} == {torch.float32}  # the history accumulates in fp32
    assert rt.seeded.item() and all(t.abs().sum() > 0 for t in rt.tables.values())
    ref = _masked_dense_logits(random_model(arch, dtype=dtype), ids, rt.last_selection(), head_dim=16)
    # the compact matmul sums fewer terms than the zeroed dense one: equal up to the dtype's rounding
    # (a wrong selection is off by 0.1 on average, 0.5 at most)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-2)
    assert (out.float() - ref.float()).abs().mean() < 1e-3


@pytest.mark.inductor
def test_ratio_zero_equals_dense_through_inductor_in_bfloat16():
    model = random_model("llama-gqa", dtype=torch.bfloat16)
    ids = _ids(b=2, L=16)
    with torch.no_grad():
        ref = torch.compile(model, dynamic=False)(ids).logits
        torch._dynamo.reset()
        c = pp.compile(model, 0.0, strict=True, **TINY)
        c(ids)
        out = c(ids).logits
    assert model.pp.runtime.counts["pruned_calls"] == 2
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_a_rewritten_block_that_does_not_run_is_left_dense_with_the_error(monkeypatch):
    """The pass's last check: a rewrite that fails on the graph's example values (here every MLP's
    scores, made to raise) leaves that block dense, named with the error; the others still prune
    and the output is the dense model with only their pruned heads zeroed."""
    from ppcompile import ops

    def broken(energy, terms):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(ops, "channel_scores", broken)
    model, ids = random_model("llama-mha"), _ids()
    with pytest.warns(UserWarning, match="blocks left dense"), torch.no_grad():
        out = pp.compile(model, 0.4, backend="eager", **TINY)(ids).logits
    rows = [r for r in model.pp.summary() if r["layer"] != 0]
    for r in rows:
        if r["kind"] == "mlp":
            assert r["status"] == "dense: the rewritten block does not run (RuntimeError: no kernel for this)"
        else:
            assert r["status"] == "pruned"
    sel = model.pp.runtime.last_selection()
    assert set(sel) == {r["site"] for r in rows if r["kind"] == "attention"}
    ref = _masked_dense_logits(random_model("llama-mha"), ids, sel, head_dim=16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

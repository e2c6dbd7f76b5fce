"""generate() and cached calls through the pass, on tiny random models (eager route, one Inductor
check): the prefill selects, every decode step reuses its selection."""
import warnings

import pytest
import torch
from transformers import DynamicCache, StaticCache

import ppcompile as pp
from ppcompile import ops
from ppcompile.models import random_model
from ppcompile.report import site_rows

from by_hand import ByHand
from mutants import MUTANTS, mutate
from reference import zero_pruned

TINY = dict(skip_layers=(0,), mlp_multiple=16)
NEW = 5


def _prompts(b=3, L=12, seed=0):
    """Token ids with left padding (row 0: 3 pads, row 2: 5 pads) and their mask; pads are 0."""
    ids = torch.randint(1, 128, (b, L), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(b, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[b - 1, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              **kwargs)


def _calibration():
    return [torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]


@pytest.mark.parametrize("policy", ["pp", "full-batch", "griffin", "wanda-sp", "flap", "dense"])
def test_ratio_zero_generates_the_dense_tokens(policy):
    ids, mask = _prompts()
    dense = _generate(random_model("llama-gqa"), ids, mask)
    model = random_model("llama-gqa")
    cal = _calibration() if policy in ("wanda-sp", "flap") else None
    c = pp.compile(model, 0.0, policy=policy, backend="eager", strict=True, calibration=cal, **TINY)
    assert torch.equal(_generate(c, ids, mask), dense)
    assert model.pp.runtime.counts == {"pruned_calls": NEW, "unpruned_calls": 0, "dense_by_cost_calls": 0, "graph_runs": NEW,
                                       "site_runs": NEW * len(model.pp.passes[-1].active_sites)}


@pytest.mark.parametrize("arch,policy,padded,dtype,options", [
    ("llama-mha", "pp", True, torch.float32, {}), ("llama-gqa", "pp", True, torch.float32, {}),
    ("qwen2", "pp", True, torch.float32, {}), ("mistral", "full-batch", True, torch.float32, {}),
    ("llama-gqa", "griffin", True, torch.float32, {}),
    ("llama-gqa", "pp", False, torch.float32, {}),  # no padding: no mask, the prefill attends to the cache cut to the prompt
    ("llama-gqa", "pp", True, torch.bfloat16, {}), ("llama-mha", "pp", True, torch.float16, {}),
    # the other probe designs: their prefill probe reads the mask and rotary per sequence / token
    ("llama-mha", "pp", True, torch.float32, {"probe": "every"}),
    ("llama-gqa", "pp", True, torch.float32, {"probe": "flat", "probe_budget": 0.2})])
def test_decode_executes_the_prefills_selection_as_dense_with_those_columns_zeroed(arch, policy, padded, dtype, options):
    ids, mask = _prompts()
    if not padded:
        ids, mask = ids.clamp(min=1), torch.ones_like(mask)
    model = random_model(arch, dtype=dtype)
    c = pp.compile(model, 0.4, policy=policy, backend="eager", strict=True, **TINY, **options)
    out = _generate(c, ids, mask, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(out.logits, 1)  # (B, NEW, vocab)
    kept = model.pp.runtime.last_selection()
    assert set(kept) == {s for s in model.pp.runtime.stored_sites}
    # the reference: the prefill runs on the pruned model (griffin: the dense one), fills a cache,
    # and the generated tokens run teacher-forced on the pruned model
    ref = random_model(arch, dtype=dtype)
    cache = StaticCache(config=ref.config, max_cache_len=32)
    griffin = policy == "griffin"
    # half precision: the decode attention accumulates in fp32, the model's in its dtype (measured:
    # 4e-3 at most in bf16; a wrong selection moves these logits by about 0.1 on average)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    with torch.no_grad():
        if not griffin:
            zero_pruned(ref, kept, head_dim=16)
        first = ref(ids, attention_mask=mask, cache=cache).logits[:, -1]
        if griffin:
            zero_pruned(ref, kept, head_dim=16)
        gen = out.sequences[:, ids.shape[1]:-1]
        mask2 = torch.cat([mask, torch.ones_like(gen)], 1)
        rest = ref(gen, attention_mask=mask2, cache=cache).logits
    torch.testing.assert_close(steps, torch.cat([first[:, None], rest], 1).float(), **tol)
    if not griffin:  # one pruned forward over the whole sequence, with the prefill's selection
        with torch.no_grad():
            whole = ref(out.sequences[:, :-1], attention_mask=mask2).logits[:, ids.shape[1] - 1:]
        torch.testing.assert_close(steps, whole.float(), **tol)


@pytest.mark.parametrize("policy, chosen_by", [("pp", "probe"), ("griffin", "prompt"), ("flap", "calibration")])
def test_the_summary_says_what_chose_the_units_of_each_graph(policy, chosen_by):
    # a decode graph chooses nothing: it reads what its prefill stored; a static policy's units are
    # constants every graph rebuilds alike (whole_batch_when_cheaper=False: pp's prefill probes)
    ids, mask = _prompts()
    model = random_model("llama-gqa")
    cal = _calibration() if policy == "flap" else None
    c = pp.compile(model, 0.4, policy=policy, backend="eager", strict=True, calibration=cal,
                   whole_batch_when_cheaper=False, **TINY)
    _generate(c, ids, mask)
    selects = {r.phase: {row["selects"] for row in site_rows(r) if row["status"] == "pruned"} for r in model.pp.passes}
    assert selects == {"prefill": {chosen_by}, "decode": {"calibration" if policy == "flap" else "prefill"}}


def test_decode_graph_reads_the_stored_weights_and_gathers_none():
    ids, mask = _prompts()
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", strict=True, **TINY)
    _generate(c, *_prompts(seed=1))
    first = dict(model.pp.runtime.slots)
    _generate(c, ids, mask)
    prefill, decode = model.pp.passes
    assert (prefill.phase, decode.phase) == ("prefill", "decode")
    gm = decode.gm
    assert not [n for n in gm.graph.nodes if n.target in (torch.index_select, torch.topk)]  # no probe, no gather
    # each pruned attention site: its kept heads attend on the cache in place, no attention op left
    attend = [n for n in gm.graph.nodes if n.target is ops.attend_one_query]
    assert len(attend) == len([s for s in decode.active_sites if s.endswith("attention")]) > 0
    assert not [n for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention
                and "layers.0" not in str(n.meta.get("nn_module_stack"))]
    assert not [s for s in decode.seam.slots if s.name.startswith("history/")]  # no history in decode
    stored = {s.name for s in decode.seam.slots}
    site = "model.layers.1.mlp"
    assert {f"stored/{site}/{w}" for w in ("kept", "gate_proj_w", "up_proj_w", "final_w")} <= stored
    w = model.pp.runtime.slots[f"stored/{site}/final_w"]
    kept = model.pp.runtime.slots[f"stored/{site}/kept"]
    assert torch.equal(w.t(), model.model.layers[1].mlp.down_proj.weight[:, kept])  # the kept columns
    assert w.is_contiguous()  # stored transposed: (kept, out)
    # the second prefill wrote into the first one's tensors (in place: no allocation per generation)
    assert all(model.pp.runtime.slots[n] is t for n, t in first.items() if n.startswith("stored/"))
    # K/V whole: the cache holds every K/V head
    attn = "model.layers.1.attention"
    assert f"stored/{attn}/k_w" not in stored and f"stored/{attn}/q_w" in stored


def test_history_learns_from_the_prefill_only():
    ids, mask = _prompts()
    a = random_model("llama-gqa")
    ca = pp.compile(a, 0.4, backend="eager", **TINY)
    b = random_model("llama-gqa")
    cb = pp.compile(b, 0.4, backend="eager", **TINY)
    with torch.no_grad():
        for c in (ca, cb):  # a warm-up call first, so that the next call writes the history
            c(*_prompts(seed=7))
        _generate(ca, ids, mask)
        cb(ids, attention_mask=mask)  # the prompt alone, no generation
    ha, hb = a.pp.runtime.tables, b.pp.runtime.tables
    assert ha and ha.keys() == hb.keys() and int(a.pp.runtime.step) == int(b.pp.runtime.step) == 2
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=1e-5, atol=1e-7, msg=k)
        assert ha[k].shape[0] == ids.shape[1]  # no row for a generated token


def test_left_padding_does_not_change_what_a_prompt_generates():
    ids, mask = _prompts()
    c = pp.compile(random_model("llama-mha"), 0.0, backend="eager", **TINY)
    batch = _generate(c, ids, mask)
    for row in range(ids.shape[0]):
        real = ids[row, mask[row].bool()][None]
        alone = _generate(c, real, torch.ones_like(real))
        assert torch.equal(alone[0, -NEW:], batch[row, -NEW:]), row


def test_griffin_keeps_what_its_statistic_gives_by_hand():
    ids, mask = _prompts()
    model = random_model("llama-gqa")
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: acts.setdefault(i, a[0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    c = pp.compile(model, 0.4, policy="griffin", backend="eager", strict=True, **TINY)
    _generate(c, ids, mask)
    kept = model.pp.runtime.last_selection()
    k = model.pp.config.kept_channels(128, 5)
    for i in range(1, 5):
        z = acts[i] / acts[i].norm(dim=-1, keepdim=True)  # (B, L, C): each token normalized
        z = z * mask[..., None]  # pad tokens have no say
        stat = z.pow(2).sum(1).sqrt().sum(0)  # norm over the prompt, summed over sequences
        assert kept[f"model.layers.{i}.mlp"].tolist() == sorted(stat.topk(k).indices.tolist())
    rows = {r["site"]: r["status"] for r in model.pp.summary()}
    assert rows["model.layers.1.attention"] == "dense: policy griffin prunes mlp only"


@pytest.mark.parametrize("dynamic, graphs", [(True, [("prefill", True), ("decode", False)]),
                                             (None, [("prefill", False), ("decode", False), ("prefill", True)])])
def test_prompts_of_one_bucket_share_two_graphs_or_three_when_the_first_compiles_static(dynamic, graphs):
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", strict=True, dynamic=dynamic, **TINY)
    for i in range(20):
        ids, mask = _prompts(b=2, L=6 + i, seed=i)
        _generate(c, ids, mask)
    assert [(r.phase, r.dynamic) for r in model.pp.passes] == graphs  # decode: batch 2, one token, static
    assert model.pp.runtime.counts["unpruned_calls"] == 0


def test_cached_calls_route_by_the_cache():
    ids, mask = _prompts()
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", strict=True, **TINY)
    cache = StaticCache(config=model.config, max_cache_len=24)
    more = torch.randint(1, 128, (3, 4))
    mask2 = torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        c(ids, attention_mask=mask)  # no cache: forward
        c(ids, attention_mask=mask, cache=cache)  # an empty static cache: prefill
        got = c(more, attention_mask=mask2, cache=cache).logits  # decode of 4 tokens: K/V gathered per kept head
    assert [r.phase for r in model.pp.passes] == ["forward", "prefill", "decode"]
    ref = zero_pruned(random_model("llama-gqa"), model.pp.runtime.last_selection(), head_dim=16)
    with torch.no_grad():
        want = ref(torch.cat([ids, more], 1), attention_mask=mask2).logits[:, -4:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generate_refuses_a_transformers_older_than_its_routing_is_built_on(monkeypatch):
    import transformers
    ids, mask = _prompts()
    c = pp.compile(random_model("llama-gqa"), 0.4, backend="eager", **TINY)
    monkeypatch.setattr(transformers, "__version__", "5.19.0")  # what vLLM's CPU build pins
    with pytest.raises(RuntimeError, match=r"needs transformers >= 5.24, this is 5.19.0"):
        c.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_bad_generation_inputs_are_refused_with_the_fix():
    ids, mask = _prompts()
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad():
        with pytest.raises(ValueError, match="leave it unset or pass 'static'"):
            c.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="dynamic")
        with pytest.raises(ValueError, match="pass none .* or a transformers.StaticCache"):
            c.generate(ids, attention_mask=mask, max_new_tokens=2, cache=DynamicCache(config=model.config))
        with pytest.raises(ValueError, match="the static cache holds 8 tokens, the prompt and the new tokens need 14"):
            c.generate(ids, attention_mask=mask, max_new_tokens=2, cache=StaticCache(config=model.config,
                                                                                       max_cache_len=8))
        with pytest.raises(ValueError, match="exceed the model's max_position_embeddings"):
            c.generate(ids, attention_mask=mask, max_new_tokens=model.config.max_position_embeddings)
        with pytest.raises(ValueError, match="before any prefill"):
            cache = StaticCache(config=model.config, max_cache_len=16)
            random_model("llama-gqa")(ids, cache=cache)  # a cache filled elsewhere
            c(ids[:, :1], cache=cache)
        held = StaticCache(config=model.config, max_cache_len=32)
        c(ids, attention_mask=mask, cache=held)
        with pytest.raises(ValueError, match="already holds tokens"):
            c.generate(ids, attention_mask=mask, max_new_tokens=2, cache=held)
        dyn = c(ids, attention_mask=mask, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="decodes with a static KV cache"):
            c(ids[:, :1], cache=dyn)


def test_strict_generation_is_pruned_and_silent():
    ids, mask = _prompts()
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", strict=True, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            c.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True, top_k=5, pad_token_id=0)
    assert model.pp.runtime.counts["pruned_calls"] == 3 and "forward" not in vars(model)


@pytest.mark.inductor
def test_inductor_generation_equals_the_eager_route():
    ids, mask = _prompts()
    outs = []
    for backend in ("eager", "inductor"):
        torch._dynamo.reset()
        c = pp.compile(random_model("llama-gqa"), 0.4, backend=backend, strict=True, **TINY)
        outs.append(_generate(c, ids, mask, output_logits=True, return_dict_in_generate=True))
    torch.testing.assert_close(torch.stack(outs[1].logits), torch.stack(outs[0].logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1].sequences, outs[0].sequences)


def test_left_padded_prompts_keep_the_by_hand_selection_and_its_tokens():
    # At ratio 0.4: the prefill of a left-padded batch keeps what Probe Pruning by hand keeps
    # (pads never probed, each prompt's positions from its mask), and every prompt generates the
    # tokens of the dense model with that selection zeroed; what the pads hold changes neither.
    ids, mask = _prompts()
    c = pp.compile(random_model("llama-gqa"), 0.4, backend="eager", strict=True, **TINY)
    tokens = _generate(c, ids, mask)
    kept = c.pp.runtime.last_selection()
    ref = ByHand(random_model("llama-gqa"), skip=TINY["skip_layers"], multiple=TINY["mlp_multiple"])
    _, by_hand = ref.forward(ids, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), follow=kept)
    assert ref.adopted == 0 and sorted(kept) == sorted(by_hand)
    for site in by_hand:
        assert kept[site].tolist() == by_hand[site].tolist(), site
    want = _generate(zero_pruned(random_model("llama-gqa"), by_hand, head_dim=16), ids, mask)
    assert torch.equal(tokens, want)
    c.pp.runtime.reset()
    other = ids.masked_fill(mask == 0, 7)  # other pad contents
    assert torch.equal(_generate(c, other, mask)[:, ids.shape[1]:], tokens[:, ids.shape[1]:])
    again = c.pp.runtime.last_selection()
    assert all(torch.equal(again[s], kept[s]) for s in kept)


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_mutated_selection_fails_the_griffin_by_hand_check(monkeypatch, mutant):
    mutate(monkeypatch, mutant)
    with pytest.raises(AssertionError):
        test_griffin_keeps_what_its_statistic_gives_by_hand()


def test_a_timed_generation_refuses_a_compile_inside_it_and_passes_after_a_warm_up_of_its_size():
    from ppcompile.generation import timed_generate
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", cache_bucket=16, **TINY)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        timed_generate(c, ids, new=2, pad_token_id=0)  # 12 tokens: a cache of 16
        graphs = len(model.pp.passes)
        with pytest.raises(RuntimeError, match=r"graph\(s\) compiled inside a timed generate\(\) of 10 tokens"):
            timed_generate(c, ids, new=10, warm=True, pad_token_id=0)  # 20 tokens: a cache of 32, new graphs
        assert len(model.pp.passes) > graphs
        graphs = len(model.pp.passes)
        out, prefill, step = timed_generate(c, ids, new=10, warm=True, pad_token_id=0)
    assert len(model.pp.passes) == graphs and out.shape == (2, 20) and prefill > 0 and step > 0


def test_a_timed_generation_counts_any_compile_not_only_the_pass():
    """The guard reads Dynamo's own counter: a plain torch.compile'd function compiling inside
    the timed call (no ppcompile session anywhere) is refused too."""
    from ppcompile.generation import timed_generate
    step = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)

    class Stub:  # what timed_generate needs of a model: generate(ids, ..., streamer=...)
        def generate(self, ids, *, max_new_tokens, streamer, **_):
            streamer.put(ids)
            for i in range(max_new_tokens):
                streamer.put(step(torch.ones(i + 3)))  # a new shape each step: a new graph
            return ids

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"graph\(s\) compiled inside a timed generate\(\) of 2 tokens"):
        timed_generate(Stub(), torch.ones(1, 3, dtype=torch.long), new=2, warm=True)
    timed_generate(Stub(), torch.ones(1, 3, dtype=torch.long), new=2, warm=True)  # the same shapes: nothing new


def test_automatic_shapes_compile_the_first_shape_static_and_every_other_through_one_dynamic_graph():
    """dynamic=None (the default, as torch.compile's): the first shape compiles a static graph that
    keeps serving it; the first call of another shape compiles one dynamic graph that serves every
    other shape. Each call computes what a model compiled dynamic from the start computes."""
    model = random_model("llama-gqa")
    auto = pp.compile(model, 0.4, backend="eager", **TINY)
    dynamic = pp.compile(random_model("llama-gqa"), 0.4, backend="eager", dynamic=True, **TINY)
    with torch.no_grad():
        for i, (b, L) in enumerate([(3, 21), (3, 21), (4, 30), (5, 17), (3, 21)]):
            ids = torch.randint(1, 128, (b, L), generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(auto(ids).logits, dynamic(ids).logits, rtol=1e-5, atol=1e-5)
            assert [r.dynamic for r in model.pp.passes] == ([False] if i < 2 else [False, True])
    assert model.pp.runtime.counts["pruned_calls"] == 5 and model.pp.runtime.counts["unpruned_calls"] == 0

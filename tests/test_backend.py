"""The backend and the session: any shape through a bounded number of graphs, every call accounted
for, nothing that waits on tensor values, and the same behaviour through torch.compile's route."""
import random
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import ppcompile as pp
from ppcompile.backend import session_from_options
from ppcompile.models import random_model
from ppcompile.runtime import Runtime

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _batch(b, L, seed):
    return torch.randint(0, 128, (b, L), generator=torch.Generator().manual_seed(seed))


def _shapes(n, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(1, 8), rng.randint(8, 96)) for _ in range(n)]


@pytest.mark.parametrize("policy", ["pp", "full-batch"])
def test_a_stream_of_shapes_runs_pruned_through_at_most_two_graphs(policy):
    counters.clear()
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, policy=policy, backend="eager", dynamic=True, **TINY)
    shapes = _shapes(12) + [(1, 8), (3, 8)]  # batch 1 and batch >= 2 both occur
    kept = []
    with torch.no_grad():
        for i, (b, L) in enumerate(shapes):
            ids = _batch(b, L, i)
            mask = torch.ones(b, L, dtype=torch.long)
            out = c(ids, attention_mask=mask).logits
            assert out.shape == (b, L, 128)
            assert not torch.allclose(out, model(ids, attention_mask=mask).logits, atol=1e-4)  # pruned
            kept.append({k: v.tolist() for k, v in model.pp.runtime.last_selection().items()})
    # batch >= 2: one graph with dynamic batch and sequence; batch 1: one more (Dynamo specializes 1)
    assert len(model.pp.passes) == 2 and counters["stats"]["unique_graphs"] == 2
    assert all(r.dynamic for r in model.pp.passes) and not counters["graph_break"]
    counts = model.pp.runtime.counts
    assert counts["pruned_calls"] == len(shapes) and counts["unpruned_calls"] == 0
    assert len({str(k) for k in kept}) > 1  # the kept sets follow the input
    if policy == "pp":  # one history for both graphs: every call advanced it
        assert model.pp.runtime.step.item() == len(shapes)
        assert model.pp.runtime.tables["model.layers.1.mlp"].shape[0] == max(L for _, L in shapes)


@pytest.mark.parametrize("options", [{}, {"probe": "paper"}, {"probe": "paper", "probe_budget": 0.1}, {"probe": "every"},
                                     {"probe": "spread", "probe_budget": 0.1}, {"probe": "flat", "probe_budget": 0.1}],
                         ids=["default probe", "paper probe", "paper with budget", "every", "spread with budget",
                              "flat with budget"])
@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_the_dynamic_graph_computes_what_a_static_one_does(arch, options):
    ids = _batch(3, 21, 0)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[0, :5] = 0
    results = []
    for dynamic in (True, False):
        model = random_model(arch)
        c = pp.compile(model, 0.4, backend="eager", dynamic=dynamic, **TINY, **options)
        with torch.no_grad():  # the same tensors for both: pp.compile marks aliases, not them
            c(ids, attention_mask=mask)
            out = c(ids, attention_mask=mask).logits
        assert model.pp.passes[-1].dynamic == dynamic
        results.append((out, {k: v.tolist() for k, v in model.pp.runtime.last_selection().items()}))
    assert results[0][1] == results[1][1]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["pp", "full-batch"])
def test_the_rewritten_graph_never_reads_tensor_values_on_the_host(policy):
    """Under FakeTensorMode no value exists: any .item(), .tolist(), nonzero or data-dependent
    shape in the rewritten graph would raise. Its outputs' shapes are static too."""
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, policy=policy, backend="eager", dynamic=False, **TINY)
    with torch.no_grad():
        c(_batch(4, 16, 0), attention_mask=torch.ones(4, 16, dtype=torch.long))
    result = model.pp.passes[-1]
    placeholders = [n for n in result.gm.graph.nodes if n.op == "placeholder"][:-len(result.seam.slots) or None]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = [mode.from_tensor(n.meta["example_value"]) for n in placeholders]
    state = [mode.from_tensor(t) for t in result.seam.state(args, Runtime().provide)]
    with mode, torch.no_grad():
        out = result.gm(*args, *state)
    _, named = result.seam.split(out)
    assert {k: tuple(v.shape) for k, v in named.items() if k.startswith("kept/")} == \
        {f"kept/{s}": (2,) if s.endswith("attention") else (64,) for s in result.selected_sites}


def test_a_call_dynamo_runs_eagerly_warns_once_counts_and_raises_under_strict():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    ids = _batch(2, 12, 0)
    with torch.no_grad():
        c(ids)
        with torch.compiler.set_stance("force_eager"):
            with pytest.warns(UserWarning, match=r"unpruned forward: torch.compiler.set_stance\('force_eager'\)"):
                out = c(ids).logits
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once: the second such call is counted, not warned
                c(ids)
        torch.testing.assert_close(out, model(ids).logits)  # it really ran the original model
    assert model.pp.runtime.counts == {"pruned_calls": 1, "unpruned_calls": 2, "dense_by_cost_calls": 0, "graph_runs": 1, "site_runs": 8}

    strict = pp.compile(random_model("llama-gqa"), 0.4, backend="eager", strict=True, **TINY)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        with pytest.raises(RuntimeError, match="unpruned forward.*strict=True"):
            strict(ids)


def test_the_recompile_limit_is_named_when_it_makes_a_call_unpruned():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        c(_batch(2, 12, 0))
        with pytest.warns(UserWarning, match="recompile limit"):
            c(_batch(1, 12, 0))  # batch 1 needs a second graph, which the limit forbids
    assert model.pp.runtime.counts["unpruned_calls"] == 1


def test_torch_compile_route_enforces_strict_and_warns_on_dense_blocks():
    from transformers import AutoModelForCausalLM
    from ppcompile.models import tiny_config
    bloom = AutoModelForCausalLM.from_config(tiny_config("bloom")).eval()  # attention written out: left dense
    no_blocks = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        with pytest.warns(UserWarning, match="blocks left dense"):
            torch.compile(bloom, backend="ppcompile", options={"inductor": False, "skip_layers": (0,)})(ids)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="strict.*blocks left dense"):
            torch.compile(bloom, backend="ppcompile", options={"inductor": False, "skip_layers": (0,), "strict": True})(ids)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="strict.*no attention or MLP block"):
            torch.compile(no_blocks, backend="ppcompile", options={"inductor": False, "strict": True})(ids)


def test_torch_compile_route_keeps_one_history_across_shapes_and_checks_the_calibration():
    model = random_model("llama-gqa")
    options = {"ratio": 0.4, "inductor": False, **TINY}
    c = torch.compile(model, backend="ppcompile", options=options)
    with torch.no_grad():
        c(_batch(3, 12, 0))
        c(_batch(1, 20, 1))  # batch 1: a second graph
    session = session_from_options(options)
    assert len(session.passes) == 2 and session.runtime is pp.backend.last_runtime()
    assert session.runtime.step.item() == 2 and session.runtime.tables["model.layers.1.mlp"].shape[0] == 20

    cal = pp.calibrate(random_model("llama-gqa", seed=1), [_batch(2, 12, 5)])  # another model's weights
    torch._dynamo.reset()
    other = torch.compile(model, backend="ppcompile", options={"inductor": False, "calibration": cal, **TINY})
    with torch.no_grad(), pytest.raises(Exception, match="calibration was computed on another model"):
        other(_batch(2, 12, 0))


def test_torch_compile_route_generates_through_the_pass_as_pp_compile_does():
    ids = _batch(2, 10, 3)
    outs = []
    for route in ("torch.compile", "pp.compile"):
        torch._dynamo.reset()
        model = random_model("llama-gqa")  # the same weights each time
        if route == "pp.compile":
            c = pp.compile(model, 0.4, backend="eager", strict=True, **TINY)
        else:
            c = torch.compile(model, backend="ppcompile", options={"ratio": 0.4, "inductor": False, "strict": True,
                                                                     **TINY})
        with torch.no_grad():
            c(ids)  # the backend meets the model here (a generate before any call is not routed: README)
            outs.append(c.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
        session = model.pp
        assert session.runtime.step.item() == 2  # the call and the prefill updated the history
        assert [r.phase for r in session.passes] == ["forward", "prefill", "decode"]
        assert session.runtime.counts["pruned_calls"] == 4 + (route == "pp.compile")  # every generate forward
    assert torch.equal(outs[0], outs[1])


def test_telemetry_memory_does_not_grow_with_calls():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", telemetry=True, **TINY)

    def held():
        tensors = [v for a in model.pp.runtime._agg.values() for v in a.values() if isinstance(v, torch.Tensor)]
        return len(tensors), sum(t.numel() for t in tensors)

    with torch.no_grad():
        for i in range(3):
            c(_batch(2, 12, i))
        after_3 = held()
        for i in range(12):
            c(_batch(2, 12, i))
    assert held() == after_3 and [r["calls"] for r in model.pp.runtime.stats()] == [15] * 8


@pytest.mark.inductor
def test_inductor_serves_a_stream_of_shapes_with_two_graphs():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, dynamic=True, **TINY)
    ref = pp.compile(random_model("llama-gqa"), 0.4, backend="eager", dynamic=True, **TINY)
    with torch.no_grad():
        for i, (b, L) in enumerate(_shapes(5, seed=3) + [(1, 9)]):
            ids = _batch(b, L, i)
            torch.testing.assert_close(c(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(model.pp.passes) == 2 and model.pp.runtime.counts["unpruned_calls"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.inductor
def test_cuda_call_never_synchronizes():
    model = random_model("llama-gqa").cuda()
    c = pp.compile(model, 0.4, **TINY)
    ids = _batch(4, 16, 0).cuda()
    with torch.no_grad():
        c(ids)  # compiles (compiling may synchronize)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            c(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(k.is_cuda for k in model.pp.runtime.last_selection().values())


def test_graph_breaks_that_split_every_block_make_the_call_unpruned_and_say_so():
    import types
    model = random_model("llama-gqa")
    mlp = model.model.layers[2].mlp

    def broken(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        torch._dynamo.graph_break()  # Dynamo then compiles each frame apart: no graph holds a block
        return self.down_proj(h)

    mlp.forward = types.MethodType(broken, mlp)
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    with torch.no_grad(), pytest.warns(UserWarning, match="unpruned forward: its compiled graphs held no whole"):
        out = c(_batch(2, 12, 0)).logits
    torch.testing.assert_close(out, model(_batch(2, 12, 0)).logits)
    assert model.pp.runtime.counts["unpruned_calls"] == 1 and model.pp.runtime.counts["pruned_calls"] == 0


def test_the_graphs_of_one_model_share_the_constants_made_from_its_weights():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", final_layout="copy", **TINY)
    with torch.no_grad():
        c(_batch(1, 12, 0))  # batch 1 and batch 3: two graphs (Dynamo specializes size 1)
        c(_batch(3, 12, 1))
    first, second = model.pp.passes
    made = {name: b for name, b in first.gm.named_buffers() if name.endswith(("_transposed", "_weight_terms"))}
    assert len(made) == 4 + 8  # a copy per pruned MLP, score terms per pruned site (layers 1..4)
    again = dict(second.gm.named_buffers())
    assert all(again[name] is t for name, t in made.items())
    with torch.no_grad():  # a weight changed in place is read again by the next graph
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
        c(_batch(1, 12, 2), attention_mask=torch.ones(1, 12, dtype=torch.long))
    changed = dict(model.pp.passes[-1].gm.named_buffers())
    copy = next(n for n in made if "layers_1_mlp" in n and n.endswith("_transposed"))
    assert changed[copy] is not made[copy]
    assert torch.equal(changed[copy], model.model.layers[1].mlp.down_proj.weight.t())


def test_the_pass_is_a_phase_of_dynamos_compile_metrics():
    from torch._dynamo.utils import compilation_time_metrics, compile_times
    compilation_time_metrics.pop("ppcompile_pass", None)
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", skip_layers=(0,), mlp_multiple=16)
    with torch.no_grad():
        c(torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)))
    seconds = compilation_time_metrics["ppcompile_pass"]  # what compile_times() tabulates
    assert len(seconds) == len(model.pp.passes) == 1 and seconds[0] > 0
    assert "ppcompile_pass" in compile_times(repr="str", aggregate=True)

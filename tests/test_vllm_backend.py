"""The vLLM step backend on a model shaped as vLLM compiles one (no vLLM needed): a warm-up step
leaves the state as it was, a prefill step selects and stores, a decode step reuses that selection, every step counted."""
import copy
import json

import pytest
import torch

from ppcompile import vllm_backend
from ppcompile.vllm_backend import OPTIONS_ENV, StepBackend, options_from_env
from reference import zero_pruned
from token_stream import TokenStream

OPTIONS = {"ratio": 0.5, "skip_layers": (), "mlp_multiple": 16, "inductor": False}


def steps(monkeypatch, kinds):
    """Make step_kind() answer `kinds` in turn, as vLLM's forward context would."""
    it = iter(kinds)
    monkeypatch.setattr(vllm_backend, "step_kind", lambda: next(it))


def compiled_as_vllm(model, backend):
    """As vLLM compiles its backbone: static but for the marked token dim, every guard dropped,
    so that the one graph runs at every token count (1 included)."""
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})

    def call(ids):  # (T,)
        torch._dynamo.mark_dynamic(ids, 0)
        return compiled(ids)
    return call


def test_prefill_stores_and_decode_reuses_the_selection_warmup_leaves_nothing(monkeypatch, capsys):
    torch.manual_seed(0)
    model = TokenStream().eval()
    step_backend = StepBackend({**vllm_backend.DEFAULTS, **OPTIONS})
    compiled = compiled_as_vllm(model, step_backend)
    runtime = step_backend.runtime
    seed = {f"layers.{i}.mlp": torch.rand(4, 128) for i in range(3)}  # as a calibration seeds it
    runtime.seed(seed)
    steps(monkeypatch, ["warmup", "prefill", "decode", "decode", "prefill", "prefill", "decode"])
    with torch.no_grad():
        compiled(torch.randint(0, 64, (16,)))  # warm-up: the state stays as it was
        assert not runtime.stored_sites and int(runtime.step) == 0 and bool(runtime.seeded)
        assert runtime.tables.keys() == seed.keys()
        for site, table in runtime.tables.items():
            torch.testing.assert_close(table[:4], seed[site], rtol=0, atol=0)
            assert float(table[4:].abs().sum()) == 0
        compiled(torch.randint(0, 64, (9,)))
        kept = runtime.last_selection()
        assert sorted(kept) == sorted(runtime.stored_sites) == [f"layers.{i}.mlp" for i in range(3)]
        reference = zero_pruned(copy.deepcopy(model), kept, head_dim=1)
        for tokens in (3, 1):  # decode steps of 3 requests, then of one: the prefill's selection
            ids = torch.randint(0, 64, (tokens,))
            torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
        for tokens in (12, 1):  # prefill steps select again, one of a single token too (probe: that token)
            ids = torch.randint(0, 64, (tokens,))
            out = compiled(ids)
            expected = zero_pruned(copy.deepcopy(model), runtime.last_selection(), head_dim=1)(ids)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        ids = torch.randint(0, 64, (2,))
        expected = zero_pruned(copy.deepcopy(model), runtime.last_selection(), head_dim=1)(ids)
        torch.testing.assert_close(compiled(ids), expected, rtol=1e-5, atol=1e-5)
    assert step_backend.counts == {"prefill": 3, "decode": 3, "warmup": 1, "dense": 0}
    err = capsys.readouterr().err  # a line at 1, 2, 4, ... served steps
    assert "[ppcompile] vLLM: 3 of 6 blocks pruned at ratio 0.5; dense: 3 attention (blocks=mlp)" in err
    assert "[ppcompile] vLLM steps: 4 pruned (2 prefill, 2 decode), 0 unpruned" in err
    assert "vLLM steps: 6 pruned" not in err
    assert int(runtime.step) == 3  # the history moved on every prefill step, not on decode steps


def test_a_model_with_nothing_pruned_counts_and_warns_each_unpruned_step(monkeypatch):
    model = TokenStream().eval()
    step_backend = StepBackend({**vllm_backend.DEFAULTS, **OPTIONS, "skip_layers": (0, 1, 2), "ratio": 0.0})
    compiled = compiled_as_vllm(model, step_backend)
    steps(monkeypatch, ["prefill", "decode"])
    with torch.no_grad(), pytest.warns(UserWarning, match="ran unpruned"):
        compiled(torch.randint(0, 64, (4,)))
        compiled(torch.randint(0, 64, (1,)))
    assert step_backend.counts["dense"] == 2


def test_options_come_from_the_environment_as_json(monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    assert options_from_env() is None
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"ratio": 0.3}))
    assert options_from_env() == {**vllm_backend.DEFAULTS, "ratio": 0.3}
    monkeypatch.setenv(OPTIONS_ENV, "ratio=0.3")
    with pytest.raises(ValueError, match="JSON object"):
        options_from_env()
    monkeypatch.setenv(OPTIONS_ENV, "[0.3]")
    with pytest.raises(ValueError, match="JSON object"):
        options_from_env()

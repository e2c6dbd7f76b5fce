"""ppcompile.methods: every registered policy is an eval method or refused with its reason, and a
method's label reads back as what it names (bench/results/ JSON labels of earlier runs too)."""
import json
from pathlib import Path

import pytest
import torch

import ppcompile as pp
from ppcompile import methods
from ppcompile.evaluate import model_logits_fn
from ppcompile.models import random_model
from ppcompile.policies import POLICIES

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_every_registered_policy_is_a_method_or_refused_with_where_it_is_measured():
    for name in POLICIES:
        assert (name in methods.METHODS) != (name in methods.REFUSED), name
    assert list(methods.METHODS) == ["dense", "pp", "full-batch", "wanda-sp", "flap"]  # dense first, as before
    assert set(methods.REFUSED) == {"griffin"} and methods.RATIO_FREE == {"dense"}
    for spec in ("griffin", "dense,griffin"):
        with pytest.raises(ValueError, match=r"'griffin'.*forward pass.*run dense.*ppcompile generate --policy griffin"):
            methods.parse_methods(spec)
    with pytest.raises(ValueError, match="ppcompile generate --policy griffin"):
        methods.build_method("griffin", torch.nn.Linear(2, 2), 0.4)
    assert methods.parse_methods(" dense, pp,full-batch,wanda-sp,flap ") == list(methods.METHODS)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['top'\]; known methods: dense, pp, full-batch, "
                                         r"wanda-sp, flap$"):
        methods.parse_methods("dense,top")


def test_what_the_refusal_says_holds_griffin_runs_a_forward_dense():
    model = random_model("llama-gqa")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    compiled = pp.compile(model, 0.4, policy="griffin", backend="eager", skip_layers=(0,))
    with torch.no_grad():
        dense = model_logits_fn(model)(ids)
        griffin = model_logits_fn(compiled)(ids)
    # the pass rewrote a forward graph and selected at its MLP sites, yet what eval would measure of
    # griffin is dense's figures
    assert [r.phase for r in compiled.pp.passes] == ["forward"]
    assert any(s.pruned and s.kind == "mlp" for s in compiled.pp.passes[0].sites)
    torch.testing.assert_close(griffin, dense)


@pytest.mark.parametrize("args, options, text", [
    (("pp", 0.4), {}, "pp@0.4"),
    (("pp", 0.0), {}, "pp@0"),
    (("pp",), {}, "pp"),
    (("dense", 0.0), {}, "dense"),
    (("pp",), {"probe": "paper"}, "pp probe=paper"),
    (("pp", 0.2), {"shards": 3}, "pp@0.2 shards=3"),
    (("pp", 0.4), {"probe": "spread", "probe_budget": None, "history": False},
     "pp@0.4 probe=spread probe_budget=null history=false"),
])
def test_a_label_reads_back_as_the_method_it_names(args, options, text):
    assert methods.label(*args, **options) == text
    policy, ratio, parsed = methods.parse_label(text, ratio=0.7)
    expected_ratio = 0.0 if policy == "dense" else args[1] if len(args) > 1 else 0.7
    assert (policy, ratio, parsed) == (args[0], expected_ratio, options)


@pytest.fixture
def protocol(bench_module):
    return bench_module("protocol")


def test_every_method_label_in_the_results_reads_and_earlier_spellings_read_as_labels(protocol):
    names = set()
    for path in (BENCH / "results").glob("*.json*"):
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
        names |= {r["method"] for r in rows if isinstance(r, dict) and "method" in r}
    assert {"pp@0", "pp-eager", "pp-static", "pp probe=paper", "0.2/3"} <= names
    for name in names:
        policy, _, options = protocol.parse_label(name)
        assert policy in POLICIES, name
        pp.PPConfig.from_options({"policy": policy, **{k: v for k, v in options.items() if k != "backend"}})
    assert protocol.canonical("pp-eager") == "pp backend=eager"
    assert protocol.canonical("pp-static") == "pp dynamic=false"
    assert protocol.canonical("0.2/3") == "pp@0.2 shards=3"
    assert protocol.canonical("pp probe=paper") == "pp probe=paper"


def test_a_quality_method_prunes_at_every_size_unless_told_otherwise(monkeypatch):
    """Quality measures the method, not the serving decision: no cost rule (a tiny model would pay
    at no size, so under the rule its perplexity would be the dense model's)."""
    monkeypatch.delenv("PPCOMPILE_GATHER_COST", raising=False)  # the devices' default, as a user has it
    ids = torch.randint(0, 128, (1, 8))
    for options, pruned in (({}, True), ({"gather_cost": 64}, False)):
        torch._dynamo.reset()
        model = random_model("llama-gqa")
        logits = methods.build_method("pp", model, 0.4, backend="eager", skip_layers=(0,), mlp_multiple=16, **options)
        logits(ids)
        assert bool(model.pp.passes[-1].active_sites) == pruned, options

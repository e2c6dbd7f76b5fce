"""Which heads and channels the pass keeps, through the whole real model (SmolLM2-135M-Instruct,
fp32, Brown text), against Probe Pruning written out by hand (tests/by_hand.py: no ppcompile
code): every probe design over three calls (the warm-up, the call that seeds the history, one
that fuses with it), full-batch, and the forward they give."""
import pytest
import torch

import ppcompile as pp
from ppcompile import data
from ppcompile.models import load_model

from by_hand import ByHand
from mutants import MUTANTS, mutate

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    windows = data.token_windows("brown:a", tokenizer, seq_len=48, n_windows=12)  # (12, 48)
    return model, windows.view(3, 4, 48)  # three calls of (4, 48)


def kept_matches_by_hand(model, batches, policy="pp", design="spread", **options):
    """Compile, call once per batch, and check every site's kept units and the logits against
    the by-hand method run beside it. Returns how many sites took the pass's near-tie choice."""
    ref = ByHand(model, design=design, policy=policy)
    c = pp.compile(model, 0.4, policy=policy, probe=design, backend="eager", strict=True, **options)
    with torch.no_grad():
        for ids in batches:
            logits = c(ids).logits
            got = model.pp.runtime.last_selection()
            want_logits, want = ref.forward(ids, follow=got)
            assert sorted(got) == sorted(want)  # every site past layer 2 pruned
            for site in want:
                assert got[site].tolist() == want[site].tolist(), site
            torch.testing.assert_close(logits, want_logits, rtol=1e-3, atol=1e-3)
    assert model.pp.runtime.counts["unpruned_calls"] == 0
    return ref.adopted


@pytest.mark.parametrize("design", ["spread"] + [pytest.param(d, marks=pytest.mark.slow)  # the default in the fast tier
                                    for d in ("paper", "every", "stratified", "flat")])
def test_pp_keeps_the_units_probe_pruning_gives_by_hand(smollm2, design):
    model, batches = smollm2
    adopted = kept_matches_by_hand(model, batches, design=design)
    assert adopted <= 3, f"{adopted} of 162 sites differed at the cut"  # near-ties are rare


def test_at_batch_1_the_whole_batch_is_the_probe_and_keeps_what_it_gives_by_hand(smollm2):
    # batch 1: the probe would run half the sequence, more than the share of the first
    # projections' multiply-adds that pruning saves (MLP 640/1536, attention 4 of 15 q/k/v heads'
    # rows), so each block's own activations select; at batch 4 (an eighth) the probe does
    model, batches = smollm2
    kept_matches_by_hand(model, batches[:, :1])
    assert {r["selects"] for r in model.pp.summary() if r["status"] == "pruned"} == {"whole batch"}
    kept_matches_by_hand(model, batches[:1])
    assert {r["selects"] for r in model.pp.summary() if r["status"] == "pruned"} == {"probe"}
    c = pp.compile(model, 0.4, backend="eager", whole_batch_when_cheaper=False)  # the paper's probe, always
    with torch.no_grad():
        c(batches[0, :1])
    assert {r["selects"] for r in model.pp.summary() if r["status"] == "pruned"} == {"probe"}


def test_full_batch_keeps_the_units_of_the_whole_batchs_energy_by_hand(smollm2):
    model, batches = smollm2
    kept_matches_by_hand(model, batches[:1], policy="full-batch")


# ---- a wrong selection fails these checks ----
@pytest.mark.slow
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("policy,design", [("pp", d) for d in ("spread", "paper", "every", "stratified", "flat")]
                         + [("full-batch", "spread")])
def test_a_mutated_selection_fails_the_by_hand_check(smollm2, monkeypatch, mutant, policy, design):
    model, batches = smollm2
    mutate(monkeypatch, mutant)
    with pytest.raises(AssertionError, match="far from the cut"):
        kept_matches_by_hand(model, batches[:1], policy=policy, design=design)

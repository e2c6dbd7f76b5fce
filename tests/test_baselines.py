"""Wanda-sp and FLAP decisions on hand-made statistics, checked against the formulas by hand."""
import math

import pytest
import torch

import by_hand
import ppcompile as pp
from mutants import MUTANTS, mutate

from ppcompile.baselines import choose, flap_allocation
from ppcompile.calibration import Calibration
from ppcompile.passes.sites import Site
from ppcompile.policies import get_policy


def unit_scores(policy, site, weight, cal):
    policy = get_policy(policy)
    return policy.unit_scores(site, policy.channel_metric(site, weight, cal))


def _site(name, kind, channels, heads=0, head_dim=0, kept=0):
    return Site(name=name, kind=kind, layer=1, final=None, projections=[], x=None, x_res=None, region=[],
                channels=channels, heads=heads, head_dim=head_dim, kept=kept)


def _calibration(site, x):
    """Statistics of x (N, L, C), all tokens real."""
    cal = Calibration("fp")
    cal.stats[site] = {"sq": x.pow(2).sum(0), "count": torch.full((x.shape[1],), float(x.shape[0])),
                       "total": x.double().sum((0, 1)), "total_sq": x.double().pow(2).sum((0, 1))}
    return cal


X = torch.tensor([[[1.0, -2.0, 0.5, 3.0], [2.0, 0.0, -1.0, 1.0]],
                  [[3.0, 2.0, 0.5, -1.0], [0.0, 4.0, 1.0, 1.0]]])  # (N=2, L=2, C=4)
W = torch.tensor([[1.0, -1.0, 2.0, 0.5], [-3.0, 0.5, 1.0, 1.0]])  # (d_out=2, C=4)


def test_wanda_sp_scores_by_hand():
    cal = _calibration("s", X)
    # S_j = sum over positions of the mean of x^2: position 0 (1+9)/2, (4+4)/2, (.25+.25)/2, (9+1)/2;
    # position 1 (4+0)/2, (0+16)/2, (1+1)/2, (1+1)/2
    S = torch.tensor([5 + 2, 4 + 8, 0.25 + 1, 5 + 1], dtype=torch.float64)
    col_abs = torch.tensor([4.0, 1.5, 3.0, 1.5], dtype=torch.float64)
    expected = col_abs * S.sqrt()
    got = unit_scores("wanda-sp", _site("s", "mlp", 4), W, cal)
    torch.testing.assert_close(got, expected)
    heads = unit_scores("wanda-sp", _site("s", "attention", 4, heads=2, head_dim=2), W, cal)
    torch.testing.assert_close(heads, torch.stack([expected[:2].sum(), expected[2:].sum()]))


def test_flap_scores_by_hand():
    cal = _calibration("s", X)
    tokens = X.reshape(-1, 4).double()
    V = tokens.var(0, unbiased=False)  # e.g. channel 0: values 1, 2, 3, 0 -> mean 1.5, var 1.25
    assert math.isclose(V[0].item(), 1.25)
    raw = V * torch.tensor([10.0, 1.25, 5.0, 1.25], dtype=torch.float64)  # V_j * sum_i W_ij^2
    z = (raw - raw.mean()) / raw.std(unbiased=False)  # standardized over the block's channels
    torch.testing.assert_close(unit_scores("flap", _site("s", "mlp", 4), W, cal), z)
    heads = unit_scores("flap", _site("s", "attention", 4, heads=2, head_dim=2), W, cal)
    torch.testing.assert_close(heads, torch.stack([z[:2].mean(), z[2:].mean()]))


def test_flap_allocation_prunes_the_globally_lowest_units():
    scores = {"a": torch.tensor([-1.2, 0.0, 1.2]), "b": torch.tensor([-1.3, -0.4, 0.4, 1.3])}
    cost = {"a": 1.0, "b": 2.0}
    # ascending: b0, a0, b1, a1, b2, ...
    assert flap_allocation(scores, cost, target=3) == {"a": 2, "b": 3}  # b0 (2) + a0 (1) reach 3
    assert flap_allocation(scores, cost, target=5) == {"a": 2, "b": 2}  # + b1 (2)
    assert flap_allocation(scores, cost, target=0) == {"a": 3, "b": 4}
    assert flap_allocation(scores, cost, target=100) == {"a": 1, "b": 1}  # every site keeps one unit


def test_flap_bias_compensation_is_the_pruned_columns_times_their_mean():
    cal = _calibration("s", X)
    site = _site("s", "mlp", 4)
    flap = get_policy("flap")
    (kept,) = choose(flap, [site], {"s": flap.channel_metric(site, W, cal)}, {"s": 4}, {"s": 1.0},
                     layer_ratio=0.5).values()
    mu = X.reshape(-1, 4).mean(0)
    pruned = [j for j in range(4) if j not in kept.tolist()]
    assert len(kept) == 2 and len(pruned) == 2
    expected = sum(W[:, j] * mu[j] for j in pruned)
    torch.testing.assert_close(flap.bias(site, W, kept, cal), expected)


def test_wanda_sp_keeps_the_uniform_count_of_best_heads():
    cal = _calibration("s", X)
    site = _site("s", "attention", 4, heads=2, head_dim=2)
    wanda = get_policy("wanda-sp")
    (kept,) = choose(wanda, [site], {"s": wanda.channel_metric(site, W, cal)}, {"s": 1}, {"s": 1.0},
                     layer_ratio=0.5).values()
    scores = unit_scores("wanda-sp", site, W, cal)
    assert kept.tolist() == [int(scores.argmax())] and wanda.bias(site, W, kept, cal) is None


def test_over_shards_flap_keeps_its_threshold_and_a_unit_in_every_run():
    """Channel metrics 4, 3, 1, 2 (standardizing keeps the order), one unit each, pruning 3 of 4:
    one block keeps channel 0 only; over two shards, run 1 (channels 2, 3) keeps its best, 3, and
    the threshold then stops at channel 1 (run 0 keeps 0 as well)."""
    site, metric = _site("s", "mlp", 4), {"s": torch.tensor([4.0, 3.0, 1.0, 2.0], dtype=torch.float64)}
    flap, wanda = get_policy("flap"), get_policy("wanda-sp")
    assert choose(flap, [site], metric, {"s": 1}, {"s": 1.0}, layer_ratio=0.75)["s"].tolist() == [0]
    assert choose(flap, [site], metric, {"s": 1}, {"s": 1.0}, layer_ratio=0.75, groups=2)["s"].tolist() == [0, 3]
    assert choose(wanda, [site], metric, {"s": 2}, {"s": 1.0}, layer_ratio=0.5, groups=2)["s"].tolist() == [0, 3]


@pytest.fixture(scope="module")
def smollm2_calibrated():
    """The real model, its calibration by the package and by hand (before any compile), and a
    batch of other windows."""
    from ppcompile import data
    from ppcompile.models import load_model
    model, tokenizer = load_model("smollm2-135m")
    windows = data.token_windows("brown:a", tokenizer, seq_len=48, n_windows=8)  # (8, 48)
    batches = [windows[:2], windows[2:4]]
    return model, pp.calibrate(model, batches), by_hand.calibration_stats(model, batches), windows[4:]


def static_matches_by_hand(model, cal, stats, ids, policy):
    """Compile `policy`: its kept units on every site and its logits must be those of the
    formulas computed by hand from the dense statistics (tests/by_hand.py)."""
    want = by_hand.static_kept(model, stats, policy)
    c = pp.compile(model, 0.4, policy=policy, calibration=cal, backend="eager", strict=True)
    with torch.no_grad():
        logits = c(ids).logits
    got = model.pp.runtime.last_selection()
    assert sorted(got) == sorted(want)
    for site in want:
        assert got[site].tolist() == want[site].tolist(), f"{site}: kept {got[site].tolist()}, by hand {want[site].tolist()}"
    with torch.no_grad(), by_hand.static_pruned(model, want, stats if policy == "flap" else None):
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.real_model
@pytest.mark.parametrize("policy", ["wanda-sp", "flap"])
def test_static_policies_keep_what_their_formulas_give_by_hand_on_the_real_model(smollm2_calibrated, policy):
    static_matches_by_hand(*smollm2_calibrated, policy)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("policy", ["wanda-sp", "flap"])
def test_a_mutated_selection_fails_the_static_by_hand_check(smollm2_calibrated, monkeypatch, mutant, policy):
    mutate(monkeypatch, mutant)
    with pytest.raises(AssertionError, match="by hand"):
        static_matches_by_hand(*smollm2_calibrated, policy)

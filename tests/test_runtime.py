"""The runtime's telemetry: what each call kept, overlaps, probe shares."""
import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.runtime import Runtime, _jaccard

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def test_jaccard_by_hand():
    assert _jaccard(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])) == 2 / 4
    assert _jaccard(torch.tensor([5, 7]), torch.tensor([7, 5])) == 1.0


def test_telemetry_over_identical_and_different_batches():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", telemetry=True, **TINY)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c(ids)  # warm-up: the history does not change, so the same batch again keeps the same
        c(ids)
    rows = model.pp.runtime.stats()
    cfg = model.pp.config
    assert len(rows) == 8
    for r in rows:
        assert r["calls"] == 2 and r["jaccard"] == 1.0
        assert r["kept"] == (cfg.kept_heads(4, 5) if r["kind"] == "attention" else cfg.kept_channels(128, 5))
        # unseeded history at the warm-up: the energy is all probe; then the probe shares it
        assert 0.0 < r["probe_share"] <= 1.0
        # a pruned head: its 16 rows of q (64 wide) and 16 columns of o (64 tall); the block:
        # q and o 64 x 64, k and v 32 x 64 (2 K/V heads, never pruned)
        assert r["pruned_flops"] == pytest.approx(
            (4 - r["kept"]) * 16 * (64 + 64) / (2 * 64 * 64 + 2 * 32 * 64)
            if r["kind"] == "attention" else (128 - r["kept"]) / 128)
    freq = model.pp.runtime.kept_frequency("model.layers.2.mlp")
    assert freq.shape == (128,) and set(freq.unique().tolist()) <= {0.0, 1.0}
    assert int(freq.sum()) == cfg.kept_channels(128, 5)


def test_stats_without_telemetry_is_a_clear_error():
    with pytest.raises(ValueError, match="telemetry=True"):
        Runtime().stats()


def test_state_round_trips_by_slot_name_and_a_state_saved_with_dotted_keys_still_loads():
    rt = Runtime()
    table = torch.arange(12.0).view(3, 4)
    rt.seed({"model.layers.1.mlp": table})
    state = rt.state_dict()
    assert set(state) == {"history/model.layers.1.mlp", "step", "seeded", "key"}
    old = {"history.model.layers.1.mlp": table * 2, "step": torch.tensor(5), "seeded": torch.tensor(True)}
    fresh = Runtime()
    fresh.load_state_dict(old)  # earlier versions spelled the history "history.<site>"
    assert torch.equal(fresh.tables["model.layers.1.mlp"], table * 2) and int(fresh.step) == 5
    fresh.load_state_dict(state)
    assert torch.equal(fresh.tables["model.layers.1.mlp"], table) and int(fresh.step) == 0

"""Calibration statistics against a direct computation from the dense model's activations."""
import pytest
import torch

import ppcompile as pp
from ppcompile.calibration import Calibration, collect, fingerprint
from ppcompile.models import random_model

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _batches():
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (3, 12), generator=gen) for _ in range(2)]
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return [{"input_ids": ids[0], "attention_mask": mask}, {"input_ids": ids[1], "attention_mask": torch.ones_like(mask)}]


def _final_inputs(model, batches, module):
    """Inputs of `module` over the batches, via a forward hook on the dense model: (N, L, C) and masks."""
    xs = []
    hook = module.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    return torch.cat(xs), torch.cat([b["attention_mask"] for b in batches]).bool()


@pytest.mark.parametrize("arch,name,path", [("llama-gqa", "model.layers.3.mlp", "model.layers.3.mlp.down_proj"),
                                            ("llama-gqa", "model.layers.2.attention", "model.layers.2.self_attn.o_proj"),
                                            ("opt", "model.decoder.layers.1.mlp", "model.decoder.layers.1.fc2")])
def test_statistics_equal_a_direct_computation(arch, name, path):
    model = random_model(arch)
    batches = _batches()
    cal = collect(model, batches)
    x, valid = _final_inputs(model, batches, model.get_submodule(path))
    if x.dim() == 2:  # OPT's MLP runs on (B*L, C)
        x = x.view(valid.shape[0], valid.shape[1], -1)
    w = valid.unsqueeze(-1).double()
    x = x.double()
    history = (x.pow(2) * w).sum(0) / w.sum(0)  # (L, C): mean over real tokens at each position
    tokens = x[valid]  # (N_real, C)
    torch.testing.assert_close(cal.history(name).double(), history, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cal.mean(name), tokens.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(cal.variance(name), tokens.var(0, unbiased=False), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(cal.energy(name), history.sum(0), rtol=1e-5, atol=1e-7)


def test_save_load_round_trip(tmp_path):
    model = random_model("llama-mha")
    cal = collect(model, [torch.randint(0, 128, (2, 10))], meta={"text": "test"})
    cal.save(tmp_path / "cal.pt")
    back = Calibration.load(tmp_path / "cal.pt")
    assert back.fingerprint == cal.fingerprint == fingerprint(model) and back.meta == {"text": "test"}
    for site in cal.stats:
        for key in cal.stats[site]:
            assert torch.equal(back.stats[site][key], cal.stats[site][key])
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ppcompile calibration"):
        Calibration.load(tmp_path / "other.pt")


def test_fingerprint_tells_models_apart():
    a, b = random_model("llama-gqa", seed=0), random_model("llama-gqa", seed=1)
    assert fingerprint(a) == fingerprint(random_model("llama-gqa", seed=0))
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(random_model("llama-gqa", seed=0).half())


def test_calibration_from_another_model_is_an_error(tmp_path):
    cal = collect(random_model("llama-gqa", seed=1), [torch.randint(0, 128, (2, 10))])
    with pytest.raises(ValueError, match="another model"):
        pp.compile(random_model("llama-gqa", seed=0), 0.4, calibration=cal, backend="eager")
    cal.save(tmp_path / "cal.pt")
    with pytest.raises(ValueError, match="another model"):
        pp.compile(random_model("llama-gqa", seed=0), 0.4, policy="flap", calibration=tmp_path / "cal.pt")


def test_calibration_seeds_the_history_and_the_warm_up_leaves_it():
    model = random_model("llama-gqa")
    batches = _batches()
    c = pp.compile(model, 0.4, backend="eager", calibration=batches, **TINY)
    rt, cal = model.pp.runtime, model.pp.calibration
    assert rt.seeded.item()
    for site, table in rt.tables.items():
        assert torch.equal(table, cal.history(site))
    with torch.no_grad():
        c(torch.randint(0, 128, (2, 12)))  # the warm-up call
    pruned = [s for s, sel in rt.last_selection().items()]
    assert pruned and all(torch.equal(rt.tables[s], cal.history(s)) for s in pruned)
    with torch.no_grad():
        c(torch.randint(0, 128, (2, 12)))  # EMA with the momentum: only kept channels move
    for s in pruned:
        kept = rt.last_selection()[s]
        chan = (kept[:, None] * 16 + torch.arange(16)).flatten() if s.endswith("attention") else kept
        moved = (rt.tables[s] != cal.history(s)).any(0)
        assert moved[chan].any() and not moved[~torch.isin(torch.arange(moved.numel()), chan)].any()


def test_pp_calibrate_on_a_compiled_model_seeds_it():
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", **TINY)
    cal = pp.calibrate(c, [torch.randint(0, 128, (2, 10))])
    assert model.pp.calibration is cal and model.pp.runtime.seeded.item()


def test_static_policies_need_calibration_and_no_batches_is_an_error():
    with pytest.raises(ValueError, match="needs calibration"):
        pp.compile(random_model("llama-gqa"), 0.4, policy="wanda-sp")
    with pytest.raises(ValueError, match="no batches"):
        collect(random_model("llama-gqa"), [])


def test_a_forward_dynamo_will_not_compile_is_a_clear_error():
    # Dynamo runs a forward uncompiled once it reached its recompile limit; the calibration pass
    # then never sees a graph, which must not read as "this model has no blocks"
    model = random_model("llama-gqa")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=0), pytest.raises(RuntimeError, match="recompile_limit"):
        collect(model, [torch.randint(0, 128, (2, 8))])

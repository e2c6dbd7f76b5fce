"""Calibration statistics against a direct computation from the dense model's activations."""
import pickle
import random
import re

import pytest
import torch

import ppcompile as pp
from ppcompile.calibration import FORMAT, Calibration, collect, fingerprint
from ppcompile.models import random_config, random_model

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
    # fp32 sums over the tokens (vs a double mean): measured 3e-9 apart on an AVX2 CPU
    torch.testing.assert_close(cal.mean(name), tokens.mean(0), rtol=1e-5, atol=1e-7)
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
        c(torch.randint(0, 128, (2, 12)))  # EMA with the momentum
    selects = {r["site"]: r["selects"] for r in model.pp.summary()}
    for s in pruned:
        moved = (rt.tables[s] != cal.history(s)).any(0)
        if selects[s] == "whole batch":  # every channel ran to select: every channel learns
            assert moved.all(), s
            continue
        kept = rt.last_selection()[s]  # a probe: only the kept channels ran on the whole batch
        chan = (kept[:, None] * 16 + torch.arange(16)).flatten() if s.endswith("attention") else kept
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


def test_loading_a_missing_file_says_how_to_make_one(tmp_path):
    path = tmp_path / "nowhere" / "cal.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no calibration at {path}: compute one with "
                                                          "pp.calibrate(model, batches) and .save(path)")):
        Calibration.load(path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is not a ppcompile calibration (a folder)")):
        Calibration.load(tmp_path)


@pytest.mark.parametrize("content", [
    b"", b"hello world\nthis is text\n", b"PK\x03\x04" + bytes(range(100)), pickle.dumps({"format": FORMAT}),
    *[bytes(random.Random(seed).randrange(256) for _ in range(200)) for seed in range(20)],
])
def test_loading_garbage_is_a_clear_error_not_torchs(tmp_path, content):
    path = tmp_path / "cal.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a ppcompile calibration (torch.load cannot read "
                                                   "it: ") + r"\w+\): pass a file written by Calibration.save"):
        Calibration.load(path)


@pytest.mark.parametrize("state, problem", [
    (torch.zeros(3), "it holds a Tensor, not a dict"),
    ({"something": 1}, "format None, expected 'ppcompile.calibration/1'"),
    ({"format": "ppcompile.calibration/0"}, "format 'ppcompile.calibration/0'"),
    ({"format": FORMAT, "fingerprint": "ab", "meta": {}, "batches": 1}, "missing or malformed stats"),
    ({"format": FORMAT, "fingerprint": "ab", "meta": {}, "batches": 1, "stats": {"s": {"sq": 1}}},
     "malformed statistics of s"),
])
def test_loading_a_torch_file_of_another_structure_is_a_clear_error(tmp_path, state, problem):
    torch.save(state, tmp_path / "cal.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'cal.pt'} is not a ppcompile calibration ({problem}")):
        Calibration.load(tmp_path / "cal.pt")


@pytest.mark.parametrize("batch, error, match", [
    ("some text", TypeError, "calibration batch 1 is a str; expected a LongTensor (batch, seq) of token ids or a "
                             "dict with 'input_ids' (and 'attention_mask')"),
    ([1, 2, 3], TypeError, "calibration batch 1 is a list; expected a LongTensor"),
    ({"attention_mask": torch.ones(2, 8)}, ValueError, "calibration batch 1 is a dict without 'input_ids'"),
    (torch.rand(2, 8), TypeError, "calibration batch 1 is a torch.float32 tensor; expected a LongTensor"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "calibration batch 1 is empty (shape (2, 0))"),
    (torch.randint(0, 128, (8,)), ValueError, "calibration batch 1 has shape (8,); expected a LongTensor"),
])
def test_a_wrong_calibration_batch_is_refused_before_any_pass(batch, error, match):
    # model=None: the whole list is checked before the model is touched (fingerprint, compile, passes)
    with pytest.raises(error, match=re.escape(match)):
        collect(None, [torch.randint(0, 128, (2, 8)), batch])
    with pytest.raises(error, match=re.escape(match)):  # a generator: checked as it comes
        collect(random_model("llama-gqa"), (b for b in [torch.randint(0, 128, (2, 8)), batch]))


@pytest.mark.parametrize("batches, match", [
    ("some text", "calibration batches must be a list (or any iterable) of batches, got a str"),
    (torch.randint(0, 128, (4, 8)), "got a Tensor: iterating a tensor of shape (4, 8) gives its rows: pass [ids] for "
                                    "one batch"),
    ({"input_ids": torch.randint(0, 128, (4, 8))}, "got a dict: a dict is one batch"),
])
def test_one_batch_instead_of_a_list_of_batches_is_refused(batches, match):
    with pytest.raises(TypeError, match=re.escape(match)):
        collect(None, batches)
    with pytest.raises(TypeError, match=re.escape(match)):
        pp.calibrate(random_model("llama-gqa"), batches)


def test_a_model_on_the_meta_device_is_a_clear_error():
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config("llama-gqa"))
    with pytest.raises(ValueError, match=re.escape(
            "the model's weights are on the meta device (not loaded): load real weights (e.g. from_pretrained without "
            "device_map='meta' / init_empty_weights) before pp.compile")):
        fingerprint(model)


def test_an_empty_list_of_batches_is_refused_before_the_model_is_touched():
    with pytest.raises(ValueError, match=re.escape("calibration got no batches: pass a list of at least one token "
                                                   "batch (B, L)")):
        collect(None, [])


def test_statistics_of_a_bfloat16_model_accumulate_in_fp32_and_serve_that_model():
    model = random_model("llama-gqa", dtype=torch.bfloat16)
    batches = _batches()
    cal = collect(model, batches)
    name, path = "model.layers.3.mlp", "model.layers.3.mlp.down_proj"
    x, valid = _final_inputs(model, batches, model.get_submodule(path))  # bf16 activations
    w = valid.unsqueeze(-1).double()
    history = (x.double().pow(2) * w).sum(0) / w.sum(0)  # the bf16 values, summed exactly
    assert cal.history(name).dtype == torch.float32
    # fp32 accumulation of bf16 values: within fp32 rounding of the exact sum (bf16 keeps 8 bits of
    # mantissa: a bf16 accumulation would miss this tolerance by orders of magnitude)
    torch.testing.assert_close(cal.history(name).double(), history, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cal.mean(name), x.double()[valid].mean(0), rtol=1e-5, atol=1e-8)
    # the fingerprint tells the bf16 model from its fp32 original: each calibration serves its own
    assert fingerprint(model) != fingerprint(random_model("llama-gqa"))
    pp.compile(model, 0.4, policy="flap", backend="eager", calibration=cal, **TINY)  # its own: accepted
    with pytest.raises(ValueError, match="another model"):
        pp.compile(random_model("llama-gqa"), 0.4, policy="flap", backend="eager", calibration=cal, **TINY)

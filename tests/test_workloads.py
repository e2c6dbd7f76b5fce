"""workloads.windows_and_calibration(reuse=True): a calibration kept in $PPCOMPILE_CACHE is loaded,
not collected again, and equals a fresh one; anything it depends on names another file."""
import pytest
import torch

from ppcompile import calibration, data, workloads
from ppcompile.models import load_model, random_config


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM
    _, tokenizer = load_model("smollm2-135m")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(random_config("llama-gqa", vocab_size=len(tokenizer))), tokenizer


def _calibrate(model, tokenizer, seed=0, reuse=True):
    return workloads.windows_and_calibration(model, tokenizer, "brown:a", 32, 4, 2, "brown:b", 4, seed, False,
                                             reuse=reuse)


@pytest.mark.real_model
def test_a_reused_calibration_is_loaded_and_equals_a_collected_one(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    (tmp_path / "brown").symlink_to(data.cache_dir() / "brown")  # the corpus, from the real cache
    monkeypatch.setenv("PPCOMPILE_CACHE", str(tmp_path))
    windows, first, _ = _calibrate(model, tokenizer)
    assert len(list((tmp_path / "calibration").glob("*.pt"))) == 1

    def refuse(*a, **k):
        raise AssertionError("collected again")

    monkeypatch.setattr(workloads, "collect", refuse)
    windows_again, loaded, _ = _calibrate(model, tokenizer)
    assert torch.equal(windows, windows_again)
    assert loaded.stats.keys() == first.stats.keys() and loaded.batches == first.batches
    for site, tables in first.stats.items():
        for name, t in tables.items():
            assert torch.equal(loaded.stats[site][name], t), (site, name)
    monkeypatch.setattr(workloads, "collect", calibration.collect)
    _calibrate(model, tokenizer, seed=1)  # another seed: other windows, another file
    assert len(list((tmp_path / "calibration").glob("*.pt"))) == 2
    _calibrate(model, tokenizer, reuse=False)  # not kept
    assert len(list((tmp_path / "calibration").glob("*.pt"))) == 2

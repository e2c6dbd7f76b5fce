"""`ppcompile eval` end to end on a tiny random checkpoint with the packaged model's tokenizer."""
import json
import math

import pytest
import torch

from ppcompile import cli, data
from ppcompile.models import load_model, random_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    _, tokenizer = load_model("smollm2-135m")
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_config("llama-gqa", vocab_size=len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.real_model
def test_eval_with_calibration_writes_every_method(tiny_checkpoint, tmp_path):
    out = tmp_path / "rows.json"
    code = cli.main(["eval", "--model", str(tiny_checkpoint), "--data", "pydoc", "--seq-len", "32",
                     "--batch-size", "2", "--batches", "2", "--methods", "dense,pp,flap", "--ratio", "0.4",
                     "--calibration", "pydoc", "--calibration-windows", "4", "--backend", "eager",
                     "--quiet", "--json", str(out)])
    assert code == 0
    rows = {r["method"] + str(r["ratio"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {"dense0.0", "pp0.4", "flap0.4"}
    assert rows["pp0.4"]["calibration"] == {"text": "pydoc", "windows": 4, "seq_len": 32, "seed": 0}
    # dense perplexity, directly: the evaluation half of pydoc (calibration got the other half)
    model, tokenizer = load_model(str(tiny_checkpoint))
    eval_docs, _ = data.split_disjoint(data.load_documents("pydoc"), data.load_documents("pydoc"))
    windows = data.token_windows(eval_docs, tokenizer, 32, n_windows=4)
    with torch.no_grad():
        losses = [model(b, labels=b).loss for b in windows.split(2)]
    assert math.isclose(rows["dense0.0"]["ppl"], math.exp(torch.stack(losses).mean().item()), rel_tol=1e-4)
    assert rows["flap0.4"]["ppl"] != rows["dense0.0"]["ppl"]


def test_static_method_without_calibration_is_a_clear_error(capsys):
    code = cli.main(["eval", "--model", "smollm2-135m", "--methods", "wanda-sp", "--batches", "1", "--quiet"])
    assert code == 2 and "--calibration" in capsys.readouterr().err


@pytest.mark.real_model
def test_inspect_prints_sites_telemetry_and_draws_the_plot(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kept.png"
    code = cli.main(["inspect", "--model", str(tiny_checkpoint), "--data", "pydoc", "--ratio", "0.4",
                     "--seq-len", "32", "--batch-size", "4", "--batches", "3", "--backend", "eager",
                     "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    assert "model.layers.4.mlp" in out and "FLOPs per call" in out and "telemetry over 3 batches" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

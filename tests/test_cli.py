"""`ppcompile eval` end to end on a tiny random checkpoint with the packaged model's tokenizer."""
import json
import math

import pytest
import torch

from ppcompile import cli, data, workloads
from ppcompile.models import load_model, random_config, random_model


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


def test_eval_passes_pp_options_to_the_pruned_methods_and_refuses_unknown_ones(tiny_checkpoint, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_checkpoint), "--data", "pydoc", "--seq-len", "32", "--batch-size", "2",
            "--batches", "1", "--methods", "dense,pp", "--ratio", "0.4", "--backend", "eager", "--quiet"]
    ppl = {}
    for probe in ("paper", "flat"):
        out = tmp_path / f"{probe}.json"
        assert cli.main(base + ["--pp", f"probe={probe}", "--pp", "history=false", "--json", str(out)]) == 0
        rows = {r["method"]: r for r in json.loads(out.read_text())}
        assert rows["pp"]["options"] == {"probe": probe, "history": False}
        ppl[probe] = rows["pp"]["ppl"]
    assert ppl["paper"] != ppl["flat"]  # the option reached the pass
    assert cli.main(base + ["--pp", "probe=top"]) == 2
    assert "unknown probe design 'top'" in capsys.readouterr().err
    assert cli.main(base + ["--pp", "probes=flat"]) == 2
    assert "unknown ppcompile option(s) ['probes']" in capsys.readouterr().err


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


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: these errors must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(cli.models, "load_model", refuse)


@pytest.mark.parametrize("argv, match", [
    (["eval", "--ratio", ""], "argument --ratio: takes one or more numbers in [0, 1) separated by commas, "
                              "got '': e.g. --ratio 0.2,0.4"),
    (["eval", "--ratio", " , "], "argument --ratio: takes one or more numbers"),
    (["eval", "--ratio", "abc"], "argument --ratio: must be a number in [0, 1) (the fraction pruned), got 'abc': "
                                 "e.g. --ratio 0.4"),
    (["eval", "--ratio", "0.2,abc"], "argument --ratio: must be a number in [0, 1) (the fraction pruned), got 'abc'"),
    (["eval", "--ratio", "1.5"], "argument --ratio: must be in [0, 1) (the fraction pruned), got '1.5'"),
    (["eval", "--ratio", "0.2,1"], "argument --ratio: must be in [0, 1) (the fraction pruned), got '1'"),
    (["eval", "--ratio", "-0.1"], "argument --ratio: must be in [0, 1)"),
    (["eval", "--ratio", "nan"], "argument --ratio: must be in [0, 1)"),
    (["inspect", "--ratio", "1.5"], "argument --ratio: must be in [0, 1) (the fraction pruned), got '1.5'"),
    (["inspect", "--ratio", "abc"], "argument --ratio: must be a number in [0, 1) (the fraction pruned), got 'abc'"),
    (["eval", "--seq-len", "0"], "argument --seq-len: must be an integer >= 1, got '0'"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["eval", "--batches", "0"], "argument --batches: must be an integer >= 1, got '0'"),
    (["eval", "--batches", "two"], "argument --batches: must be an integer >= 1, got 'two'"),
    (["eval", "--calibration-windows", "0"], "argument --calibration-windows: must be an integer >= 1"),
    (["inspect", "--seq-len", "-5"], "argument --seq-len: must be an integer >= 1, got '-5'"),
    (["inspect", "--batches", "-1"], "argument --batches: must be an integer >= 0, got '-1'"),
    (["demo", "--batches", "0"], "argument --batches: must be an integer >= 1, got '0'"),
    (["eval", "--dtype", "float8"], "argument --dtype: unknown dtype 'float8': pass one of float32, bfloat16, "
                                    "float16 or auto"),
    (["generate", "--dtype", "fp16"], "argument --dtype: unknown dtype 'fp16'"),
])
def test_bad_numbers_are_refused_while_parsing(argv, match, capsys, no_model):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2 and match in capsys.readouterr().err


def test_griffin_in_eval_is_refused_before_loading_naming_where_it_is_measured(capsys, no_model):
    assert cli.main(["eval", "--methods", "dense,griffin", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method 'griffin' selects its channels from a prompt for generation" in err
    assert "`ppcompile generate --policy griffin`" in err


def test_good_numbers_parse():
    args = cli.parser().parse_args(["eval", "--ratio", "0, 0.2,0.4,", "--seq-len", "16"])
    assert args.ratio == [0.0, 0.2, 0.4] and args.seq_len == 16
    assert cli.parser().parse_args(["inspect", "--ratio", "0.3", "--batches", "0"]).ratio == 0.3
    assert cli.parser().parse_args(["eval"]).dtype == torch.float32  # the quality protocol's dtype
    assert cli.parser().parse_args(["demo", "--dtype", "bfloat16"]).dtype == torch.bfloat16
    assert cli.parser().parse_args(["generate", "--dtype", "float16"]).dtype == torch.float16


def test_a_seq_len_past_a_local_checkpoints_positions_is_refused_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 8192}))
    for command in ("eval", "inspect"):
        code = cli.main([command, "--model", str(tmp_path), "--seq-len", "100000"])
        assert code == 2 and ("ppcompile: error: --seq-len 100000 is longer than the model's max_position_embeddings "
                              "(8192): pass a smaller --seq-len (at most 8192)") in capsys.readouterr().err


def test_a_seq_len_past_a_loaded_models_positions_is_refused_before_calibration(monkeypatch, capsys):
    model = random_model("llama-gqa")  # max_position_embeddings 256
    monkeypatch.setattr(cli.models, "load_model", lambda name, dtype: (model, None))

    def refuse(*args, **kwargs):
        raise AssertionError("calibration or evaluation ran")
    monkeypatch.setattr(workloads, "windows_and_calibration", refuse)
    code = cli.main(["eval", "--model", "smollm2-135m", "--seq-len", "300", "--calibration", "pydoc", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--seq-len 300 is longer than the model's max_position_embeddings (256)" in err


@pytest.mark.real_model
def test_generate_prints_the_continuation_of_dense_and_pp(tiny_checkpoint, capsys):
    code = cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "The city of", "--max-new-tokens",
                     "4", "--backend", "eager", "--compare", "--dtype", "float32"])
    assert code == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.split("--- ") if b]
    assert [b.split(" (")[0] for b in blocks] == ["dense", "pp at ratio 0.4"]
    assert all("tokens/s" in b for b in blocks)
    # dense's continuation is what the model itself generates greedily
    model, tokenizer = load_model(str(tiny_checkpoint))
    ids = tokenizer("The city of", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert f"The city of[{text}]" in blocks[0]

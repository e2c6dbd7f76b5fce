"""The vLLM plugin: its configuration (no vLLM needed), and the real engine on the packaged model
(skipped without vLLM's CPU build: `make test-vllm` installs it in .venv-vllm and runs these).

Each engine runs in its own process (tests/vllm_generate.py): dense vLLM, and vLLM through the
plugin at ratio 0 and 0.4, greedy, over prompts of mixed lengths batched together."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppcompile import vllm_plugin
from ppcompile.vllm_backend import OPTIONS_ENV, QUALNAME, plain_linears

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM's CPU build is not installed here: `make test-vllm` "
                                                     "installs it in its own venv (.venv-vllm) and runs these tests")
SCRIPT = Path(__file__).resolve().parent / "vllm_generate.py"


def test_engine_args_check_the_options_and_hand_them_to_vllm_processes(monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    args = vllm_plugin.engine_args(ratio=0.3, probe="paper")
    assert args == {"compilation_config": {"mode": 2, "backend": QUALNAME, "custom_ops": ["none"]}}
    assert json.loads(os.environ[OPTIONS_ENV]) == {"ratio": 0.3, "probe": "paper"}
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    with pytest.raises(ValueError, match="unknown ppcompile option.*'ratoi'"):
        vllm_plugin.engine_args(ratoi=0.3)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        vllm_plugin.engine_args(ratio=1.5)


def test_the_readme_serves_with_the_compilation_config_engine_args_gives():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"--compilation-config '{json.dumps(vllm_plugin.COMPILATION_CONFIG)}'" in readme


def test_the_plugin_does_nothing_without_its_options(monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    vllm_plugin.register()
    if HAS_VLLM:
        assert not plain_linears()  # vLLM's own GEMMs stay
    else:
        assert "vllm" not in sys.modules  # it did not even look for vLLM


def test_the_backend_vllm_names_is_importable_by_its_qualified_name():
    import importlib
    module, name = QUALNAME.rsplit(".", 1)  # as vLLM's resolve_obj_by_qualname splits it
    assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("prefix, attention", [("model.layers.0.self_attn.qkv_proj", True),
                                               ("model.layers.0.self_attn.o_proj", True),
                                               ("transformer.h.3.attn.c_attn", True),
                                               ("model.layers.0.mlp.gate_up_proj", False),
                                               ("model.decoder.layers.1.fc1", False)])
def test_linears_inside_attention_keep_vllms_gemm(prefix, attention):
    assert vllm_plugin.in_attention(prefix) is attention


# ---- the real engine ----
_RUNS: dict = {}


def generate(tmp_path_factory, ratio=None, *flags: str) -> dict:
    """One engine's texts, step counts, site statuses and backbone calls (cached per run)."""
    key = (ratio, *flags)
    if key not in _RUNS:
        env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc of a function
               "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache"))}
        env.pop(OPTIONS_ENV, None)
        args = ([] if ratio is None else ["--ratio", str(ratio)]) + list(flags)
        done = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        _RUNS[key] = json.loads(line.removeprefix("RESULT ")) | {"stderr": done.stderr}
    return _RUNS[key]


@needs_vllm
@pytest.mark.real_model
@pytest.mark.slow
def test_ratio_0_through_vllm_gives_dense_vllms_tokens(tmp_path_factory):
    dense, pp0 = generate(tmp_path_factory), generate(tmp_path_factory, 0.0)
    assert pp0["texts"] == dense["texts"]
    assert pp0["counts"]["dense"] == 0 and pp0["counts"]["prefill"] > 0 and pp0["counts"]["decode"] > 0


@needs_vllm
@pytest.mark.real_model
@pytest.mark.slow
def test_ratio_04_changes_the_tokens_and_names_what_it_pruned(tmp_path_factory):
    dense, pp = generate(tmp_path_factory), generate(tmp_path_factory, 0.4)
    assert pp["texts"] != dense["texts"]
    sites = {r["site"]: r for r in pp["sites"]}
    pruned = sorted(s for s, r in sites.items() if r["status"] == "pruned")
    assert pruned == sorted(f"layers.{i}.mlp" for i in range(3, 30))  # SmolLM2: 30 layers, 0-2 skipped
    assert all(sites[s]["kept"] == 896 for s in pruned)  # 1536 channels at 0.4 over 27 of 30 layers
    assert all(sites[f"layers.{i}.attention"]["reason"] == "BLOCKS" for i in range(30))  # attention: vLLM's op
    assert "[ppcompile] vLLM: 27 of 60 blocks pruned at ratio 0.4" in pp["stderr"]


@needs_vllm
@pytest.mark.real_model
@pytest.mark.slow
def test_every_step_of_a_mixed_stream_is_counted_and_none_runs_unpruned(tmp_path_factory):
    pp = generate(tmp_path_factory, 0.4)
    counts = pp["counts"]
    # every backbone call vLLM made (counted apart from the backend) went through a pruned graph
    assert counts["prefill"] + counts["decode"] == pp["calls"] > 0
    assert counts["dense"] == 0 and counts["warmup"] >= 1
    assert counts["decode"] > counts["prefill"] > 1  # the prompts of mixed lengths took several steps


@needs_vllm
def test_a_worker_without_the_plugin_refuses_to_compile_rather_than_run_unpruned(monkeypatch):
    from vllm.model_executor.layers import utils
    from ppcompile import vllm_backend
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", lambda layer, remove_weight: None)  # not patched
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"ratio": 0.4}))
    with pytest.raises(RuntimeError, match="vLLM plugin did not run in this worker"):
        vllm_backend.compile_step(None, [])


@needs_vllm
@pytest.mark.real_model
@pytest.mark.slow
def test_an_engine_that_runs_the_model_eagerly_says_every_step_is_unpruned(tmp_path_factory):
    run = generate(tmp_path_factory, 0.4, "--enforce-eager")
    assert "vLLM runs this model without ppcompile's backend (compilation mode 0" in run["stderr"]
    assert "counts" not in run and run["calls"] > 0  # the backend never ran; the model did

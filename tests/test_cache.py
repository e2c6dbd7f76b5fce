"""A second process compiling the same model and config loads both of Inductor's caches (their
counters say so); another ratio compiles again; other weights compute their own values (their
kept units and weights are the graph's inputs: a hit is correct)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import torch

import ppcompile as pp
from ppcompile import cache
from ppcompile.models import random_model


CHILD = """
import json, sys
import torch
import ppcompile as pp
from torch._dynamo.utils import counters
from ppcompile.models import random_model
ratio, seed, policy, dynamic = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
model = random_model("llama-gqa", seed=seed)
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
extra = dict(calibration=[ids, ids]) if policy == "flap" else {}
compiled = pp.compile(model, ratio, policy=policy, skip_layers=(0,), mlp_multiple=16, dynamic=dynamic, **extra)
with torch.no_grad():
    logits = compiled(ids).logits
print(json.dumps({**counters["aot_autograd"], **counters["inductor"], "logits": logits.double().sum().item()}))
"""


def _run(cache_dir, ratio=0.4, seed=0, policy="pp", quiet=True, dynamic=None) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PPCOMPILE_QUIET": "1" if quiet else "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ratio), str(seed), policy, json.dumps(dynamic)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


@pytest.mark.inductor
@pytest.mark.slow
@pytest.mark.parametrize("dynamic, shape", [(None, "batch 2 x length 16"), (True, "batch any x length any")],
                         ids=["first shape static", "dynamic"])
def test_a_second_process_loads_the_compiled_graph_from_both_caches(tmp_path, dynamic, shape):
    first, second = _run(tmp_path, quiet=False, dynamic=dynamic), _run(tmp_path, dynamic=dynamic)
    what = f"graph 1 (forward, {shape}, 8 of 10 blocks pruned) with Inductor"  # layer 0 skipped
    assert f"[ppcompile] compiling {what} ...\n" in first["stderr"]
    assert re.search(rf"\[ppcompile\] compiled {re.escape(what)} in \d+\.\d s\n", first["stderr"])
    assert "[ppcompile]" not in second["stderr"]  # PPCOMPILE_QUIET=1
    assert first.get("autograd_cache_miss", 0) >= 1 and not first.get("autograd_cache_bypass")
    assert second.get("autograd_cache_hit", 0) >= 1 and second.get("fxgraph_cache_hit", 0) >= 1
    assert not second.get("autograd_cache_miss") and not second.get("autograd_cache_bypass")
    assert second["logits"] == first["logits"]


@pytest.mark.inductor
@pytest.mark.slow
def test_another_ratio_compiles_again_and_other_weights_run_their_own_values(tmp_path):
    _run(tmp_path)
    assert _run(tmp_path, ratio=0.2).get("autograd_cache_miss", 0) >= 1  # other kept counts: other shapes
    hit = _run(tmp_path, seed=1)  # pp's code does not depend on the weights (they are its inputs): a hit,
    fresh = _run(tmp_path / "fresh", seed=1)  # computing with these weights, as a compile of its own does
    assert hit.get("autograd_cache_hit", 0) >= 1 and fresh.get("autograd_cache_miss", 0) >= 1
    assert hit["logits"] == fresh["logits"]


@pytest.mark.inductor
@pytest.mark.slow
def test_a_static_policy_hits_its_own_entry_and_other_weights_compute_their_own_values(tmp_path):
    first, again = _run(tmp_path, policy="flap"), _run(tmp_path, policy="flap")
    assert again.get("autograd_cache_hit", 0) >= 1 and again["logits"] == first["logits"]
    other, fresh = _run(tmp_path, seed=1, policy="flap"), _run(tmp_path / "fresh", seed=1, policy="flap")
    assert other["logits"] == fresh["logits"] != first["logits"]  # hit or miss, what a compile of its own gives


def test_every_graph_the_pass_writes_passes_the_aot_autograd_caches_own_check(monkeypatch):
    """torch's own test of what its AOT autograd cache may store (check_cacheable), on every graph
    the pass gives Inductor (layers outlined; Inductor itself replaced by the graph's forward): a
    forward with a padding mask, a prefill and a decode. A node it refuses (a Tensor method called
    as a function, say) makes every new process compile that graph again, as generate()'s graphs
    once did."""
    import torch._inductor.compile_fx as compile_fx_module
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, example: gm.forward)
    model = random_model("llama-gqa")
    compiled = pp.compile(model, 0.4, skip_layers=(0,), mlp_multiple=16, quiet=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        compiled(ids, attention_mask=mask)
        compiled.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    phases = [r.phase for r in model.pp.passes]
    assert {"forward", "prefill", "decode"} <= set(phases), phases
    with cache.cacheable():
        for result in model.pp.passes:
            assert result.compiled is not result.gm
            check_cacheable(result.compiled)  # raises BypassAOTAutogradCache, naming the node's target

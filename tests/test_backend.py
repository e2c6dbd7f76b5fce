"""The backend: one graph per input shape, no graph breaks, nothing that waits on tensor values."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.runtime import Runtime

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _batch(b, L, seed):
    return torch.randint(0, 128, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", ["pp", "full-batch"])
def test_one_graph_per_shape_no_breaks_no_recompiles(policy):
    counters.clear()
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, policy=policy, backend="eager", **TINY)
    with torch.no_grad():
        for seed in range(4):
            c(_batch(4, 16, seed))
        assert counters["stats"]["unique_graphs"] == 1 and len(model.pp.passes) == 1
        for seed in range(3):  # a new batch size compiles once more, then both shapes are served
            c(_batch(2, 16, seed))
            c(_batch(4, 16, seed))
    assert counters["stats"]["unique_graphs"] == 2 and len(model.pp.passes) == 2
    assert not counters["graph_break"]


@pytest.mark.parametrize("policy", ["pp", "full-batch"])
def test_the_rewritten_graph_never_reads_tensor_values_on_the_host(policy):
    """Under FakeTensorMode no value exists: any .item(), .tolist(), nonzero or data-dependent
    shape in the rewritten graph would raise. Its outputs' shapes are static too."""
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, policy=policy, backend="eager", **TINY)
    with torch.no_grad():
        c(_batch(4, 16, 0), attention_mask=torch.ones(4, 16, dtype=torch.long))
    result = model.pp.passes[-1]
    gm = result.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = [mode.from_tensor(n.meta["example_value"]) if "example_value" in n.meta else None for n in placeholders]
    state = Runtime().inputs({s: 128 if s.endswith("mlp") else 64 for s in result.history_sites},
                             result.seq_len, "cpu", result.uses_step)
    args = args[:len(args) - len(state)] + [mode.from_tensor(t) for t in state]
    with mode, torch.no_grad():
        out = gm(*args)
    kept = out[result.n_outputs:result.n_outputs + len(result.selected_sites)]
    assert [tuple(k.shape) for k in kept] == [(2,) if s.endswith("attention") else (64,) for s in result.selected_sites]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.inductor
def test_cuda_call_never_synchronizes():
    model = random_model("llama-gqa").cuda()
    c = pp.compile(model, 0.4, **TINY)
    ids = _batch(4, 16, 0).cuda()
    with torch.no_grad():
        c(ids)  # compiles (compiling may synchronize)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            c(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(k.is_cuda for k in model.pp.runtime.last_selection().values())

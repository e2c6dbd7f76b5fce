"""The CUDA route: Inductor's Triton kernels for the rewritten graph, checked against the dense model
with the pruned columns zeroed. Skipped without a GPU (CI and the CPU machines have none);
bench/gpu.sh runs it on a GPU machine."""
import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model

from reference import zero_pruned

pytestmark = [pytest.mark.inductor,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")]

TINY = dict(skip_layers=(0,), mlp_multiple=16)


def _ids(b, L, seed=0):
    return torch.randint(1, 128, (b, L), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_triton_kernels_compute_the_dense_model_with_the_unselected_columns_zeroed(arch, dtype):
    torch._dynamo.reset()
    model = random_model(arch, dtype=dtype).cuda()
    c = pp.compile(model, 0.4, strict=True, dynamic=True, **TINY)
    with torch.no_grad():
        for b, L in ((3, 21), (5, 40)):  # two shapes through the one dynamic graph
            ids = _ids(b, L, seed=L)
            out = c(ids).logits
            kept = {k: v.cpu() for k, v in model.pp.runtime.last_selection().items()}
            ref = zero_pruned(random_model(arch, dtype=dtype), kept, head_dim=16).cuda()(ids).logits
            dense = random_model(arch, dtype=dtype).cuda()(ids).logits
            # bf16: both sides round differently (Triton's reductions vs cuBLAS); a wrong column set
            # moves the logits by the pruned-vs-dense distance, far above this
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)
            torch.testing.assert_close(out, ref, **tol)
            assert (out - dense).abs().mean() > 10 * (out - ref).abs().mean()
    assert len(model.pp.passes) == 1 and model.pp.passes[0].dynamic
    assert model.pp.runtime.counts["unpruned_calls"] == 0


def test_triton_generation_equals_the_eager_route_on_the_gpu():
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    outs = []
    for backend in ("eager", "inductor"):
        torch._dynamo.reset()
        c = pp.compile(random_model("llama-gqa").cuda(), 0.4, backend=backend, strict=True, **TINY)
        with torch.no_grad():
            outs.append(c.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True))
    torch.testing.assert_close(torch.stack(outs[1].logits), torch.stack(outs[0].logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1].sequences, outs[0].sequences)

"""Linear forms and fused projections (passes/unfuse.py), on small modules traced by Dynamo: the
rewritten graph computes what the module does, and a part's linear reads exactly the fused rows
computed by hand."""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppcompile.passes.graph import copy_graph, real_tensors, refresh_values
from ppcompile.passes.sites import is_linear
from ppcompile.passes.unfuse import normalize_linears, split_fused

B, L, D, H, HD = 2, 5, 8, 2, 4


def _traced(module: nn.Module, x: torch.Tensor):
    """A copy of the graph Dynamo captures for module(x), with its example inputs."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, dynamic=False)(x)
    gm, inputs = captured[0]
    return copy_graph(gm), inputs


def _rewritten(gm):
    gm.graph.lint()
    gm.recompile()
    refresh_values(gm)
    return gm


def _linears(gm):
    return [n for n in gm.graph.nodes if is_linear(n)]


def _split(module: nn.Module):
    """Split the module's one linear; the graph, its inputs, and whether it was split."""
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(0))
    gm, inputs = _traced(module, x)
    (linear,) = _linears(gm)
    done = split_fused(gm, linear)
    gm = _rewritten(gm)
    torch.testing.assert_close(gm(*inputs)[0], module(x), rtol=0, atol=1e-6)
    return gm, inputs, done


class SplitQKV(nn.Module):  # GPT-2 / Phi-3 style: q | k | v one after the other
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * H * HD)

    def forward(self, x):
        q, k, v = self.qkv(x).split(H * HD, dim=-1)
        return q * k.sigmoid() + v


class InterleavedQKV(nn.Module):  # GPT-NeoX style: per head, its q, k, v rows
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * H * HD)

    def forward(self, x):
        y = self.qkv(x).view(B, L, H, 3 * HD).transpose(1, 2)  # (B, H, L, 3 hd)
        q, k, v = y.chunk(3, dim=-1)  # (B, H, L, hd) each
        return (q * k.sigmoid() + v).transpose(1, 2).reshape(B, L, -1)


def test_parts_one_after_the_other_are_slices_of_the_fused_weight():
    module = SplitQKV()
    gm, inputs, done = _split(module)
    assert done
    real = real_tensors(gm, inputs)
    w, b = module.qkv.weight, module.qkv.bias
    parts = _linears(gm)
    assert len(parts) == 3
    for i, p in enumerate(parts):
        rows = slice(i * H * HD, (i + 1) * H * HD)
        assert torch.equal(real(p.args[1]), w[rows]) and torch.equal(real(p.args[2]), b[rows])
        assert real(p.args[1]).data_ptr() == w[rows].data_ptr()  # a view: no copy of the weight


def test_interleaved_parts_read_each_heads_rows():
    module = InterleavedQKV()
    gm, inputs, done = _split(module)
    assert done
    real = real_tensors(gm, inputs)
    parts = _linears(gm)
    assert len(parts) == 3
    for role, p in enumerate(parts):  # head h's rows of role r: h * 3 hd + r * hd + j
        rows = [h * 3 * HD + role * HD + j for h in range(H) for j in range(HD)]
        assert torch.equal(real(p.args[1]), module.qkv.weight[rows])


class UsedWhole(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 2 * D)

    def forward(self, x):
        y = self.fc(x)
        a, b = y.chunk(2, dim=-1)
        return a * b + y.sum(-1, keepdim=True)


class RowsMerged(nn.Module):  # a part whose rows mix batch and sequence: no linear's layout
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 2 * D)

    def forward(self, x):
        halves = self.fc(x).view(B * L, 2, D)
        return halves[:, 0].view(L, B, D) * halves[:, 1].view(L, B, D)


def test_an_output_used_whole_or_cut_across_tokens_stays_fused():
    for module in (UsedWhole(), RowsMerged()):
        gm, _, done = _split(module)
        assert not done and len(_linears(gm)) == 1


class Conv1DBlock(nn.Module):  # GPT-2's Conv1D: weight (in, out), addmm on (B*L, in)
    def __init__(self):
        super().__init__()
        self.proj = Conv1D(3 * D, D)

    def forward(self, x):
        return self.proj(x).relu()


class MatmulBlock(nn.Module):  # Falcon's: x @ W.T + b
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * D, D))
        self.bias = nn.Parameter(torch.randn(3 * D))

    def forward(self, x):
        return (x @ self.weight.T + self.bias).relu()


def test_conv1d_and_matmul_forms_become_linear_on_the_same_weight():
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    for module, stored_transposed in ((Conv1DBlock(), True), (MatmulBlock(), False)):
        gm, inputs = _traced(module, x)
        assert not _linears(gm)
        assert normalize_linears(gm) == 1
        gm = _rewritten(gm)
        (linear,) = _linears(gm)
        assert linear.args[0].op == "placeholder"  # on x itself, not on a (B*L, in) view
        real = real_tensors(gm, inputs)
        w = module.proj.weight if stored_transposed else module.weight
        assert torch.equal(real(linear.args[1]), w.t() if stored_transposed else w)
        assert real(linear.args[2]) is not None  # the bias folded in
        torch.testing.assert_close(gm(*inputs)[0], module(x), rtol=1e-6, atol=1e-6)

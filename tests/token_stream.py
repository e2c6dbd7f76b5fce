"""A model as a serving engine compiles it: a step's tokens of all requests flattened to (T,), every
block on (T, hidden), gate and up merged in one projection, attention (if any) one opaque op
(vLLM's layout)."""
import torch


class MergedMLP(torch.nn.Module):
    """gate and up in one projection, as serving engines merge them."""

    def __init__(self, d: int, inter: int):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(d, 2 * inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, d, bias=False)

    def forward(self, x):  # (T, d)
        gu = self.gate_up_proj(x)  # (T, 2 * inter)
        half = gu.shape[-1] // 2
        return self.down_proj(torch.nn.functional.silu(gu[..., :half]) * gu[..., half:])


@torch.library.custom_op("pptest::unified_attention", mutates_args=())
def unified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An engine's attention as one opaque op (vLLM's unified_attention_with_output): heads,
    cache and all inside it. Here each token attends to itself alone."""
    return v.clone()


@unified_attention.register_fake
def _(q, k, v):
    return torch.empty_like(v)


class OpaqueAttention(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv_proj = torch.nn.Linear(d, 3 * d, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):  # (T, d)
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.o_proj(torch.ops.pptest.unified_attention(q, k, v))


class StreamLayer(torch.nn.Module):
    def __init__(self, d: int, inter: int, attention: bool):
        super().__init__()
        self.input_layernorm = torch.nn.RMSNorm(d) if attention else None
        self.self_attn = OpaqueAttention(d) if attention else None
        self.post_attention_layernorm = torch.nn.RMSNorm(d)
        self.mlp = MergedMLP(d, inter)

    def forward(self, x):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TokenStream(torch.nn.Module):
    """What a serving engine compiles: a step's tokens of all requests flattened to (T,), every
    block on (T, hidden)."""

    def __init__(self, vocab: int = 64, d: int = 32, inter: int = 128, layers: int = 3, attention: bool = False):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(StreamLayer(d, inter, attention) for _ in range(layers))

    def forward(self, input_ids):  # (T,)
        x = self.embed_tokens(input_ids)  # (T, d)
        for layer in self.layers:
            x = layer(x)
        return x

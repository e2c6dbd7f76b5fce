"""The same pass through torch's own entry point: torch.compile(backend="ppcompile").

    python examples/torch_compile_backend.py
"""
import torch

import ppcompile as pp
from ppcompile import data
from ppcompile.backend import last_runtime
from ppcompile.models import load_model

model, tokenizer = load_model("smollm2-135m")
ids = data.token_windows("brown:a", tokenizer, seq_len=128, n_windows=4)

runtime = pp.Runtime()  # optional: where the history lives between calls
compiled = torch.compile(model, backend="ppcompile",
                         options={"ratio": 0.4, "policy": "pp", "sample_ratio": 0.25, "runtime": runtime})
with torch.no_grad():
    compiled(ids)  # warm-up
    logits = compiled(ids).logits

assert last_runtime() is runtime
site, kept = next(iter(runtime.last_selection().items()))
print(f"logits {tuple(logits.shape)}; {len(runtime.last_selection())} blocks pruned; {site} kept heads {kept.tolist()}")

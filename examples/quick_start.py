"""Quick start: Probe Pruning at ratio 0.4 on the packaged SmolLM2-135M, next to the dense model.

    python examples/quick_start.py
"""
import torch

import ppcompile as pp
from ppcompile import data
from ppcompile.models import load_model

model, tokenizer = load_model("smollm2-135m")
ids = data.token_windows("brown:a", tokenizer, seq_len=128, n_windows=4)  # (4, 128) token ids

with torch.no_grad():
    dense_loss = model(ids, labels=ids).loss.item()
    pruned = pp.compile(model, ratio=0.4)  # Inductor: the first call compiles (a minute on 2 cores)
    pruned(ids)  # the warm-up batch: it selects, but does not update the history
    loss = pruned(ids, labels=ids).loss.item()  # the model's own output type, loss included

rows = model.pp.summary()
kept = [f"{r['kept']}/{r['total']}" for r in rows if r["status"] == "pruned"][:2]
print(f"dense loss {dense_loss:.3f}, pp@0.4 loss {loss:.3f}")
print(f"{sum(r['status'] == 'pruned' for r in rows)} blocks pruned; layer 3 keeps {kept[0]} heads, {kept[1]} channels")

"""Generation through the pass: the prompt's batch selects heads and channels in the prefill, and
every decode step reuses them (compact weights gathered once per prompt, a static KV cache).

    python examples/generate.py
"""
import torch

import ppcompile as pp
from ppcompile import data
from ppcompile.models import load_model

model, tokenizer = load_model("smollm2-135m")
tokenizer.padding_side = "left"  # generation pads on the left: every prompt ends where generation starts
prompts = ["The history of the city begins", "In the laboratory, the scientists found that"]
batch = tokenizer(prompts, return_tensors="pt", padding=True)

calibration = data.token_windows("brown:fgh", tokenizer, seq_len=128, n_windows=8, mode="random", seed=0)
pruned = pp.compile(model, ratio=0.4, calibration=calibration.split(4))  # pp's history starts from it

with torch.no_grad():
    dense = model.generate(**batch, max_new_tokens=24, do_sample=False)
    out = pruned.generate(**batch, max_new_tokens=24, do_sample=False)  # compiles prefill + decode once

for prompt, d, p in zip(prompts, dense, out):
    n = batch.input_ids.shape[1]
    print(f"{prompt}\n  dense: {tokenizer.decode(d[n:], skip_special_tokens=True)!r}"
          f"\n  pp   : {tokenizer.decode(p[n:], skip_special_tokens=True)!r}")
counts = pruned.pp.runtime.counts
print(f"{counts['pruned_calls']} forwards pruned (1 prefill + decode steps), {counts['unpruned_calls']} unpruned")

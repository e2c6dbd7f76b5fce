"""Calibrate once, save it, and reuse it: Probe Pruning's history and the static FLAP baseline.

    python examples/calibration_reuse.py [calibration.pt]
"""
import sys

import torch

import ppcompile as pp
from ppcompile import data
from ppcompile.models import load_model

path = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2_brown-fgh.calibration.pt"
model, tokenizer = load_model("smollm2-135m")
eval_docs, calib_docs = data.split_disjoint(data.load_documents("brown:a"), data.load_documents("brown:fgh"))
calib = data.token_windows(calib_docs, tokenizer, seq_len=128, n_windows=8, mode="random", seed=0)
ids = data.token_windows(eval_docs, tokenizer, seq_len=128, n_windows=4)

cal = pp.calibrate(model, calib.split(4))  # dense passes, two batches of 4 windows
cal.save(path)

reloaded = pp.Calibration.load(path)  # keyed to this model: another model's file is an error
with torch.no_grad():
    dense = model(ids, labels=ids).loss.item()
    torch._dynamo.reset()  # a fresh compile for each policy below (same model class)
    flap = pp.compile(model, 0.4, policy="flap", calibration=reloaded, backend="eager")
    flap_loss = flap(ids, labels=ids).loss.item()
    torch._dynamo.reset()
    probe = pp.compile(model, 0.4, policy="pp", calibration=reloaded, backend="eager")  # history seeded
    probe(ids)  # warm-up
    pp_loss = probe(ids, labels=ids).loss.item()
print(f"saved {path}; dense loss {dense:.3f}, flap@0.4 {flap_loss:.3f}, pp@0.4 {pp_loss:.3f}")

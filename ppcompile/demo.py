"""`ppcompile demo`: what Probe Pruning does to the packaged model, measured while you wait.

Two questions, each answered the way it is measured honestly:
  quality  perplexity, KL and top-1 agreement to dense on Brown genre a, of dense, pp and the
           static baseline flap at the same ratio, both calibrated on other Brown text (kept in
           $PPCOMPILE_CACHE for the next run; the rewritten graphs run without Inductor: the
           same operations, so the same figures to rounding, without two more compiles);
  speed    greedy generation of a batch of prompts, dense and pp compiled the same way
           (pp.compile, Inductor, one static shape, the model's dtype), each warmed up with a call
           of the timed size, then timed in turns; medians and spreads of the prefill time and the
           decode tokens/s, no compile inside a timed call (Dynamo's counter, timed_generate).
Every verdict it prints is computed from the figures above it.
"""
from __future__ import annotations

import statistics
import time

import torch
from tabulate import tabulate

from . import data, models
from .evaluate import evaluate
from .generation import timed_generate
from .guard import assert_pruned
from .methods import build_method
from .workloads import device_name, load, windows_and_calibration

MODEL, TEXT, CALIBRATION = "smollm2-135m", "brown:a", "brown:b"


def run(dtype: torch.dtype, *, ratio: float = 0.4, batches: int = 2, batch_size: int = 8, seq_len: int = 256,
        prompt_len: int = 128, new: int = 32, rounds: int = 3) -> None:
    start = time.perf_counter()
    model, tokenizer = load(MODEL, seq_len, dtype)
    windows, cal, _ = windows_and_calibration(model, tokenizer, TEXT, seq_len, batches * batch_size, batch_size,
                                              CALIBRATION, 16, 0, False, reuse=True)
    dtype_name = models.dtype_name(dtype)
    print(f"# {MODEL} ({dtype_name}), {device_name()}, torch {torch.__version__}; ratio {ratio}; "
          f"calibration: 16 windows of {seq_len} tokens of {CALIBRATION}\n", flush=True)
    loaded = time.perf_counter()
    quality = _quality(model, cal, windows, batch_size, ratio)
    scored = time.perf_counter()
    print(f"\n## generation: {batch_size} prompts of {prompt_len} tokens of {TEXT}, {new} greedy tokens each; "
          "dense and pp compiled the same way (Inductor)\n", flush=True)
    speed = _speed(model, tokenizer, cal, windows[:batch_size, :prompt_len], ratio, new, rounds)
    print()
    for line in verdict(quality, speed, ratio):
        print(line)
    end = time.perf_counter()
    print(f"\ndemo: {end - start:.0f} s (model and calibration {loaded - start:.0f} s, quality {scored - loaded:.0f} s, "
          f"generation {end - scored:.0f} s); other shapes, models and the static baselines' speed: docs/results.md")


def _quality(model, cal, windows: torch.Tensor, batch_size: int, ratio: float) -> dict[str, dict]:
    print(f"## quality: {windows.shape[0]} windows of {windows.shape[1]} tokens of {TEXT} (the first batch also "
          "warms up; rewritten graphs run eagerly)\n", flush=True)
    # one shape: no symbolic sizes to trace (the pass's choices do not depend on it)
    methods = {"dense": build_method("dense", model, 0.0, cal, "eager"),
               "pp": build_method("pp", model, ratio, cal, "eager", dynamic=False),
               "flap": build_method("flap", model, ratio, cal, "eager", dynamic=False)}
    results = evaluate(methods, data.iter_batches(windows, batch_size), reference="dense")
    rows = {r.method: r.as_dict() for r in results}
    print(tabulate([[m, 0.0 if m == "dense" else ratio, r["ppl"], r["kl"], r["top1"]] for m, r in rows.items()],
                   headers=["method", "ratio", "perplexity", "KL to dense", "top-1 agreement"], floatfmt=".4g"))
    return rows


def _speed(model, tokenizer, cal, prompts: torch.Tensor, ratio: float, new: int, rounds: int) -> dict[str, dict]:
    from .api import compile as pp_compile
    compiled = {"dense": pp_compile(model, 0.0, policy="dense", dynamic=False),
                "pp": pp_compile(model, ratio, calibration=cal, dynamic=False)}
    times: dict[str, dict] = {m: {"prefill": [], "step": []} for m in compiled}
    kwargs = {"pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        for m, fn in compiled.items():  # compiles the prefill and the decode graphs
            begin = time.perf_counter()
            out, _, _ = timed_generate(fn, prompts, new=new, **kwargs)
            times[m]["first_call_s"] = time.perf_counter() - begin
            times[m]["text"] = tokenizer.decode(out[0, prompts.shape[1]:], skip_special_tokens=True)
        for _ in range(rounds):  # in turns, so that the machine's drift falls on both
            for m, fn in compiled.items():
                _, prefill, step = timed_generate(fn, prompts, new=new, warm=True, **kwargs)
                times[m]["prefill"].append(prefill)
                times[m]["step"].append(step)
    assert_pruned(compiled["pp"], method=f"pp at ratio {ratio} in the demo's generation")  # or nothing is shown
    batch = prompts.shape[0]
    rows = []
    for m, t in times.items():
        tok_s = sorted(batch / s for s in t["step"])
        t["prefill_s"], t["decode_tok_s"] = statistics.median(t["prefill"]), statistics.median(tok_s)
        rows.append([m, 0.0 if m == "dense" else ratio, 1e3 * t["prefill_s"],
                     f"{1e3 * min(t['prefill']):.0f}-{1e3 * max(t['prefill']):.0f}",
                     t["decode_tok_s"], f"{tok_s[0]:.1f}-{tok_s[-1]:.1f}", t["first_call_s"]])
    print(tabulate(rows, headers=["method", "ratio", "prefill ms", "(spread)", "decode tokens/s", "(spread)",
                                  "first call s (compiles)"], floatfmt=".4g"))
    print(f"medians of {rounds} timed rounds each, after the first call; decode tokens/s: {batch} sequences x "
          f"{new - 1} steps / the steps' time")
    prompt = tokenizer.decode(prompts[0, -24:], skip_special_tokens=True)
    print(f"\nthe first prompt ends: ...{prompt!r}")
    for m, t in times.items():
        print(f"  {m:>5}: {t['text']!r}")
    return times


def verdict(quality: dict[str, dict], speed: dict[str, dict], ratio: float) -> list[str]:
    """What the figures say, in sentences: where pp wins and where it does not."""
    q, s = quality, speed
    lines = []
    ppl_cut = q["flap"]["ppl"] / q["pp"]["ppl"]
    lines.append(f"quality: at ratio {ratio}, pp's perplexity is {q['pp']['ppl']:.4g} against flap's "
                 f"{q['flap']['ppl']:.4g} (dense {q['dense']['ppl']:.4g}): "
                 + (f"{ppl_cut:.2f}x lower than the static baseline's" if ppl_cut > 1 else
                    "no better than the static baseline's on this text"))
    decode = s["pp"]["decode_tok_s"] / s["dense"]["decode_tok_s"]
    prefill = s["pp"]["prefill_s"] / s["dense"]["prefill_s"]
    lines.append(f"decode: pp runs {decode:.2f}x dense's tokens/s: " +
                 ("faster, the steps reuse the prompt's selection and run only the smaller matmuls" if decode > 1
                  else "not faster here"))
    lines.append(f"prefill: pp takes {prefill:.2f}x dense's time: " +
                 ("faster" if prefill < 1 else
                  "slower: each pruned block probes, scores and gathers its kept weights before it computes, "
                  f"and on this small model's short prompts that costs more than pruning {ratio:.0%} saves (pp "
                  "gains with batch x length and model width: docs/results.md)"))
    return lines

"""Probe designs at equal cost, timed against each other: one compiled pp per design (and dense),
called in turn, call by call, so that a slow spell of the machine hits every method alike; the
median time per call and each design's median ratio to the first design's, per round.

    python bench/probe_speed.py                          # LLaMA-2B-shaped, bf16, 8 x 512, paper vs spread
    python bench/probe_speed.py --probes paper,spread,stratified --shape 1x512 --no-readme
    python bench/probe_speed.py --from-json bench/results/probe_speed_llama-2b-shaped_bfloat16.json

The first call of each method is its compile (Dynamo and Inductor, with Inductor's caches off, so
every compile is cold; the process's one-time costs are paid on a tiny function first); it is
reported as `first call s`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import ppcompile as pp
from ppcompile.guard import assert_pruned
from ppcompile.models import dtype_name, parse_dtype, random_model
from ppcompile.workloads import device_name
from protocol import label, provenance
from readme import publish, rows_of

ROOT = Path(__file__).resolve().parent.parent


def run(args) -> list[dict]:
    torch.set_grad_enabled(False)
    torch._inductor.config.force_disable_caches = True  # every compile cold, as a new model's is
    torch.compile(lambda x: (x * 2).sum(), dynamic=False)(torch.ones(8))  # Inductor's one-time costs
    torch._dynamo.reset()
    batch, seq = args.shape
    methods, first, ids = {}, {}, None
    for probe in args.probes + ["dense"]:
        model = random_model(args.model).to(args.dtype)
        if ids is None:  # ids within the vocabulary of any model (a tiny one has 256)
            vocab = min(1000, model.config.vocab_size)
            ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        fn = torch.compile(model) if probe == "dense" else pp.compile(model, args.ratio, probe=probe)
        t = time.perf_counter()
        fn(ids)
        first[probe] = time.perf_counter() - t
        fn(ids)  # a second warm-up call
        methods[probe] = fn
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t)
    for name, fn in methods.items():  # every timed call of a design ran pruned, or nothing is reported
        if name != "dense":
            assert_pruned(fn, method=label("pp", probe=name))
    base = args.probes[0]
    return [{"model": args.model, "dtype": dtype_name(args.dtype), "batch": batch, "seq_len": seq,
             "ratio": 0.0 if name == "dense" else args.ratio,
             "method": label("dense") if name == "dense" else label("pp", probe=name),
             "seconds": statistics.median(v), "all_seconds": v, "first_call_s": first[name],
             f"vs_{base}": statistics.median(a / b for a, b in zip(v, times[base])),
             "vs_dense": statistics.median(a / b for a, b in zip(v, times["dense"])),
             "machine": device_name(), "torch": torch.__version__,
             "provenance": provenance(None if name == "dense" else methods[name], dtype=args.dtype)}
            for name, v in times.items()]


def table(rows: list[dict]) -> str:
    r = rows[0]
    base = next(k for k in r if k.startswith("vs_") and k != "vs_dense")
    out = [[x["method"], f"{x['seconds']:.3f}", f"{x[base]:.3f}", f"{x['vs_dense']:.3f}", f"{x['first_call_s']:.1f}"]
           for x in rows]
    return (tabulate(out, headers=["method", "s / call", f"/ {base[3:]} (per round)", "/ dense (per round)",
                                   "first call s"], tablefmt="github") +
            f"\n\n{r['model']} ({r['dtype']}), {r['batch']} x {r['seq_len']} random token ids, ratio {max(x['ratio'] for x in rows)}, "
            f"medians of {len(r['all_seconds'])} rounds with the methods called in turn; first call: compile with "
            f"Inductor's caches off, and one call; {r['machine']}, torch {r['torch']}. "
            f"Printed by `python bench/probe_speed.py`.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2b-shaped")
    p.add_argument("--dtype", type=parse_dtype, default=torch.bfloat16)
    p.add_argument("--shape", type=lambda s: tuple(int(x) for x in s.split("x")), default=(8, 512))
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--probes", type=lambda s: s.split(","), default=["paper", "spread"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/probe_speed_llama-2b-shaped_bfloat16.json")
    p.add_argument("--from-json", type=Path)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    publish("probe-speed", table(rows_of(args, run)), args)


if __name__ == "__main__":
    main()

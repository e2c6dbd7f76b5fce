"""What sharding costs in quality: pp with one top-k over each block against pp with the kept units
split evenly over the shards of a tensor-parallel model (PPConfig(shards=N): what each rank keeps
on its own, run in one process), on the quality bench's protocol.

    python bench/shards.py                     # SmolLM2 (9 heads, 3 K/V heads): 3 shards
    python bench/shards.py --from-json bench/results/shards_smollm2_brown-a.json

Per calibration seed: one calibration, then dense, and pp at each ratio with shards=1 and N; the
README block `shards` gets the medians over the seeds.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tabulate import tabulate

from ppcompile import data
from ppcompile.config import PPConfig
from ppcompile.evaluate import evaluate
from ppcompile.methods import build_method
from ppcompile.workloads import device_name, load, windows_and_calibration
from protocol import Methods, add_protocol_args, label, parse_label
from readme import model_name, publish, rows_of

ROOT = Path(__file__).resolve().parents[1]


def run(args) -> list[dict]:
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        torch._dynamo.reset()
        model, tokenizer = load(args.model, args.seq_len, torch.float32)
        windows, cal, _ = windows_and_calibration(model, tokenizer, args.data, args.seq_len,
                                                  args.batch_size * args.batches, args.batch_size, args.calibration,
                                                  args.calibration_windows, seed, progress=True)
        made = Methods()  # the session of each pp method, checked after the evaluation
        methods = {"dense": build_method("dense", model, 0.0, cal, "eager")}
        for ratio in (float(r) for r in args.ratios.split(",")):
            for shards in (1, args.shards):
                name = label("pp", ratio, shards=shards)  # pp@0.2 shards=3 (earlier runs' JSON: 0.2/3)
                methods[name] = made.build(name, build_method, "pp", model, ratio, cal, "eager", shards=shards)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(methods) + 2)
        results = evaluate(methods, data.iter_batches(windows, args.batch_size), progress=True)
        made.check()
        for r in results:
            _, ratio, options = parse_label(r.method)
            # as text, as earlier runs' rows have them (table() compares them as text)
            ratio, shards = (f"{ratio:g}", str(options["shards"])) if "shards" in options else (None, None)
            rows.append({"seed": seed, "method": r.method, "ratio": ratio, "shards": shards, "ppl": r.ppl,
                         "kl": r.kl, "top1": r.top1, "model": args.model, "text": args.data,
                         "windows": args.batch_size * args.batches, "seq_len": args.seq_len,
                         "calibration": args.calibration, "torch": torch.__version__, "device": device_name(),
                         "heads": model.config.num_attention_heads, "channels": model.config.intermediate_size,
                         "layers": model.config.num_hidden_layers,
                         "provenance": made.provenance(r.method, dtype=torch.float32)})
    return rows


def table(rows: list[dict]) -> str:
    dense = {r["seed"]: r["ppl"] for r in rows if r["method"] == "dense"}
    r = rows[0]
    out = []
    shards = sorted({r["shards"] for r in rows if r["shards"]}, key=int)
    for ratio in sorted({r["ratio"] for r in rows if r["ratio"]}):
        cells = [ratio]
        for n in shards:
            x = [r["ppl"] / dense[r["seed"]] for r in rows if r["ratio"] == ratio and r["shards"] == n]
            cfg = PPConfig(float(ratio), shards=int(n))
            kept = (cfg.kept_units("attention", r["heads"], r["layers"]), cfg.kept_units("mlp", r["channels"], r["layers"]))
            cells.append(f"{statistics.median(x):.3f} ({min(x):.3f}-{max(x):.3f}); keeps {kept[0]}/{r['heads']} heads, "
                         f"{kept[1]}/{r['channels']} channels")
        out.append(cells)
    heads = ["ratio"] + ["global top-k: x dense" if s == "1" else f"balanced over {s} shards: x dense" for s in shards]
    seeds = sorted(dense)
    return (tabulate(out, headers=heads, tablefmt="github") +
            f"\n\npp's perplexity as a multiple of dense, median (min-max) over calibration seeds "
            f"{', '.join(map(str, seeds))}: {model_name(r['model'])} in fp32, the first {r['windows']} {r['seq_len']}-token windows "
            f"of {r['text']}, calibration windows of {r['calibration']}; backend eager; torch {r['torch']}, {r['device']}. "
            f"`keeps`: heads and MLP channels kept in each pruned layer (the first three stay dense). A shard keeps "
            f"what a block of its size keeps, so where a block does not divide, the totals differ from the global "
            f"rule's. Printed by `python bench/shards.py`.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    add_protocol_args(p)
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/shards_smollm2_brown-a.json")
    p.add_argument("--from-json", type=Path)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    publish("shards", table(rows_of(args, run)), args)


if __name__ == "__main__":
    main()
